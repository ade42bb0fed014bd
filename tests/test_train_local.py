"""Local DP training end to end on the generated corpus (the no-federation baseline)."""

from __future__ import annotations

import json

from common.cli import main
from common.privacy.ledger import PrivacyLedger


def test_train_local_lowers_heldout_perplexity_within_budget(fed_root, tmp_path, capsys):
    root = fed_root  # the session's generated corpus and warmed-up tiny teacher
    site = root / "corpus" / "client_0"
    out = tmp_path / "run"
    rc = main(["train-local", "--data", str(site / "train.jsonl"), "--model", str(root / "teacher"),
               "--epsilon", "8", "--steps", "30", "--heldout", str(site / "heldout.jsonl"), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["heldout_perplexity_after"] < metrics["heldout_perplexity_before"]
    ledger = PrivacyLedger.load(out / "ledger.json")
    assert 0 < ledger.spent_epsilon() <= 8.0
    assert (out / "adapter" / "adapter_config.json").is_file()

    # Same run id again: the ledger has that charge; a second run id would exceed ε = 8.
    rc = main(["train-local", "--data", str(site / "train.jsonl"), "--model", str(root / "teacher"),
               "--epsilon", "8", "--steps", "30", "--run-id", "second", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "over the budget" in err and "Traceback" not in err
    assert PrivacyLedger.load(out / "ledger.json").entries == ledger.entries

    rc = main(["ledger", "show", str(out / "ledger.json")])
    shown = capsys.readouterr().out
    assert rc == 0 and "dp-sgd" in shown and "train-local/round-1" in shown


def test_every_subcommand_has_help(capsys):
    for argv in (["--help"], ["data", "--help"], ["data", "check", "--help"], ["data", "generate", "--help"],
                 ["teacher", "warmup", "--help"], ["train-local", "--help"], ["ledger", "show", "--help"],
                 ["demo", "--help"]):
        assert main(argv) == 0, argv
        assert "Usage" in capsys.readouterr().out
