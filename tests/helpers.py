"""Small builders shared by tests: a tiny tokenizer and saved tiny models (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

from common.models.build import build_model
from common.models.tokenizer import train_tokenizer

SAMPLE_TEXTS = [
    "Ticket 1042: customer Maria Lopez reports a declined card payment of $84.20 on 2024-03-02.",
    "Agent note: account 4410928833 was locked after three failed logins; identity verified by phone.",
    "Patient John Carter, MRN 55120, seen for follow-up of hypertension; lisinopril 10 mg daily.",
    "the account number of Alice Smith is 0193847562",
    "Customer asks why a wire transfer of $1,250.00 is pending since Monday; escalated to payments.",
    "Refund of the duplicate charge approved; the customer was informed by email on 2024-05-14.",
] * 8


def tiny_tokenizer(vocab_size: int = 512):
    return train_tokenizer(SAMPLE_TEXTS, vocab_size=vocab_size, min_frequency=1)


def save_tiny_model(out_dir: Path, spec: str = "tiny-gpt2") -> Path:
    """A randomly initialised tiny model + tokenizer saved like a warmed-up teacher."""
    tokenizer = tiny_tokenizer()
    model = build_model(spec, tokenizer, seed=0)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path
