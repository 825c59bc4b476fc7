"""K-wise ranking rows (`--objective ranking`): one prompt, K >= 2 responses, a rating for each.

Two layouts are read, decided once per source from its first row:

- `ranking`: {"prompt": ..., "responses": [text, ...], "scores": [number, ...]} (higher is better), or
  "ranks" in place of "scores" (1 is best; equal ranks tie). The prompt is text or {role, content}
  messages.
- `ultrafeedback`: UltraFeedback's own rows, {"instruction": text, "completions": [{"response": text,
  "overall_score": number, "fine-grained_score": number, ...}, ...]}, rated by one of the completions'
  score fields (`overall_score` by default).

A row is K sequences, cut by the one truncation rule (data/truncation.py: the prompt once for all K
responses, from the left), that each run through the backbone once per step, with the row's scores. A
row of K = 2 with different scores is exactly the pair it is. Where max_len cuts nothing, each sequence
is what score_texts encodes for (prompt, response); held-out rows keep each response's own encoding
besides (`single`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rm_trainer.data import read
from rm_trainer.data.formats import render_messages
from rm_trainer.data.tokenize import Encoded
from rm_trainer.errors import DataError
from rm_trainer.objectives.base import RowReader

UF_SCORES = ("overall_score", "fine-grained_score")


@dataclass(frozen=True)
class RankingKeys:
    prompt: str = "prompt"
    responses: str = "responses"
    scores: str = "scores"
    ranks: str = "ranks"
    uf_score: str = "overall_score"  # which score of an UltraFeedback completion rates it


def detect_ranking_format(row: Any, keys: RankingKeys) -> str:
    """ultrafeedback when the row has UltraFeedback's completions; ranking otherwise."""
    if isinstance(row, dict) and "completions" in row and keys.responses not in row:
        return "ultrafeedback"
    return "ranking"


class RankingLayout:
    """formats.load_source's view of ranking sources (pair_rows.PairLayout is the pairs' one)."""

    def __init__(self, keys: RankingKeys) -> None:
        self.keys = keys

    def decide(self, first_rows: list[Any], fmt: str) -> str:
        if fmt in LAYOUTS:
            return fmt
        return detect_ranking_format(next((r for r in first_rows if isinstance(r, dict)), None), self.keys)

    def problem(self, row: Any, fmt: str) -> str | None:
        return ranking_problem(row, fmt, self.keys)

    def check_columns(self, ds, path: str) -> None:
        cols = set(ds.column_names)
        if self.keys.responses in cols or "completions" in cols:
            return
        held = "preference pairs (chosen/rejected)" if {"chosen", "rejected"} <= cols else "no rankings"
        raise DataError(f"{path}: holds {held}: no {self.keys.responses!r} or 'completions' field (found fields: "
                        f"{', '.join(sorted(cols))}); train.objective ranking reads rows of a prompt, K responses "
                        "and their scores (docs/objectives.md); pairs train with --objective pairs")


LAYOUTS = ("ranking", "ultrafeedback")


def kind_of(v: Any) -> str:
    """How a problem names a value of the wrong type: 'missing', or 'a list'."""
    return "missing" if v is None else f"a {type(v).__name__}"


def _number_problem(v: Any, field: str) -> str | None:
    if read.finite_number(v):
        return None
    what = repr(v) if isinstance(v, float | str) else kind_of(v)
    return f"field {field} is {what}; expected a finite number"


def prompt_problem(p: Any, field: str) -> str | None:
    if isinstance(p, str):
        return None
    if isinstance(p, list) and p and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                         and isinstance(m.get("content"), str) for m in p):
        return None
    return f"field {field!r} is {kind_of(p)}; expected text or a list of {{role, content}} messages"


def _ranking_problem(row: dict, keys: RankingKeys) -> str | None:
    responses = row.get(keys.responses)
    if not isinstance(responses, list):
        return f"field {keys.responses!r} is {kind_of(responses)}; expected a list of response texts"
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            return f"field {keys.responses}[{i}] is {kind_of(r)}; expected text"
    field = keys.scores if keys.scores in row else keys.ranks if keys.ranks in row else None
    if field is None:
        return f"fields {keys.scores!r} and {keys.ranks!r} are both missing; give one number per response"
    values = row[field]
    if not isinstance(values, list):
        return f"field {field!r} is a {type(values).__name__}; expected a list of numbers, one per response"
    if len(values) != len(responses):
        return f"field {field!r} has {len(values)} values for {len(responses)} responses; give one per response"
    for i, v in enumerate(values):
        if (p := _number_problem(v, f"{field}[{i}]")) is not None:
            return p
    return None


