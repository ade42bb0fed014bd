"""100 simulated sites on one machine: only the sampled sites work, and the user-level
central-DP accounting uses the real sampling rate (q = sites per round / sites < 1)."""

from __future__ import annotations

from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from common.data.generate import generate_corpus
from common.privacy.ledger import PrivacyLedger, ledger_paths
from common.settings import RunSettings
from simulations.run import prepare_run, simulate
from tests.conftest import fed_overrides

CONFIG = Path(__file__).resolve().parents[1] / "simulations" / "configs" / "dp-lora.toml"


def test_hundred_sites_ten_sampled_with_central_dp(fed_root, tmp_path):
    corpus = tmp_path / "corpus"
    generate_corpus(corpus, n_clients=100, seed=5, public_records=40, train_per_client=16, heldout_per_client=4)
    overrides = fed_overrides(fed_root, clients=100, rounds=1, **{
        "min-clients": 10, "fraction-train": 0.1, "local-steps": 2, "batch-size": 8, "data-dir": str(corpus),
        "central-dp": True, "central-noise-multiplier": 1.0, "central-clip": 1.0, "central-epsilon": 100.0})
    run_dir = tmp_path / "run"
    state = simulate(prepare_run(RunSettings.from_toml(CONFIG, overrides), run_dir, False))

    record = state["rounds"][0]
    assert record["valid"] == 10 and not record["dropouts"] and not record["rejected"]
    # Held-out evaluation follows the sampling (fraction-evaluate defaults to fraction-train):
    # evaluating all 100 sites each round would cost as much as training them.
    assert record["evaluate"]["clients"] == 10 and state["baseline"]["clients"] == 10
    ledgers = ledger_paths(run_dir / "ledgers")
    assert len(ledgers) == 10  # only the sampled sites trained, each charged once
    assert sorted(record["epsilon"]) == sorted(p.stem for p in ledgers)
    assert all(len(PrivacyLedger.load(p).entries) == 1 for p in ledgers)

    # One round, 10 of 100 sites: one Poisson-subsampled Gaussian step, accounted by PLD (the
    # default), against dp-accounting's own PLD accountant called directly, and below opacus RDP.
    from dp_accounting import dp_event
    from dp_accounting.pld import PLDAccountant

    reference = PLDAccountant()
    reference.compose(dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(1.0)))
    rdp = RDPAccountant()
    rdp.step(noise_multiplier=1.0, sample_rate=0.1)
    server = PrivacyLedger.load(run_dir / "server_ledger.json")
    assert server.entries[0]["params"]["sample_rate"] == pytest.approx(0.1)
    assert server.accountant == "pld"
    assert server.spent_epsilon() == pytest.approx(reference.get_epsilon(1e-5), abs=0.01)
    assert server.spent_epsilon() <= rdp.get_epsilon(delta=1e-5)


def test_evaluation_follows_sampling_unless_set():
    assert RunSettings.from_flat({"clients": 100, "fraction-train": 0.1}).fraction_evaluate == pytest.approx(0.1)
    assert RunSettings.from_flat({"clients": 100, "fraction-train": 0.1,
                                  "fraction-evaluate": 1.0}).fraction_evaluate == 1.0


@pytest.mark.parametrize("config", sorted(p for p in CONFIG.parent.glob("*.toml") if p.name != "compare.toml"),
                         ids=lambda p: p.name)
def test_shipped_configs_are_valid(config):
    settings = RunSettings.from_toml(config)
    assert settings.clients >= settings.min_clients
    if settings.central_dp:
        assert settings.central_plan().planned_epsilon() <= settings.central_epsilon


def test_the_shipped_comparison_is_valid():
    from simulations.compare import load_comparison

    comparison = load_comparison(CONFIG.parent / "compare.toml")  # every cell's settings, before any run
    assert len(comparison.compare.cells()) >= len(comparison.compare.methods)


def test_every_setting_is_declared_for_flwr_run():
    # `flwr run --run-config` refuses keys that pyproject's [tool.flwr.app.config] lacks.
    import tomllib

    declared = tomllib.loads((CONFIG.parents[2] / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(declared) == set(RunSettings().to_run_config())
    settings = RunSettings.from_flat({**declared, "seed": 11, "secure-aggregation": True, "clients": 5,
                                      "min-clients": 3})
    again = RunSettings.from_flat(settings.to_run_config())  # the round trip simulate() makes
    assert (again.seed, again.secure_aggregation, again.fraction_evaluate) == (11, True, 1.0)
