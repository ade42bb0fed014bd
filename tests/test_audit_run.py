"""`privdistill audit` refuses what it cannot measure honestly, before any scoring."""

from __future__ import annotations

import shutil

import pytest

from common.audit.mia import AuditError
from common.audit.run import run_audit
from common.cli import main
from common.privacy.ledger import DPSGDCharge, PrivacyLedger
from common.settings import RunSettings
from server.checkpoint import RunDirectory
from tests.conftest import fed_overrides


def _run_dir(root, tmp_path, with_ledgers=True, data_dir=None):
    """A run directory as `privdistill simulate` writes it (state + adapter + ledgers), untrained."""
    from server.server_app import initial_adapter

    settings = RunSettings.from_flat({**fed_overrides(root), "run-dir": str(tmp_path / "run")})
    if data_dir:
        settings.data_dir = str(data_dir)
    run = RunDirectory(tmp_path / "run")
    state = run.new_state(settings.to_run_config())
    state["adapter"] = run.save_adapter(0, initial_adapter(settings))
    run.commit(state)
    if with_ledgers:
        ledger = PrivacyLedger.open(run.path / "ledgers" / "client_0.json", "client_0", 8.0, 1e-5)
        ledger.charge("x/round-1", DPSGDCharge(1.0, 0.1, 10, 1.0), run_id="x", round=1)
    return run.path


def test_refuses_run_without_canaries(fed_root, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(fed_root / "corpus", corpus)
    (corpus / "canaries.json").unlink()
    with pytest.raises(AuditError, match="canaries.json not found"):
        run_audit(_run_dir(fed_root, tmp_path, data_dir=corpus), progress=False)


def test_refuses_run_without_ledgers(fed_root, tmp_path):
    with pytest.raises(AuditError, match="no ledgers"):
        run_audit(_run_dir(fed_root, tmp_path, with_ledgers=False), progress=False)


def test_refuses_overlapping_members_and_nonmembers(fed_root, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(fed_root / "corpus", corpus)
    train = (corpus / "client_0" / "train.jsonl").read_text().splitlines()
    heldout = corpus / "client_0" / "heldout.jsonl"
    heldout.write_text(heldout.read_text() + train[0] + "\n")
    with pytest.raises(AuditError, match="both members and non-members"):
        run_audit(_run_dir(fed_root, tmp_path, data_dir=corpus), progress=False)


def test_refuses_fpr_the_sample_cannot_resolve(fed_root, tmp_path, capsys):
    run_dir = _run_dir(fed_root, tmp_path)
    assert main(["audit", "--run", str(run_dir), "--fpr", "0.001"]) == 2
    err = capsys.readouterr().err
    assert "needs at least 1000 non-members" in err and "Traceback" not in err
    assert not (run_dir / "audit.json").exists()
