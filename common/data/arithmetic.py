"""The offline pdss task: short arithmetic word problems with names and amounts.

question  "Mia has 3 pears. Omar gives her 4 more. How many pears does Mia have now?"
rationale "3 + 4 = 7"            (the computation; public records carry it, private ones do not)
answer    "7"

Names and amounts are the private tokens (leakage counts how many survive perturbation); some
private training records also carry a canary, a secret PIN in the question ("Mia's PIN is 4 8 1
9."), listed in canaries.json for the leakage metric. Everything else in a question comes from a
small public template vocabulary: :data:`TEMPLATE_WORDS`, the default pass-through allow-list.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from common.atomic import atomic_write_bytes, atomic_write_json

NAMES = ["Mia", "Omar", "Lena", "Ravi", "Zoe", "Ivan", "Nora", "Kofi", "Ada", "Luis", "Emma", "Yuki", "Sam",
         "Tara", "Ben", "Aisha", "Leo", "Ines", "Hugo", "Maya"]
ITEMS = ["apples", "pears", "pens", "books", "cards", "coins", "shells", "stamps", "eggs", "balls"]
TEMPLATES = [
    ("{a_name} has {x} {item}. {b_name} gives {pron} {y} more. How many {item} does {a_name} have now?", "+"),
    ("{a_name} had {x} {item} and gave {y} to {b_name}. How many {item} does {a_name} have left?", "-"),
    ("{a_name} buys {x} bags with {y} {item} in each bag. How many {item} does {a_name} buy?", "*"),
]
# The template's own words (public): the default allow-list of tokens that pass through.
TEMPLATE_WORDS = ["has", "gives", "her", "him", "more", "How", "many", "does", "have", "now", "had", "and",
                  "gave", "to", "left", "buys", "bags", "with", "in", "each", "bag", "buy", ".", "?", "PIN", "is", "'s", *ITEMS]
PRONOUN = {n: ("her" if n in {"Mia", "Lena", "Zoe", "Nora", "Ada", "Emma", "Yuki", "Tara", "Aisha", "Ines", "Maya"}
               else "him") for n in NAMES}


def make_problem(rng: random.Random) -> dict:
    template, op = rng.choice(TEMPLATES)
    a_name, b_name = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    if op == "+":
        x, y = rng.randint(1, 9), rng.randint(1, 9)
        value = x + y
    elif op == "-":
        x = rng.randint(2, 18)
        y = rng.randint(1, x - 1)
        value = x - y
    else:
        x, y = rng.randint(2, 5), rng.randint(2, 5)
        value = x * y
    question = template.format(a_name=a_name, b_name=b_name, item=item, x=x, y=y, pron=PRONOUN[b_name])
    return {"question": question, "rationale": f"{x} {op} {y} = {value}", "answer": str(value),
            "private_tokens": [a_name, *([b_name] if "{b_name}" in template else []), str(x), str(y)]}


def add_pin(problem: dict, rng: random.Random) -> str:
    """Prefix "<name>'s PIN is d d d d." to the question; returns the PIN (a canary's secret)."""
    secret = " ".join(str(rng.randint(0, 9)) for _ in range(4))
    problem["question"] = f"{problem['private_tokens'][0]}'s PIN is {secret}. " + problem["question"]
    problem["private_tokens"] = [*problem["private_tokens"], *secret.split()]
    return secret


def generate_task(out: str | Path, n_clients: int = 3, seed: int = 0, public_records: int = 400,
                  train_per_client: int = 60, heldout_per_client: int = 20, canaries_per_client: int = 2) -> dict:
    """Write public.jsonl (with rationales), client_i/{train,heldout}.jsonl (question, answer) and
    canaries.json. The same seed writes byte-identical files."""
    out = Path(out)
    rng = random.Random(seed)
    files = {"public": "public.jsonl", "clients": [], "canaries": "canaries.json"}
    public = [make_problem(rng) for _ in range(public_records)]
    for problem in public[::10]:  # the PIN wrapper is public too (with made-up PINs): same distribution
        add_pin(problem, rng)
    _write(out / "public.jsonl", [{k: p[k] for k in ("question", "rationale", "answer")} for p in public])
    canaries, private_tokens = [], {}
    for i in range(n_clients):
        train = [make_problem(rng) for _ in range(train_per_client)]
        for j in range(min(canaries_per_client, len(train))):
            canaries.append({"client": i, "record": j, "secret": add_pin(train[j], rng)})
        heldout = [make_problem(rng) for _ in range(heldout_per_client)]
        for split, rows in (("train", train), ("heldout", heldout)):
            _write(out / f"client_{i}" / f"{split}.jsonl", [{"question": r["question"], "answer": r["answer"]}
                                                            for r in rows])
            private_tokens[f"client_{i}/{split}"] = [r["private_tokens"] for r in rows]
        files["clients"].append({"train": f"client_{i}/train.jsonl", "heldout": f"client_{i}/heldout.jsonl"})
    # Kept for the metrics only (what a prompt's private tokens are); never read by a site.
    atomic_write_json(out / "canaries.json", {"canaries": canaries, "private_tokens": private_tokens})
    manifest = {"task": "arithmetic", "seed": seed, "files": files,
                "counts": {"public": public_records, "train_per_client": train_per_client,
                           "heldout_per_client": heldout_per_client, "canaries": len(canaries)}}
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode("utf-8"))
