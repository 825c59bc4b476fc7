"""What the benchmarks share: the checkout and the real HH-RLHF pairs, a byte-level BPE trained locally on
them, a small Llama with real-model proportions, a free port, the environment of the child processes
they time, and the `--output` flag with the JSON printed and written at the end.

Every benchmark puts this folder and the checkout first on sys.path, so `import common` and
`import rm_trainer` measure this checkout.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_HH = Path(os.environ.get("RM_TRAINER_SHARED", ROOT.parent / "shared")) / "data" / \
    "hh-rlhf-harmless-base-test.jsonl.gz"
GIB = 1 << 30


def add_output(ap: argparse.ArgumentParser) -> None:
    """`--output FILE`: also write the result's JSON there (it is always printed)."""
    ap.add_argument("--output", "--out", dest="output", type=Path, default=None, help="also write the JSON here")


def finish(result: dict, output: Path | None, show: bool = True) -> dict:
    """Print the result's JSON (show=False: only write it, e.g. on ranks other than 0) and write it."""
    text = json.dumps(result, indent=2)
    if show:
        print(text, flush=True)
    if output is not None and show:
        output.write_text(text + "\n")
    return result


def hh_pairs() -> list[dict]:
    """The 2,312 real HH-RLHF pairs ({"chosen", "rejected"} full texts) from ../shared/data."""
    with gzip.open(SHARED_HH, "rt") as f:
        return [json.loads(line) for line in f]


def bpe_tokenizer(pairs: list[dict], out_dir: Path, vocab_size: int = 2000):
    """A byte-level BPE (like GPT-2's and Llama-3's) trained on the pairs' texts, saved to out_dir."""
    from rm_trainer.demo import train_tokenizer

    return train_tokenizer([r["chosen"] for r in pairs] + [r["rejected"] for r in pairs], out_dir,
                           vocab_size=vocab_size, kind="bpe")


def llama_config(vocab: int, hidden: int, layers: int, max_pos: int, tok=None):
    """A Llama with real-model proportions at a small size: head dim 64, GQA 4:1, MLP 2.6875 H (as
    Llama-3); special token ids from `tok` if given, else the demo tokenizer's."""
    from transformers import LlamaConfig

    ids = ({"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
           if tok is not None else {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 1})
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 256),
                       intermediate_size=int(hidden * 2.6875), max_position_embeddings=max_pos,
                       tie_word_embeddings=False, **ids)


def add_model_size(ap: argparse.ArgumentParser) -> None:
    """--hidden/--layers/--inter/--vocab: the measured Llama (default 0.3 B: 302.6 M parameters)."""
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=21)
    ap.add_argument("--inter", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)


def mid_size_assets(work: Path, a: argparse.Namespace) -> dict:
    """The demo's pairs and tokenizer under work/assets, with the model folder's config replaced by the
    Llama of add_model_size's flags (weights: --random_init, or save one from the config)."""
    from rm_trainer.demo import prepare, tiny_llama_config

    assets = prepare(work / "assets", n_train=64, n_test=8, seed=0)
    cfg = tiny_llama_config(a.vocab, hidden=a.hidden, layers=a.layers, heads=max(1, a.hidden // 64))
    cfg.intermediate_size = a.inter
    cfg.save_pretrained(assets["model"])
    return assets


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(threads: int = 1, **extra: str) -> dict[str, str]:
    """The environment of a timed child process: its torch threads, offline, no launcher variables."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1", **extra)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env