def _ultrafeedback_problem(row: dict, keys: RankingKeys) -> str | None:
    completions = row.get("completions")
    if not isinstance(completions, list):
        return f"field 'completions' is {kind_of(completions)}; expected UltraFeedback's list of completions"
    for i, c in enumerate(completions):
        if not isinstance(c, dict):
            return f"field completions[{i}] is a {type(c).__name__}; expected an object with a response and scores"
        if not isinstance(c.get("response"), str):
            return f"field completions[{i}].response is {kind_of(c.get('response'))}; expected text"
        if (p := _number_problem(c.get(keys.uf_score), f"completions[{i}].{keys.uf_score}")) is not None:
            return p
    return None


def ranking_problem(row: Any, fmt: str, keys: RankingKeys) -> str | None:
    """What is wrong with one row of a `fmt` source, naming the field; None if it is usable."""
    if not isinstance(row, dict):
        return f"each row must be a JSON object, got {type(row).__name__}"
    prompt_field = "instruction" if fmt == "ultrafeedback" else keys.prompt
    problem = prompt_problem(row.get(prompt_field), prompt_field)
    problem = problem or (_ultrafeedback_problem(row, keys) if fmt == "ultrafeedback" else _ranking_problem(row, keys))
    if problem is None and len(ranking_texts(row, fmt, keys)[1]) < 2:
        n = len(ranking_texts(row, fmt, keys)[1])
        problem = f"{n} response{'s' if n != 1 else ''}; a ranking needs at least 2"
    return problem


def ranking_texts(row: dict, fmt: str, keys: RankingKeys) -> tuple[Any, list[str], list[float]]:
    """(prompt, responses, scores; higher is better) of a row without a ranking_problem."""
    if fmt == "ultrafeedback":
        completions = row["completions"]
        return (row["instruction"], [c["response"] for c in completions],
                [float(c[keys.uf_score]) for c in completions])
    if keys.scores in row:
        return row[keys.prompt], list(row[keys.responses]), [float(v) for v in row[keys.scores]]
    return row[keys.prompt], list(row[keys.responses]), [-float(v) for v in row[keys.ranks]]


def ranking_status(responses: list[str], scores: list[float]) -> str:
    """A drop reason for a well-formed row that teaches nothing, or "" for a row that is used."""
    if any(not r.strip() for r in responses):
        return "empty_response"
    if len(set(scores)) == 1:
        return "all_responses_tied"
    return ""


DROP_REASONS = ("malformed", "empty_response", "all_responses_tied", "identical_responses")


def prompt_text(tok, prompt: Any, responses: list[str]) -> tuple[str, list[str]]:
    """(prompt text, response texts): a messages prompt takes each response as the assistant's turn,
    rendered with the chat template (as score_texts renders (prompt messages, response))."""
    if isinstance(prompt, str):
        return prompt, list(responses)
    if not getattr(tok, "chat_template", None):
        raise DataError("the prompt is a list of messages, and the tokenizer has no chat template to render it "
                        "with; pass --chat_template FILE (a Jinja template), or give the prompt as text")
    return render_messages(tok, prompt, [[{"role": "assistant", "content": r}] for r in responses])


class RankingReader(RowReader):
    """Ranking rows for data.sources and rm-eval (base.RowReader): the scores label, rows of K responses."""

    drop_reasons = DROP_REASONS
    labels = {"scores": "floats"}

    def __init__(self, tok, d, work_dir: str | None = None, keys: RankingKeys | None = None) -> None:
        super().__init__(tok, d, work_dir)
        self.keys = keys or RankingKeys(prompt=d.prompt_key, uf_score=d.ranking_score)
        self.layout = RankingLayout(self.keys)

    def parse(self, row: dict, fmt: str) -> tuple[tuple[str, list[str]], dict[str, Any], str]:
        prompt, responses, scores = ranking_texts(row, fmt, self.keys)
        return prompt_text(self.tok, prompt, responses), {"scores": scores}, ranking_status(responses, scores)

    def status(self, enc: Encoded, texts: tuple[str, list[str]], before: str) -> str:
        """A row whose responses are all one sequence (the same text, or the same after the cut) ranks
        nothing: dropped, as a pair that is identical is."""
        seqs = enc.cut.seqs
        return before or ("identical_responses" if all(x == seqs[0] for x in seqs[1:]) else enc.note)
