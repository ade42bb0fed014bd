"""Privacy ledger: persistence, rebuild from entries, budget refusal, crash safety."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from common.errors import BudgetExceeded, ConfigError, LedgerError, UserError
from common.privacy.accounting import calibrate_noise, epsilon_of
from common.privacy.ledger import DPSGDCharge, PrivacyLedger, _fmt_figures, lock_path, render

REPO = Path(__file__).resolve().parents[1]
DELTA = 1e-5
C1 = DPSGDCharge(noise_multiplier=1.1, sample_rate=0.02, steps=50, max_grad_norm=1.0)
C2 = DPSGDCharge(noise_multiplier=1.1, sample_rate=0.02, steps=50, max_grad_norm=1.0)
C3 = DPSGDCharge(noise_multiplier=0.9, sample_rate=0.05, steps=20, max_grad_norm=0.5)


def _open(path, budget=8.0, **kw):
    args = dict(client_id="site-3", epsilon_budget=budget, delta=DELTA, accountant="rdp")
    args.update(kw)
    return PrivacyLedger.open(path, **args)


def _history(entries):
    return [(e["params"]["noise_multiplier"], e["params"]["sample_rate"], e["params"]["steps"])
            for e in entries]


def _one_line_user_error(exc: BaseException) -> str:
    assert isinstance(exc, UserError)
    msg = str(exc)
    assert msg and "\n" not in msg
    return msg


def test_new_ledger_is_written_empty(tmp_path):
    path = tmp_path / "sub" / "site-3.json"
    ledger = _open(path)
    assert ledger.spent_epsilon() == 0.0
    assert ledger.remaining_epsilon() == 8.0
    data = json.loads(path.read_text())
    assert data == {
        "format": "privdistill-ledger", "version": 2, "client_id": "site-3", "accountant": "rdp",
        "budget": {"epsilon": 8.0, "delta": DELTA}, "spent": {"epsilon": 0.0, "delta": 0.0},
        "entries": [],
    }
    # v2 layout: sorted keys, one entry per line (same JSON as v1's indent=2 layout)
    assert path.read_text() == render(data)


def test_charge_then_reopen(tmp_path):
    path = tmp_path / "l.json"
    ledger = _open(path)
    assert ledger.charge("run-a/round-0", C1, run_id="run-a", round=0, extra={"model": "tiny"})
    assert ledger.charge("run-a/round-1", C3, run_id="run-a", round=1)
    spent = ledger.spent_epsilon()

    for again in (_open(path), PrivacyLedger.load(path)):
        assert again.entries == ledger.entries
        assert again.spent_epsilon() == spent
        assert (again.client_id, again.epsilon_budget, again.delta, again.accountant) == (
            "site-3", 8.0, DELTA, "rdp")

    entries = ledger.entries
    assert [e["charge_id"] for e in entries] == ["run-a/round-0", "run-a/round-1"]
    e0 = entries[0]
    assert e0["mechanism"] == "dp-sgd" and e0["run_id"] == "run-a" and e0["round"] == 0
    assert e0["params"] == {"noise_multiplier": 1.1, "sample_rate": 0.02, "steps": 50,
                            "max_grad_norm": 1.0}
    assert e0["extra"] == {"model": "tiny"}
    assert e0["timestamp"].endswith("+00:00")
    data = json.loads(path.read_text())
    assert data["spent"] == {"epsilon": spent, "delta": DELTA}


def test_spent_is_rebuilt_from_entries_not_stored(tmp_path):
    path = tmp_path / "l.json"
    ledger = _open(path)
    ledger.charge("a", C1, run_id="r", round=0)
    ledger.charge("b", C3, run_id="r", round=1)
    ledger.charge("c", C2, run_id="r", round=2)
    assert ledger.spent_epsilon() == epsilon_of(_history(ledger.entries), DELTA, "rdp")
    assert ledger.spent_epsilon() > epsilon_of(_history(ledger.entries[:2]), DELTA, "rdp")

    # a hand-edited 'spent' in the file is ignored
    data = json.loads(path.read_text())
    data["spent"]["epsilon"] = 0.0
    path.write_text(json.dumps(data))
    assert PrivacyLedger.load(path).spent_epsilon() == ledger.spent_epsilon()


def test_cost_of_previews_without_recording(tmp_path):
    ledger = _open(tmp_path / "l.json")
    ledger.charge("a", C1, run_id="r")
    before = (tmp_path / "l.json").read_bytes()
    assert ledger.cost_of(C3) == epsilon_of(_history(ledger.entries) + [(0.9, 0.05, 20)], DELTA, "rdp")
    assert ledger.cost_of(C3) > ledger.spent_epsilon()
    assert len(ledger.entries) == 1
    assert (tmp_path / "l.json").read_bytes() == before


def test_duplicate_charge_id_is_a_no_op(tmp_path):
    path = tmp_path / "l.json"
    ledger = _open(path)
    assert ledger.charge("run-a/round-0", C1, run_id="run-a", round=0) is True
    before = path.read_bytes()
    spent = ledger.spent_epsilon()
    assert ledger.has_charge("run-a/round-0")
    ledger.check(C2, "run-a/round-0")  # an equal charge under the same id passes
    assert ledger.charge("run-a/round-0", C2, run_id="run-a", round=0) is False
    assert _open(path).charge("run-a/round-0", C1, run_id="run-a", round=0) is False
    assert path.read_bytes() == before
    assert ledger.spent_epsilon() == spent and len(ledger.entries) == 1


def test_same_charge_id_with_other_parameters_is_refused(tmp_path):
    path = tmp_path / "l.json"
    ledger = _open(path)
    ledger.charge("run-a/round-0", C1, run_id="run-a", round=0)
    before = path.read_bytes()
    with pytest.raises(LedgerError) as info:
        ledger.charge("run-a/round-0", C3, run_id="run-a", round=0)
    assert "already recorded" in _one_line_user_error(info.value)
    assert path.read_bytes() == before


def test_over_budget_is_refused_before_anything_is_written(tmp_path):
    path = tmp_path / "l.json"
    sigma = calibrate_noise(3.0, DELTA, 0.08, 300, "rdp")  # plan: 3 rounds of 100 steps
    per_round = DPSGDCharge(sigma, 0.08, 100, 1.0)
    ledger = _open(path, budget=3.0)
    for r in range(3):  # the planned run fits exactly
        assert ledger.charge(f"run-a/round-{r}", per_round, run_id="run-a", round=r)
    spent = ledger.spent_epsilon()
    assert 3.0 * 0.99 <= spent <= 3.0
    before = path.read_bytes()

    would_be = ledger.cost_of(per_round)
    for attempt in (lambda: ledger.check(per_round, "run-a/round-3"),
                    lambda: ledger.charge("run-a/round-3", per_round, run_id="run-a", round=3)):
        with pytest.raises(BudgetExceeded) as info:
            attempt()
        msg = _one_line_user_error(info.value)
        assert "'site-3'" in msg and "'run-a/round-3'" in msg
        m = re.search(r"from ([0-9.]+) to ([0-9.]+), over the budget of ([0-9.]+) ", msg)
        assert m, msg
        shown = [float(x) for x in m.groups()]
        assert shown == pytest.approx([spent, would_be, 3.0], abs=0.006)
        assert "δ=1e-05" in msg
        assert "nothing was run or charged" in msg
    assert path.read_bytes() == before
    assert not ledger.has_charge("run-a/round-3")
    assert PrivacyLedger.load(path).entries == ledger.entries


def test_budget_figures_are_shown_with_enough_digits_to_differ():
    assert _fmt_figures(7.1, 8.65, 8.0) == ("7.10", "8.65", "8.00")
    # 7.998 -> 9.302 over 8.000: with two decimals "from 8.00 ... budget of 8.00" would mislead
    assert _fmt_figures(7.998, 9.302, 8.0) == ("7.998", "9.302", "8.000")
    assert _fmt_figures(0.5, 1.0000000004, 1.0) == ("0.5", "1.0000000004", "1.0")
    assert _fmt_figures(0.5, 1.004, 1.0) == ("0.500", "1.004", "1.000")


def test_reopen_with_mismatch_is_refused(tmp_path):
    path = tmp_path / "l.json"
    _open(path).charge("a", C1, run_id="r")
    before = path.read_bytes()
    for kwargs, word in [
        (dict(client_id="site-4"), "client_id"),
        (dict(delta=1e-6), "delta"),
        (dict(accountant="prv"), "accountant"),
        (dict(budget=10.0), "epsilon budget"),
    ]:
        with pytest.raises(LedgerError) as info:
            _open(path, **kwargs)
        msg = _one_line_user_error(info.value)
        assert word in msg and str(path) in msg
    assert path.read_bytes() == before


def test_load_refuses_missing_corrupt_and_foreign_files(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(LedgerError) as info:
        PrivacyLedger.load(missing)
    assert str(missing) in _one_line_user_error(info.value)
    assert not missing.exists()

    path = tmp_path / "l.json"
    _open(path).charge("a", C1, run_id="r")
    good = json.loads(path.read_text())
    cases = {
        "not-json": "{not json",
        "array": "[1, 2]",
        "wrong-format": json.dumps({**good, "format": "something-else"}),
        "version-3": json.dumps({**good, "version": 3}),
        "no-entries": json.dumps({k: v for k, v in good.items() if k != "entries"}),
        "bad-params": json.dumps({**good, "entries": [
            {**good["entries"][0], "params": {**good["entries"][0]["params"], "steps": -1}}]}),
        "dup-ids": json.dumps({**good, "entries": good["entries"] * 2}),
    }
    for name, text in cases.items():
        bad = tmp_path / f"{name}.json"
        bad.write_text(text)
        with pytest.raises(LedgerError) as info:
            PrivacyLedger.load(bad)
        assert str(bad) in _one_line_user_error(info.value), name
        # open() must not "repair" a bad ledger into a fresh one either
        with pytest.raises(LedgerError):
            _open(bad)
        assert bad.read_text() == text


def test_truncated_ledger_is_an_error_not_a_fresh_budget(tmp_path):
    path = tmp_path / "l.json"
    ledger = _open(path)
    ledger.charge("a", C1, run_id="r")
    ledger.charge("b", C3, run_id="r")
    full = path.read_bytes()
    for cut in (0, 1, len(full) // 3, len(full) // 2, len(full) - 3):
        path.write_bytes(full[:cut])
        with pytest.raises(LedgerError) as info:
            PrivacyLedger.load(path)
        assert str(path) in _one_line_user_error(info.value)
        with pytest.raises(LedgerError):
            _open(path)
        assert path.read_bytes() == full[:cut]


def test_unknown_mechanism_is_refused(tmp_path):
    path = tmp_path / "l.json"
    _open(path).charge("a", C1, run_id="r")
    data = json.loads(path.read_text())
    data["entries"].append({**data["entries"][0], "charge_id": "b", "mechanism": "exponential",
                            "params": {"epsilon": 0.5}})
    path.write_text(json.dumps(data))
    with pytest.raises(LedgerError) as info:
        PrivacyLedger.load(path)
    msg = _one_line_user_error(info.value)
    assert "'exponential'" in msg and str(path) in msg
    with pytest.raises(LedgerError):
        _open(path)


def test_load_is_read_only(tmp_path):
    path = tmp_path / "l.json"
    _open(path)
    with pytest.raises(RuntimeError):
        PrivacyLedger.load(path).charge("a", C1, run_id="r")


def test_stray_temp_files_are_ignored(tmp_path):
    path = tmp_path / "l.json"
    _open(path).charge("a", C1, run_id="r")
    (tmp_path / ".l.json.abc123.tmp").write_text("{garbage")
    assert [e["charge_id"] for e in PrivacyLedger.load(path).entries] == ["a"]
    assert _open(path).charge("b", C3, run_id="r")
    assert len(PrivacyLedger.load(path).entries) == 2


def test_invalid_arguments(tmp_path):
    with pytest.raises(ConfigError):
        DPSGDCharge(0.0, 0.1, 10, 1.0)
    with pytest.raises(ConfigError):
        DPSGDCharge(1.0, 0.1, 10, 0.0)
    with pytest.raises(ConfigError):
        _open(tmp_path / "a.json", budget=0.0)
    with pytest.raises(ConfigError):
        _open(tmp_path / "b.json", accountant="gdp")
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "b.json").exists()
    ledger = _open(tmp_path / "c.json")
    with pytest.raises(ConfigError):
        ledger.charge("x", C1, run_id="r", extra={"f": object()})
    assert ledger.entries == []


def test_describe(tmp_path):
    ledger = _open(tmp_path / "l.json")
    ledger.charge("run-a/round-0", C1, run_id="run-a", round=0)
    text = ledger.describe()
    assert "site-3" in text and "rdp" in text and "ε=8" in text
    assert f"{ledger.spent_epsilon():.4f}" in text and f"{ledger.remaining_epsilon():.4f}" in text
    assert "run-a/round-0" in text and "dp-sgd" in text


def test_prv_ledger(tmp_path):
    path = tmp_path / "l.json"
    ledger = PrivacyLedger.open(path, "site-1", 4.0, DELTA, accountant="prv")
    ledger.charge("a", C1, run_id="r")
    assert ledger.spent_epsilon() == pytest.approx(epsilon_of([(1.1, 0.02, 50)], DELTA, "prv"))
    assert PrivacyLedger.load(path).accountant == "prv"


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {repo!r})
    from common.privacy.ledger import DPSGDCharge, PrivacyLedger

    ledger = PrivacyLedger.open({path!r}, "site-3", 8.0, 1e-05, "rdp")
    assert ledger.charge("run-a/round-0", DPSGDCharge(1.1, 0.02, 50, 1.0), run_id="run-a", round=0)

    def crash(src, dst):  # the machine dies right before the rename
        os._exit(9)

    os.replace = crash
    ledger.charge("run-a/round-1", DPSGDCharge(0.9, 0.05, 20, 0.5), run_id="run-a", round=1)
    os._exit(0)  # not reached
    """
)


