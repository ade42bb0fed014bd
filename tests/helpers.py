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


def pdss_settings(root: Path, **changes):
    """pdss settings for one site on ROOT/task (generated) with the base model in ROOT/base."""
    from common.settings import RunSettings

    return RunSettings.from_flat({"mode": "pdss", "clients": 1, "min-clients": 1, "data-dir": str(root / "task"),
                                  "model-dir": str(root / "base"), **changes})


def pdss_site(root: Path, ledger_path: Path, budget: float):
    """Site client_0 of ROOT/task, its ledger at ``ledger_path``."""
    from client.dp_lora import Site

    train = root / "task" / "client_0" / "train.jsonl"
    return Site("client_0", train, train.with_name("heldout.jsonl"), ledger_path, budget, root / "base")


def pdss_task(root: Path, seed: int, public_records: int, train_per_client: int, canaries: int) -> Path:
    """ROOT/task: a one-site generated arithmetic task; ROOT/base: a tiny model briefly warmed on its
    public split (its tokenizer too), as a site's public base model."""
    from common.data.arithmetic import generate_task
    from common.models.warmup import warmup_teacher

    generate_task(root / "task", n_clients=1, seed=seed, public_records=public_records,
                  train_per_client=train_per_client, heldout_per_client=4, canaries_per_client=canaries)
    public = [json.loads(line) for line in (root / "task" / "public.jsonl").read_text().splitlines()]
    texts = [f"predict: {r['question']}\n{r['answer']}\nexplain: {r['rationale']}" for r in public]
    warmup_teacher(texts, root / "base", spec="tiny-gpt2", steps=10, progress=False)
    return root
