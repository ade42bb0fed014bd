"""`privdistill compare` on tiny models: every cell through the real pipelines (Simulation Engine,
ledgers, export), a cut comparison resumed, and bad configs refused before anything runs.

One comparison is shared by the tests (session fixture): it is first cut in the distildp run's
distillation (fault injection), then resumed with one more method.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from common.cli import main
from common.errors import ConfigError
from common.privacy.ledger import PrivacyLedger, ledger_paths
from simulations.compare import load_comparison, run_comparison

CONFIG = Path(__file__).resolve().parents[1] / "simulations" / "configs" / "compare.toml"


def task_config(root) -> Path:
    """A tiny pdss config on a generated task (2 sites × 24 word problems) for the task rows."""
    from common.data.arithmetic import generate_task

    path = root / "pdss-task.toml"
    if not path.is_file():
        generate_task(root / "task", n_clients=2, seed=5, public_records=160, train_per_client=24,
                      heldout_per_client=8, canaries_per_client=2)
        values = {"name": "pdss", "mode": "pdss", "clients": 2, "rounds": 1, "min-clients": 2, "local-steps": 2,
                  "batch-size": 8, "max-length": 48, "data-dir": str(root / "task"), "generate-data": False,
                  "warmup-spec": "tiny-gpt2", "warmup-steps": 24, "student-warmup-steps": 8,
                  "teacher-max-new-tokens": 12, "round-timeout": 900.0}
        path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return path


def tiny(root, out, **changes) -> dict:
    """3 sites × 1 round on the session corpus (a user's directory), its teacher as a user's model."""
    return {"methods": ["distildp"], "out-dir": str(out), "data-dir": str(root / "corpus"), "generate-data": False,
            "task-config": str(task_config(root)), "prompt-tokens": 16,
            "teacher-model": str(root / "teacher"), "student-model": "tiny-gpt2", "student-warmup-steps": 20,
            "epsilons": [8.0], "seeds": [0], "clients": 3, "rounds": 1, "min-clients": 2, "local-steps": 3,
            "synthetic-records": 48, "gen-max-new-tokens": 32, "shard-size": 24, "distill-steps": 10,
            "distill-batch-size": 8, "distill-checkpoint-every": 5, "leakage-records": 20, "leakage-candidates": 20,
            **changes}


def _charges(run_dir: Path) -> dict:
    return {p.stem: [e["charge_id"] for e in PrivacyLedger.load(p).entries] for p in ledger_paths(run_dir / "ledgers")}


@pytest.fixture(scope="session")
def comparison(fed_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "cmp"
    first = load_comparison(CONFIG, tiny(fed_root, out, methods=["dp-sgd-student", "distildp"],
                                         **{"fail-phase": "distillation", "fail-phase-after": 5}))
    with pytest.raises(Exception, match="fault injected: distillation"):
        run_comparison(first)
    cut = {"cells": sorted(p.name for p in (out / "cells").glob("*_seed0.json")),
           "dpsgd_cell": (out / "cells" / "dp-sgd-student_eps8_seed0.json").read_text(),
           "dpsgd_state": (out / "runs" / "dpsgd_eps8_seed0" / "state.json").read_text(),
           "kd_charges": _charges(out / "runs" / "kd_eps8_seed0"),
           "kd_checkpoint": json.loads((out / "runs" / "kd_eps8_seed0" / "distill" / "checkpoint.json").read_text())}
    resumed = load_comparison(CONFIG, tiny(fed_root, out, methods=["dp-sgd-student", "distildp", "synthetic-hard",
                                                                   "dpkd", "pdss", "pdss-answer-only"]))
    document = run_comparison(resumed)
    return {"out": out, "cut": cut, "document": document}


def test_every_cell_has_finite_figures_and_the_ledgers_epsilon(comparison):
    out = comparison["out"]
    saved = json.loads((out / "compare.json").read_text())
    cells = {c["method"]: c for c in saved["cells"] if "accuracy" not in c}
    assert set(cells) == {"dp-sgd-student", "distildp", "synthetic-hard", "dpkd"}
    for method, cell in cells.items():
        for key in ("heldout_perplexity", "public_perplexity", "mia_auc_loss", "mia_auc_min_k", "exposure_16",
                    "wall_seconds"):
            assert isinstance(cell[key], float) and math.isfinite(cell[key]), (method, key, cell[key])
        assert 0 < cell["epsilon"] <= 8.0 + 1e-9 and 0 < cell["delta"] < 1e-3, method
        assert 0 <= cell["mia_auc_loss"] <= 1 and cell["parameters"] > 0
    # the student is the same architecture in every row; the ε is the ledgers', not the target
    assert len({c["parameters"] for c in cells.values()}) == 1
    kd_ledgers = [PrivacyLedger.load(p) for p in ledger_paths(out / "runs" / "kd_eps8_seed0" / "ledgers")]
    assert cells["distildp"]["epsilon"] == pytest.approx(max(l.spent_epsilon() for l in kd_ledgers))
    table = (out / "compare.md").read_text()
    assert all(f"| {m} | 8 |" in table for m in cells) and "public student (floor)" in table
    assert "CPUs" in table and "local-steps = 3" in table  # the machine and the exact settings
    assert (out / "compare.png").stat().st_size > 10_000


def test_a_cut_comparison_resumes_without_redoing_cells_or_charging_twice(comparison):
    out, cut = comparison["out"], comparison["cut"]
    assert cut["cells"] == ["dp-sgd-student_eps8_seed0.json"]  # the finished cell, nothing of the cut one
    assert (out / "cells" / "dp-sgd-student_eps8_seed0.json").read_text() == cut["dpsgd_cell"]
    assert (out / "runs" / "dpsgd_eps8_seed0" / "state.json").read_text() == cut["dpsgd_state"]
    assert cut["kd_checkpoint"]["step"] == 5
    state = json.loads((out / "runs" / "kd_eps8_seed0" / "state.json").read_text())
    assert state["phases"]["distillation"]["steps"] == 10  # resumed at its checkpoint, finished
    # the teacher's round and the histogram were charged once, before the cut, and never again
    assert _charges(out / "runs" / "kd_eps8_seed0") == cut["kd_charges"]
    for charges in cut["kd_charges"].values():
        assert charges == ["kd_eps8_seed0/round-1", "kd_eps8_seed0/label-histogram"]


def test_synthetic_hard_is_the_same_release_distilled_with_hard_labels(comparison):
    runs = comparison["out"] / "runs"
    assert _charges(runs / "hard_eps8_seed0") == _charges(runs / "kd_eps8_seed0")  # nothing new charged
    hard = json.loads((runs / "hard_eps8_seed0" / "state.json").read_text())
    assert hard["settings"]["kd-lambda"] == 0.0 and hard["settings"]["kd-beta"] == 0.0
    assert hard["phases"]["synthesis"] == json.loads((runs / "kd_eps8_seed0" / "state.json").read_text())[
        "phases"]["synthesis"]
    assert hard["phases"]["distillation"]["final_kl"] != 0 or hard["phases"]["distillation"]["final_ce"] > 0


@pytest.mark.parametrize("changes, message", [
    ({"methods": ["distilldp"]}, "unknown method 'distilldp'.*did you mean 'distildp'"),
    ({"epsilons": []}, "epsilons is empty"),
    ({"epsilons": [2.0, 0.0]}, "every ε must be a number > 0"),
    ({"epsilons": [-1.0]}, "every ε must be a number > 0"),
    ({"seeds": []}, "seeds must be a non-empty list"),
    ({"local-stepz": 3}, "did you mean 'local-steps'"),
])
def test_bad_config_is_one_line_before_anything_runs(fed_root, tmp_path, capsys, changes, message):
    with pytest.raises(ConfigError, match=message):
        load_comparison(CONFIG, tiny(fed_root, tmp_path / "cmp", **changes))
    assert not (tmp_path / "cmp").exists()


def test_data_without_the_label_field_is_refused_up_front(fed_root, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(fed_root / "corpus", data)
    train = data / "client_1" / "train.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    train.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    argv = ["compare", "--config", str(CONFIG), "--out", str(tmp_path / "cmp")]
    for key, value in tiny(fed_root, tmp_path / "cmp", **{"data-dir": str(data)}).items():
        argv += ["--set", f"{key}={json.dumps(value)}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "label" in err and "client_1" in err and "Traceback" not in err
    assert not (tmp_path / "cmp").exists()


def test_a_comparison_refuses_other_settings_but_may_grow(comparison, fed_root):
    out = comparison["out"]
    changed = load_comparison(CONFIG, tiny(fed_root, out, **{"local-steps": 4}))
    with pytest.raises(ConfigError, match="other settings .local-steps."):
        run_comparison(changed)
    grown = load_comparison(CONFIG, tiny(fed_root, out, methods=["distildp"]))
    from simulations.compare import check_same_settings
    check_same_settings(grown)  # fewer or more cells with the same settings: accepted


def test_the_dpkd_row_composes_a_teacher_and_a_student_charge_within_the_target(comparison):
    runs = comparison["out"] / "runs"
    cell = json.loads((comparison["out"] / "cells" / "dpkd_eps8_seed0.json").read_text())
    teacher_run = runs / "dpkd_eps8_seed0-teacher"
    for path in ledger_paths(teacher_run / "ledgers"):  # the student charged the teacher run's ledgers
        ledger = PrivacyLedger.load(path)
        assert [e["charge_id"] for e in ledger.entries] == ["dpkd_eps8_seed0-teacher/round-1", "dpkd_eps8_seed0/round-1"]
        assert ledger.spent_epsilon() <= 8.0 + 1e-9
    assert cell["epsilon"] == pytest.approx(max(PrivacyLedger.load(p).spent_epsilon()
                                                for p in ledger_paths(teacher_run / "ledgers")))
    assert 4.0 < cell["epsilon"] <= 8.0


def test_the_pdss_rows_are_read_on_the_task_at_the_same_epsilon(comparison):
    out = comparison["out"]
    cells = {c["method"]: c for c in json.loads((out / "compare.json").read_text())["cells"] if "accuracy" in c}
    assert set(cells) == {"pdss", "pdss-answer-only"}
    for method, cell in cells.items():
        assert 0.0 <= cell["accuracy"] <= 1.0 and len(cell["accuracy_sites"]) == 2, method
        assert 0 < cell["epsilon"] <= 8.0 + 1e-9 and cell["parameters"] > 0, method
        ledgers = [PrivacyLedger.load(p) for p in ledger_paths(Path(cell["runs"][0]) / "ledgers")]
        assert cell["epsilon"] == pytest.approx(max(l.spent_epsilon() for l in ledgers))
        kinds = {tuple(e["mechanism"] for e in l.entries) for l in ledgers}
        # pdss: half of ε for the prompts (ε_token = 4 / 16 tokens), half for DP-SGD; answer-only: DP-SGD alone
        assert kinds == ({("pure-epsilon", "dp-sgd")} if method == "pdss" else {("dp-sgd",)}), method
    assert cells["pdss"]["token_epsilon"] == pytest.approx(0.25)
    assert 0.0 <= cells["pdss"]["leakage"] <= 1.0 and cells["pdss-answer-only"]["leakage"] == 0.0
    prompts = json.loads((Path(cells["pdss-answer-only"]["runs"][0]) / "pdss" / "prompts.json").read_text())
    assert all(site["prompts"] == [] for site in prompts["sites"].values())  # nothing left the sites but updates
    table = (out / "compare.md").read_text()
    assert "| pdss | 8 |" in table and "| pdss-answer-only | 8 |" in table and "public task student (floor)" in table


def test_task_data_without_the_answer_field_is_refused_up_front(fed_root, tmp_path, capsys):
    task_config(fed_root)  # generates fed_root/task
    data = tmp_path / "task"
    shutil.copytree(fed_root / "task", data)
    train = data / "client_1" / "train.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    train.write_text("".join(json.dumps({"question": r["question"]}) + "\n" for r in rows))
    config = tmp_path / "task.toml"
    config.write_text(task_config(fed_root).read_text().replace(str(fed_root / "task"), str(data)))
    argv = ["compare", "--config", str(CONFIG), "--out", str(tmp_path / "cmp")]
    for key, value in tiny(fed_root, tmp_path / "cmp", methods=["pdss"], **{"task-config": str(config)}).items():
        argv += ["--set", f"{key}={json.dumps(value)}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'answer'" in err and "client_1" in err and "Traceback" not in err
    assert not (tmp_path / "cmp").exists()


def test_pdss_cells_split_the_epsilon_and_answer_only_spends_it_all_on_dp_sgd(fed_root, tmp_path):
    from simulations.compare import Cell
    from simulations.compare_task import cell_values

    comparison = load_comparison(CONFIG, tiny(fed_root, tmp_path / "cmp", methods=["pdss", "pdss-answer-only"]))
    bases = tmp_path / "bases"
    pdss = cell_values(comparison, Cell("pdss", 8.0, 0), bases)
    assert (pdss["epsilon"], pdss["prompt-epsilon"], pdss["token-epsilon"]) == (4.0, 4.0, 0.25)  # share 0.5, 16 tokens
    answer_only = cell_values(comparison, Cell("pdss-answer-only", 8.0, 0), bases)
    assert answer_only["epsilon"] == 8.0 and answer_only["rationale-weight"] == 0.0
    none = cell_values(comparison, Cell("pdss", math.inf, 0), bases)
    assert none["private"] is False and math.isinf(none["token-epsilon"])
    assert pdss["teacher-dir"] == str(bases / "task" / "teacher") and pdss["mode"] == "pdss"
