"""The distildp pipeline end to end in Flower's Simulation Engine (real ServerApp/ClientApp, Ray):
federated DP teacher → DP label histogram → synthetic text → student KD → federated
evaluation → export → audit. One pipeline run is shared by most tests (session fixture)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from client.wire_log import wire_capture_mod
from common.cli import main
from common.models.lm import encode_texts, perplexity
from common.models.loading import build_student, load_teacher
from common.privacy.ledger import PrivacyLedger, ledger_paths
from common.settings import RunSettings
from server.checkpoint import RunDirectory
from server.pipeline import PIPELINES
from simulations.run import prepare_run, simulate
from tests.conftest import fed_overrides
from tests.wirecheck import run_leaks

CONFIG = Path(__file__).resolve().parents[1] / "simulations" / "configs" / "distildp.toml"


def distildp_overrides(root, **changes) -> dict:
    """3 sites × 2 rounds on the session corpus; a from-teacher student; a few dozen KD steps."""
    return fed_overrides(root, **{"name": "kd", "mode": "distildp", "label-field": "label",
                                  "synthetic-records": 120, "gen-max-new-tokens": 40, "gen-batch-size": 32,
                                  "shard-size": 40, "student": "from-teacher", "kd-beta": 0.5,
                                  "distill-steps": 40, "distill-batch-size": 16, "distill-checkpoint-every": 10,
                                  "distill-learning-rate": 0.002, "audit-max-records": 40, "audit-candidates": 50,
                                  **changes})


def _settings(root, run_dir, resume=False, **changes):
    return prepare_run(RunSettings.from_toml(CONFIG, distildp_overrides(root, **changes)), run_dir, resume)


@pytest.fixture(scope="session")
def distildp_run(fed_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("distildp")
    run_dir, wire = base / "run", base / "wire"
    state = simulate(_settings(fed_root, run_dir), client_mods=(wire_capture_mod(wire),))
    return {"run": run_dir, "wire": wire, "state": state, "root": fed_root}


def _charges(path):
    return [e["charge_id"] for e in PrivacyLedger.load(path).entries]


def test_every_phase_completes_in_order(distildp_run):
    state = distildp_run["state"]
    assert set(state["phases"]) == set(PIPELINES["distildp"]) == {
        "teacher-rounds", "label-histogram", "synthesis", "distillation", "student-evaluation", "export"}
    assert all(p["complete"] for p in state["phases"].values())
    assert state["completed_round"] == 2
    assert state["phases"]["label-histogram"]["sites"] == 3
    assert state["phases"]["distillation"]["steps"] == 40
    for i in range(3):  # the teacher's rounds and one histogram per site, nothing else
        assert _charges(distildp_run["run"] / "ledgers" / f"client_{i}.json") == [
            "kd/round-1", "kd/round-2", "kd/label-histogram"]


def test_synthetic_corpus_is_clean_and_label_free(distildp_run):
    rows = [json.loads(line) for p in sorted((distildp_run["run"] / "synthetic").glob("shard_*.jsonl"))
            for line in p.read_text().splitlines()]
    assert len(rows) == 120
    texts = [r["text"] for r in rows]
    assert len(set(texts)) == len(texts) and all(t.strip() for t in texts)
    labels = json.loads((distildp_run["root"] / "corpus" / "manifest.json").read_text())["categories"]
    assert {r["label"] for r in rows} <= set(labels)
    assert not any(t.startswith(f"{r['label']}\n\n") for t, r in zip(texts, rows))  # control code stripped


def test_student_learns_and_is_smaller(distildp_run):
    state, run_dir = distildp_run["state"], distildp_run["run"]
    evaluation = state["phases"]["student-evaluation"]
    student_ppl = evaluation["student"]["heldout_perplexity"]
    assert math.isfinite(student_ppl) and evaluation["student"]["sites"] == 3
    distill = state["phases"]["distillation"]
    assert distill["student_parameters"] < distill["teacher_parameters"]
    # The same student before distillation (every other teacher block, untrained as a 1-block model).
    settings = RunSettings.from_flat(state["settings"])
    teacher, tokenizer = load_teacher(settings.model_dir, settings.dp, run_dir / state["adapter"])
    untrained = build_student("from-teacher", teacher, tokenizer).eval()
    from client.dp_lora import load_texts

    texts = [t for i in range(3) for t in load_texts(Path(settings.data_dir) / f"client_{i}" / "heldout.jsonl",
                                                       settings.dp)]
    before = perplexity(untrained, encode_texts(texts, tokenizer, settings.dp.max_length))
    assert student_ppl < before


def test_exported_student_loads_generates_and_states_its_guarantee(distildp_run):
    run_dir = distildp_run["run"]
    out = run_dir / "student"
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("billing\n\n", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    card = json.loads((out / "privacy.json").read_text())
    ledgers = [PrivacyLedger.load(p) for p in ledger_paths(run_dir / "ledgers")]
    assert card["privacy"]["epsilon"] == pytest.approx(max(l.spent_epsilon() for l in ledgers))
    assert card["privacy"]["delta"] == pytest.approx(max(l.delta for l in ledgers))
    mechanisms = {m["mechanism"] for site in card["privacy"]["sites"] for m in site["mechanisms"]}
    assert any("DP-SGD" in m for m in mechanisms) and any("histogram" in m for m in mechanisms)
    readme = (out / "README.md").read_text()
    assert "library_name: transformers" in readme and f"{card['privacy']['epsilon']:.3f}" in readme
    assert card["audit"] and {r["label"] for r in card["audit"]["models"]} >= {"student", "public warm-up (floor)"}


def test_nothing_private_leaves_a_site_or_is_exported(distildp_run):
    root, run_dir = distildp_run["root"], distildp_run["run"]
    assert run_leaks(root / "corpus", root / "teacher", distildp_run["wire"], run_dir / "student") == []
    histogram = json.loads((run_dir / "ledgers" / "client_0.releases" / "kd-label-histogram.json").read_text())
    card = (run_dir / "student" / "privacy.json").read_text() + (run_dir / "student" / "README.md").read_text()
    assert not any(f"{c:.3f}" in card for c in histogram["counts"])  # no label count is published


def test_killed_synthesis_and_distillation_resume_to_the_same_result(distildp_run, tmp_path):
    # A copy of the finished run, rewound to just after the label histogram.
    run_dir = tmp_path / "run"
    shutil.copytree(distildp_run["run"], run_dir)
    for name in ("synthetic", "distill", "student"):
        shutil.rmtree(run_dir / name)
    run = RunDirectory(run_dir)
    state = run.load_state()
    state["phases"] = {k: v for k, v in state["phases"].items() if k in ("teacher-rounds", "label-histogram")}
    run.commit(state)
    before = {p.name: _charges(p) for p in ledger_paths(run_dir / "ledgers")}
    root = distildp_run["root"]

    with pytest.raises(Exception, match="fault injected: synthesis"):
        simulate(_settings(root, run_dir, True, **{"fail-phase": "synthesis", "fail-phase-after": 1, "audit": False}))
    assert len(list((run_dir / "synthetic").glob("shard_*.jsonl"))) == 1
    with pytest.raises(Exception, match="fault injected: distillation"):
        simulate(_settings(root, run_dir, True, **{"fail-phase": "distillation", "fail-phase-after": 20,
                                                   "audit": False}))
    assert json.loads((run_dir / "distill" / "checkpoint.json").read_text())["step"] == 20
    state = simulate(_settings(root, run_dir, True, audit=False))

    assert state["phases"]["export"]["complete"]
    original = distildp_run["state"]["phases"]
    assert state["phases"]["distillation"]["steps"] == original["distillation"]["steps"] == 40
    rows = lambda d: [line for p in sorted((d / "synthetic").glob("shard_*.jsonl"))  # noqa: E731
                      for line in p.read_text().splitlines()]
    assert rows(run_dir) == rows(distildp_run["run"])  # same records, same texts
    after_loss = state["phases"]["distillation"]["final_loss"]
    assert after_loss == pytest.approx(original["distillation"]["final_loss"], rel=1e-4)
    assert {p.name: _charges(p) for p in ledger_paths(run_dir / "ledgers")} == before  # no extra charge


def test_distill_command_turns_a_dp_lora_run_into_a_student(distildp_run, tmp_path):
    # A finished dp-lora run: the teacher phase of the shared run, as a dp-lora run directory.
    run_dir = tmp_path / "lora"
    shutil.copytree(distildp_run["run"], run_dir, ignore=shutil.ignore_patterns("synthetic", "distill", "student"))
    run = RunDirectory(run_dir)
    state = run.load_state()
    state["phases"] = {"teacher-rounds": state["phases"]["teacher-rounds"]}
    state["settings"]["mode"] = "dp-lora"
    run.commit(state)
    rc = main(["distill", "--run", str(run_dir), "--set", "label-source=public", "--set", "distill-steps=10",
               "--set", "synthetic-records=40", "--set", "audit=false"])
    assert rc == 0
    state = run.load_state()
    assert state["phases"]["label-histogram"]["source"] == "public"
    assert state["phases"]["distillation"]["steps"] == 10
    assert (run_dir / "student" / "config.json").is_file()
    assert _charges(run_dir / "ledgers" / "client_0.json") == ["kd/round-1", "kd/round-2", "kd/label-histogram"]


@pytest.mark.parametrize("sets, message", [
    (["mode=distilpd"], "did you mean 'distildp'"),
    (["kd-lambda=1.5"], "kd-lambda must be in [0, 1]"),
    (["kd-beta=-1"], "kd-beta must be ≥ 0"),
    (["kd-temperature=0"], "kd-temperature must be > 0"),
    (["kd-lamda=0.3"], "did you mean 'kd-lambda'"),
    (["label-field=department"], "has no 'department' field"),
    (["label-source=private"], "label-source must be one of"),
])
def test_bad_distildp_config_is_one_line_before_any_work(fed_root, tmp_path, capsys, sets, message):
    argv = ["simulate", "--config", str(CONFIG), "--run-dir", str(tmp_path / "never")]
    for key, value in distildp_overrides(fed_root).items():
        argv += ["--set", f"{key}={value}"]
    for item in sets:
        argv += ["--set", item]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "never" / "state.json").exists()


def test_distill_refuses_missing_or_unfinished_runs(distildp_run, tmp_path, capsys):
    assert main(["distill", "--run", str(tmp_path / "nothing")]) == 2
    assert "no state.json" in capsys.readouterr().err
    run_dir = tmp_path / "half"
    shutil.copytree(distildp_run["run"], run_dir, ignore=shutil.ignore_patterns("synthetic", "distill", "student"))
    state = RunDirectory(run_dir).load_state()
    state["completed_round"], state["phases"] = 1, {}
    RunDirectory(run_dir).commit(state)
    assert main(["distill", "--run", str(run_dir)]) == 2
    assert "finished 1 of 2 rounds" in capsys.readouterr().err


def test_tokenizer_mismatch_names_both(fed_root, tmp_path):
    from tests.helpers import save_tiny_model

    other = save_tiny_model(tmp_path / "other")  # a different vocabulary (512 tokens)
    teacher, tokenizer = load_teacher(fed_root / "teacher", RunSettings().dp, None)
    with pytest.raises(Exception, match="tokenizer mismatch.*teacher.*student"):
        build_student(str(other), teacher, tokenizer)
    assert torch.is_tensor(next(teacher.parameters()))


def test_label_histogram_is_released_once(distildp_run, tmp_path):
    # A repeated request (e.g. a resumed server) re-sends the same noisy counts and charges nothing.
    from client.dp_lora import Site
    from client.label_histogram import release_histogram

    run_dir = tmp_path / "run"
    shutil.copytree(distildp_run["run"] / "ledgers", run_dir / "ledgers")
    settings = RunSettings.from_flat(distildp_run["state"]["settings"])
    corpus = distildp_run["root"] / "corpus" / "client_0"
    ledger_path = run_dir / "ledgers" / "client_0.json"
    site = Site("client_0", corpus / "train.jsonl", corpus / "heldout.jsonl", ledger_path, settings.site_budget(),
                Path(settings.model_dir))
    saved = json.loads((run_dir / "ledgers" / "client_0.releases" / "kd-label-histogram.json").read_text())
    before = PrivacyLedger.load(ledger_path).entries
    counts, refusal = release_histogram(site, settings, saved["labels"], "kd")
    assert refusal == "" and counts == saved["counts"]
    assert PrivacyLedger.load(ledger_path).entries == before
    # Another run asking the same site: its budget (ε + histogram-ε, planned for run "kd") is nearly
    # spent, so it refuses before computing anything, with the figures, and nothing is charged.
    # Gaussian mechanisms compose sub-additively (a small one adds little), so ask for a large one.
    settings.synthesis.histogram_epsilon = 8.0
    counts, refusal = release_histogram(site, settings, saved["labels"], "kd-again")
    assert counts == [] and "over the budget" in refusal
    assert PrivacyLedger.load(ledger_path).entries == before
