"""The generated pdss task: deterministic, solvable from its rationale, private tokens where said."""

from __future__ import annotations

import json
import re

from common.data.arithmetic import TEMPLATE_WORDS, generate_task
from common.data.task import load_task


def test_task_files_are_deterministic_and_consistent(tmp_path):
    for out in ("a", "b"):
        generate_task(tmp_path / out, n_clients=2, seed=1, public_records=50, train_per_client=10,
                      heldout_per_client=3, canaries_per_client=2)
    files = ["public.jsonl", "client_0/train.jsonl", "client_1/heldout.jsonl", "canaries.json"]
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    public = load_task(tmp_path / "a" / "public.jsonl")
    for r in public:  # the rationale is the computation, the answer its result
        x, op, y, _, value = r.rationale.split()
        assert int(value) == {"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y)}[op]
        assert value == r.answer and x in r.question and y in r.question
    private = load_task(tmp_path / "a" / "client_0" / "train.jsonl")
    assert all(r.rationale is None for r in private)  # sites hold question → answer only
    truth = json.loads((tmp_path / "a" / "canaries.json").read_text())
    assert len(truth["canaries"]) == 4
    for words, r in zip(truth["private_tokens"]["client_0/train"], private):
        assert set(words) <= set(re.findall(r"\w+", r.question))  # every private token is in its question
        assert not set(words) & set(TEMPLATE_WORDS)
    first = truth["canaries"][0]
    assert f"PIN is {first['secret']}." in private[first["record"]].question
