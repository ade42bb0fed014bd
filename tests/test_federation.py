"""Federated DP-LoRA end to end in Flower's Simulation Engine (real ServerApp/ClientApp, Ray)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from client.wire_log import wire_capture_mod
from common.audit.run import run_audit
from common.cli import main
from common.data.loading import load_records
from common.privacy.ledger import PrivacyLedger
from common.settings import RunSettings
from server.checkpoint import RunDirectory
from simulations.run import prepare_run, simulate
from tests.conftest import fed_overrides
from tests.wirecheck import find_leaks

CONFIG = Path(__file__).resolve().parents[1] / "simulations" / "configs" / "dp-lora.toml"


def _settings(root, run_dir, resume=False, **changes):
    return prepare_run(RunSettings.from_toml(CONFIG, fed_overrides(root, **changes)), run_dir, resume)


def _charges(ledger_path):
    return [e["charge_id"] for e in PrivacyLedger.load(ledger_path).entries]


def test_three_clients_two_rounds_improve_and_leak_nothing(fed_root, tmp_path):
    run_dir, wire = tmp_path / "run", tmp_path / "wire"
    state = simulate(_settings(fed_root, run_dir, name="e2e"), client_mods=(wire_capture_mod(wire),))

    assert state["completed_round"] == 2
    run = RunDirectory(run_dir)
    first, last = run.load_adapter("adapters/round_0.safetensors"), run.load_adapter(state["adapter"])
    assert any(not np.allclose(first[k], last[k]) for k in first), "the global adapter did not change"
    assert state["rounds"][-1]["evaluate"]["perplexity"] < state["baseline"]["perplexity"]
    assert all(r["valid"] == 3 and not r["dropouts"] and not r["rejected"] for r in state["rounds"])
    for i in range(3):
        ledger = PrivacyLedger.load(run_dir / "ledgers" / f"client_{i}.json")
        assert _charges(ledger.path) == ["e2e/round-1", "e2e/round-2"]
        assert 0 < ledger.spent_epsilon() <= 8.0
        assert state["rounds"][-1]["epsilon"][f"client_{i}"] == pytest.approx(ledger.spent_epsilon())

    # The round table: baseline = the round-0 model, round k = the model round k produced, each
    # scored on all three sites' held-out splits (round k's figure came with round k+1's train
    # replies, the last round's from the one final evaluate message).
    from client.dp_lora import heldout_perplexity

    settings = RunSettings.from_flat(state["settings"])
    for k, figure in enumerate([state["baseline"]] + [r["evaluate"] for r in state["rounds"]]):
        adapter = run.load_adapter(f"adapters/round_{k}.safetensors")
        scores = [heldout_perplexity(fed_root / "teacher", fed_root / "corpus" / f"client_{i}" / "heldout.jsonl",
                                     settings.dp, adapter) for i in range(3)]
        expected = np.exp(sum(n * np.log(p) for p, n in scores) / sum(n for _, n in scores))
        assert figure["clients"] == 3 and figure["perplexity"] == pytest.approx(expected, rel=1e-6), k

    # Wire: every message in and out of every site, in Flower's own encoding. One message per
    # site and round (train, carrying the held-out evaluation of the incoming adapter), and
    # one final evaluate message: R + 1 exchanges per site, where there were 2R + 1.
    payloads = {p.name: p.read_bytes() for p in sorted(wire.glob("*.bin"))}
    assert len(payloads) == 2 * 3 * (2 + 1)  # in+out × sites × (train rounds + the final evaluation)
    corpus = fed_root / "corpus"
    texts = [r.text for i in range(3) for split in ("train", "heldout")
             for r in load_records(corpus / f"client_{i}" / f"{split}.jsonl")]
    texts += [c["text"] for c in json.loads((corpus / "canaries.json").read_text())["canaries"]]
    tokenizer = AutoTokenizer.from_pretrained(fed_root / "teacher")
    assert find_leaks(payloads, texts, tokenizer) == []
    # The checker itself finds planted leaks (text, and token ids packed as int64).
    ids = tokenizer(texts[5], add_special_tokens=False)["input_ids"]
    planted = {"text": b"xx" + texts[3][10:60].encode() + b"yy", "ids": b"\x01" + np.array(ids, np.int64).tobytes()}
    found = find_leaks(planted, texts, tokenizer)
    assert any(f.startswith("text:") for f in found) and any(f.startswith("ids:") for f in found)

    # The audit works on the run directory the product wrote.
    report = run_audit(run_dir, max_records=40, candidates=50, block_seeds=(0,), progress=False)
    assert [m["label"] for m in report["models"]][0] == "public warm-up (floor)"
    assert report["models"][1]["epsilon"] == pytest.approx(max(state["rounds"][-1]["epsilon"].values()))
    assert {0, 1, 4, 16} <= set(report["models"][1]["exposure"])
    assert len(report["models"][1]["blocks"]) == 2
    for name in ("audit.json", "audit.md", "roc.png", "blocks.png", "privacy_card.md"):
        assert (run_dir / name).is_file(), name
    assert "audit.md" in (run_dir / "privacy_card.md").read_text()


def test_client_failure_counts_as_dropout_and_is_not_charged(fed_root, tmp_path):
    # Also runs with user-level central DP clipped at the sites (Flower's client-side wrapper +
    # fixedclipping_mod, the server checking every norm ≤ C) and the server ledger, which must
    # survive a dropout too.
    run_dir = tmp_path / "run"
    state = simulate(_settings(fed_root, run_dir, name="faulty", **{
        "fail-client": "client_1", "fail-round": 1, "central-dp": True, "central-noise-multiplier": 2.0,
        "central-clip": 0.05, "central-epsilon": 20.0, "central-clip-at": "site"}))
    assert state["completed_round"] == 2
    first, second = state["rounds"]
    assert not first["rejected"] and not second["rejected"]  # every site clipped to C
    assert first["valid"] == 2 and len(first["dropouts"]) == 1 and "fault injected" in first["dropouts"][0]["reason"]
    assert second["valid"] == 3 and not second["dropouts"]
    assert _charges(run_dir / "ledgers" / "client_1.json") == ["faulty/round-2"]
    assert _charges(run_dir / "ledgers" / "client_0.json") == ["faulty/round-1", "faulty/round-2"]
    server = PrivacyLedger.load(run_dir / "server_ledger.json")
    assert _charges(server.path) == ["faulty/round-1", "faulty/round-2"]
    assert second["user_level_epsilon"] == pytest.approx(server.spent_epsilon()) and server.spent_epsilon() <= 20.0


def test_thirty_percent_random_failures_over_five_rounds(fed_root, tmp_path):
    run_dir = tmp_path / "run"
    settings = _settings(fed_root, run_dir, name="flaky", rounds=5, **{"min-clients": 1, "local-steps": 2,
                                                                       "fail-fraction": 0.3, "seed": 11})
    state = simulate(settings)
    assert state["completed_round"] == 5
    failed = {i: set() for i in range(3)}
    for record in state["rounds"]:
        for dropout in record["dropouts"]:
            match = re.search(r"fault injected: client_(\d+) fails in round (\d+)", dropout["reason"])
            assert match and int(match.group(2)) == record["round"], dropout
            failed[int(match.group(1))].add(record["round"])
        assert record["valid"] + len(record["dropouts"]) == 3
    assert 0 < sum(map(len, failed.values())) < 15
    for i in range(3):  # a site is charged exactly for the rounds it finished
        expected = [f"flaky/round-{r}" for r in range(1, 6) if r not in failed[i]]
        assert _charges(run_dir / "ledgers" / f"client_{i}.json") == expected


def test_server_killed_mid_run_resumes_and_charges_each_round_once(fed_root, tmp_path):
    run_dir = tmp_path / "run"
    sets = [f"{k}={v}" for k, v in fed_overrides(fed_root, name="killed", rounds=3).items()]
    command = [sys.executable, "-m", "common.cli", "simulate", "--config", str(CONFIG), "--run-dir", str(run_dir)]
    for item in sets:
        command += ["--set", item]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "TQDM_DISABLE": "1"})
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if RunDirectory(run_dir).exists() and RunDirectory(run_dir).load_state()["completed_round"] >= 1:
                break
            assert process.poll() is None, "the simulation ended before round 1 completed"
            time.sleep(0.5)
        else:
            pytest.fail("round 1 did not complete in time")
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the server and its whole process group, mid-run
        process.wait()
    assert RunDirectory(run_dir).load_state()["completed_round"] < 3

    rc = main(["simulate", "--config", str(CONFIG), "--run-dir", str(run_dir), "--resume"] +
              [arg for item in sets for arg in ("--set", item)])
    assert rc == 0
    state = RunDirectory(run_dir).load_state()
    assert state["completed_round"] == 3 and [r["round"] for r in state["rounds"]] == [1, 2, 3]
    figures = [state["baseline"]] + [r["evaluate"] for r in state["rounds"]]  # every round's figure filled
    assert all(f["perplexity"] and f["clients"] == 3 and not f.get("pending") for f in figures), figures
    for i in range(3):
        charges = _charges(run_dir / "ledgers" / f"client_{i}.json")
        assert charges == ["killed/round-1", "killed/round-2", "killed/round-3"]


def test_bad_config_fails_before_any_process_starts(fed_root, tmp_path, capsys):
    for sets, message in ((["mode=magic"], "unknown mode"), (["epsilon=0"], "epsilon must be a positive"),
                          (["data-dir=/nonexistent/corpus", "generate-data=false"], "missing data file"),
                          (["clients=2", "min-clients=3"], "min-clients (3) is larger than clients (2)")):
        argv = ["simulate", "--config", str(CONFIG), "--run-dir", str(tmp_path / "never"),
                "--set", f"model-dir={fed_root / 'teacher'}"]
        for item in sets:
            argv += ["--set", item]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert not (tmp_path / "never" / "state.json").exists()
