"""Demo assets made locally (the HF Hub is not needed): a synthetic preference set, a word-level
tokenizer trained with `tokenizers`, and a tiny Llama-shaped config, all saved like real checkpoints.

    python -m rm_trainer.demo demo_out/assets

The preference signal is learnable but not trivial: both responses are built from the same neutral
words; chosen carries more "helpful" than "harmful" words and rejected the reverse, in random
positions, so the model must aggregate over the whole response through attention.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NEUTRAL = ("the a it this that answer here is of to and in for you can we your some more about "
           "step first then next also thing way idea point part case").split()
HELPFUL = "clear kind accurate safe helpful honest careful useful correct polite".split()
HARMFUL = "rude wrong unsafe harmful dishonest careless useless insulting false sloppy".split()
TOPICS = "cooking travel math history music code health garden money sport".split()


def _response(rng: random.Random, good: int, bad: int) -> str:
    words = [rng.choice(NEUTRAL) for _ in range(rng.randint(4, 10))]
    words += [rng.choice(HELPFUL) for _ in range(good)] + [rng.choice(HARMFUL) for _ in range(bad)]
    rng.shuffle(words)
    return " " + " ".join(words)


def make_pairs(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        prompt = f"Human: tell me about {topic} please Assistant:"
        hi = rng.randint(1, 3)
        lo = hi - 1  # chosen has one more helpful (and one fewer harmful) word than rejected
        rows.append({"prompt": prompt, "chosen": _response(rng, hi, lo), "rejected": _response(rng, lo, hi)})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 2000, kind: str = "word"):
    """Train a tokenizer on `texts` and save it with save_pretrained, as a real checkpoint ships it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<pad>", "<s>", "</s>"]
    if kind == "word":
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=special)
    else:  # byte-level BPE, like GPT-2/Llama-3 tokenizers
        from tokenizers import decoders

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out_dir)
    return fast


# Chat templates in the two common families, for tokenizer_variant: Llama-3-like (the template writes BOS,
# turns end with an end-of-turn token) and Llama-2/Mistral-like (assistant turns end with EOS itself).
CHAT_TEMPLATES = {
    "chat": ("{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|eot|>{% endfor %}"
             "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"),
    "chat_eos": ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                 "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"),
}
TOKENIZER_STYLES = ("plain", "bos", "pad_eos", "chat", "chat_eos")


def tokenizer_variant(texts: list[str], out_dir: Path, style: str, vocab_size: int = 1000):
    """A byte-level BPE trained on `texts` in one of the special-token styles real backbones ship with,
    saved to out_dir:
      plain     no special tokens added (GPT-2, Qwen-like)
      bos       BOS added to every text (Llama, Mistral, Gemma-like)
      pad_eos   no pad token of its own: pad = EOS (Llama-3-like base models)
      chat      BOS added, and a chat template that writes BOS and ends turns with <|eot|> (Llama-3-like)
      chat_eos  BOS added, and a chat template whose assistant turns end with EOS itself (Llama-2-like)"""
    assert style in TOKENIZER_STYLES, style
    tok = train_tokenizer(texts, out_dir, vocab_size=vocab_size, kind="bpe")
    if style != "plain":
        tok.add_bos_token = style != "pad_eos"
        tok.init_kwargs["add_bos_token"] = tok.add_bos_token
    if style == "pad_eos":
        tok.pad_token = tok.eos_token
    if style.startswith("chat"):
        tok.add_special_tokens({"additional_special_tokens": ["<|start|>", "<|eot|>"]})
        tok.chat_template = CHAT_TEMPLATES[style]
    tok.save_pretrained(out_dir)
    return tok


def tiny_llama_config(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4,
                      max_pos: int = 512):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=max_pos, tie_word_embeddings=False, bos_token_id=2,
                       eos_token_id=3, pad_token_id=1)


def prepare(out: Path, n_train: int = 2048, n_test: int = 256, seed: int = 0) -> dict[str, str]:
    """Write data/{train,test}.jsonl and model/ (config.json + tokenizer) under `out`."""
    train, test = make_pairs(n_train, seed), make_pairs(n_test, seed + 1)
    write_jsonl(out / "data" / "train.jsonl", train)
    write_jsonl(out / "data" / "test.jsonl", test)
    texts = [r["prompt"] + r["chosen"] for r in train] + [r["prompt"] + r["rejected"] for r in train]
    tok = train_tokenizer(texts, out / "model")
    tiny_llama_config(len(tok)).save_pretrained(out / "model")
    return {"model": str(out / "model"), "train": str(out / "data" / "train.jsonl"),
            "test": str(out / "data" / "test.jsonl")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--n_train", type=int, default=2048)
    p.add_argument("--n_test", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(json.dumps(prepare(a.out, a.n_train, a.n_test, a.seed)))


if __name__ == "__main__":
    main()