def test_crash_mid_write_leaves_last_committed_ledger(tmp_path):
    path = tmp_path / "site-3.json"
    script = CRASH_SCRIPT.format(repo=str(REPO), path=str(path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 9, proc.stderr

    # the interrupted write may leave its temp file behind, holding the uncommitted state
    # (and the empty lock file beside the ledger stays, by design)
    leftovers = [p for p in tmp_path.iterdir() if p not in (path, lock_path(path))]
    assert all(p.name.startswith(".site-3.json.") and p.name.endswith(".tmp") for p in leftovers)
    assert len(leftovers) <= 1

    ledger = PrivacyLedger.load(path)
    assert [e["charge_id"] for e in ledger.entries] == ["run-a/round-0"]
    assert ledger.spent_epsilon() == epsilon_of([(1.1, 0.02, 50)], DELTA, "rdp")
    data = json.loads(path.read_text())
    assert data["spent"]["epsilon"] == ledger.spent_epsilon()
    assert [e["charge_id"] for e in data["entries"]] == ["run-a/round-0"]

    # and the client can carry on: the lost charge is simply charged again
    assert _open(path).charge("run-a/round-1", C3, run_id="run-a", round=1)
    assert [e["charge_id"] for e in PrivacyLedger.load(path).entries] == [
        "run-a/round-0", "run-a/round-1"]
