"""Secure aggregation (Flower's SecAgg+ on its legacy workflow stack), end to end in simulation.

The server only ever holds the unmasked mean; the sites keep what they released (the replay
cache beside their ledger), which is what these tests compare the mean against.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.server.strategy.aggregate import aggregate
from opacus.accountants import RDPAccountant

from client.dp_lora import load_release
from client.wire_log import wire_capture_mod
from common.errors import ConfigError, RoundFailed
from common.privacy.ledger import DPSGDCharge, PrivacyLedger
from common.settings import RunSettings
from server.checkpoint import RunDirectory
from simulations.run import prepare_run, simulate
from tests.conftest import fed_overrides

CONFIG = Path(__file__).resolve().parents[1] / "simulations" / "configs" / "dp-lora.toml"
QUANTISATION_STEP = 2 * 8.0 / 2 ** 22  # SecAgg+: clip range ±8 mapped onto 2^22 integer levels


def _overrides(five_sites, **changes) -> dict:
    """5 sites, 1 round, SecAgg+ on; ``changes`` use underscores for dashes (min_clients=...)."""
    settings = {"clients": 5, "rounds": 1, "min_clients": 3, "local_steps": 2, "batch_size": 8,
                "secure_aggregation": True, **changes}
    return fed_overrides(Path(five_sites["model-dir"]).parent, **five_sites,
                         **{k.replace("_", "-"): v for k, v in settings.items()})


def _secagg_run(five_sites, run_dir, mods=(), **changes):
    overrides = _overrides(five_sites, **changes)
    state = simulate(prepare_run(RunSettings.from_toml(CONFIG, overrides), run_dir, False), client_mods=mods)
    releases = {p.parent.name.removesuffix(".releases"): load_release(p)[0]
                for p in sorted(run_dir.glob("ledgers/*.releases/*-round-1.safetensors"))}
    return state, releases


def test_secure_mean_equals_flowers_plain_mean_through_a_dropout_and_a_refusal(five_sites, tmp_path):
    # client_3 fails in its training step, i.e. after SecAgg+'s key exchange; client_2 has almost
    # spent its budget in an earlier run and refuses (to SecAgg+ that is a dropout too). With a
    # threshold of 3 of 5 shares the three remaining sites still unmask the round.
    run_dir, wire = tmp_path / "run", tmp_path / "wire"
    spent = PrivacyLedger.open(run_dir / "ledgers" / "client_2.json", "client_2", 8.0, 1e-5)
    spent.charge("earlier/round-1", DPSGDCharge(1.0, 1.0, 2, 1.0), run_id="earlier")  # ε ≈ 7.08 of 8
    state, releases = _secagg_run(five_sites, run_dir, mods=(wire_capture_mod(wire),), fail_client="client_3",
                                  fail_round=1)

    assert state["completed_round"] == 1
    record = state["rounds"][0]
    assert record["valid"] == 3 and len(record["dropouts"]) == 1 and len(record["refused"]) == 1
    assert "fault injected: client_3" in record["dropouts"][0]["reason"]
    assert "refused" in record["refused"][0]["reason"] and "budget" in record["refused"][0]["reason"]
    assert [e["charge_id"] for e in PrivacyLedger.load(spent.path).entries] == ["earlier/round-1"]
    assert sorted(releases) == ["client_0", "client_1", "client_4"]
    assert sorted(record["epsilon"]) == sorted(releases)
    assert not (run_dir / "ledgers" / "client_3.json").exists()  # it never trained, so never charged

    # The plain mean, by Flower's own FedAvg aggregate, of what the four sites released.
    names = sorted(next(iter(releases.values())))
    plain = aggregate([([r[n] for n in names], 1) for r in releases.values()])
    secure = RunDirectory(run_dir).load_adapter(state["adapter"])
    error = max(float(np.abs(secure[n] - p).max()) for n, p in zip(names, plain))
    assert error <= QUANTISATION_STEP  # stochastic rounding: under one step per site, averaged
    assert any(float(np.abs(r[n] - p).max()) > 100 * QUANTISATION_STEP
               for r in releases.values() for n, p in zip(names, plain)), "sites released the same adapter"

    # No site's adapter left it in the clear: no 64-byte run of any released tensor is on the wire.
    sent = b"".join(p.read_bytes() for p in wire.glob("*-out.bin"))
    assert len(list(wire.glob("*-out.bin"))) >= 4 * 3  # four stages, three sites that finished
    for adapter in releases.values():
        for name in names:
            raw = np.ascontiguousarray(adapter[name], np.float32).tobytes()
            for start in range(0, len(raw) - 64, max(64, len(raw) // 8)):
                assert raw[start:start + 64] not in sent, f"{name} travelled unmasked"


def test_secure_aggregation_with_central_dp_clips_at_the_site_and_noises_the_mean(five_sites, tmp_path):
    # σ is small and C tiny so that both the clipping and the noise are measurable.
    sigma, clip, n = 0.2, 0.02, 3
    run_dir = tmp_path / "run"
    state, releases = _secagg_run(five_sites, run_dir, central_dp=True, central_noise_multiplier=sigma,
                                  central_clip=clip, central_epsilon=40.0)
    assert state["rounds"][0]["valid"] == 5
    run = RunDirectory(run_dir)
    start, secure = run.load_adapter("adapters/round_0.safetensors"), run.load_adapter(state["adapter"])
    names = sorted(start)

    def clipped(adapter):  # what Flower's fixedclipping_mod makes of a site's update
        update = [adapter[k].astype(np.float64) - start[k] for k in names]
        norm = np.sqrt(sum(float(np.sum(u ** 2)) for u in update))
        assert norm > clip, "the test needs updates the clipping actually shortens"
        return [start[k] + u * (clip / norm) for k, u in zip(names, update)]

    clipped_mean = aggregate([(clipped(r), 1) for r in releases.values()])
    plain_mean = aggregate([([r[k] for k in names], 1) for r in releases.values()])
    residual = np.concatenate([(secure[k] - m).ravel() for k, m in zip(names, clipped_mean)])
    unclipped = np.concatenate([(secure[k] - m).ravel() for k, m in zip(names, plain_mean)])
    std = sigma * clip / n
    # 8,192 draws estimate a std to about ±0.8% (one standard error); the tolerance is 6%.
    assert np.std(residual) == pytest.approx(std, rel=0.06)
    assert np.sqrt(np.mean(unclipped ** 2)) > 1.5 * std  # against the unclipped mean it does not fit

    # One Gaussian step over every site (q = 1), accounted by PLD (the default): against
    # dp-accounting's own PLD accountant called directly, and below opacus RDP.
    from dp_accounting import dp_event
    from dp_accounting.pld import PLDAccountant

    reference = PLDAccountant()
    reference.compose(dp_event.PoissonSampledDpEvent(1.0, dp_event.GaussianDpEvent(sigma)))
    rdp = RDPAccountant()
    rdp.step(noise_multiplier=sigma, sample_rate=1.0)
    ledger = PrivacyLedger.load(run_dir / "server_ledger.json")
    assert ledger.accountant == "pld"
    assert ledger.spent_epsilon() == pytest.approx(reference.get_epsilon(1e-5), abs=0.01)
    assert ledger.spent_epsilon() <= rdp.get_epsilon(delta=1e-5)
    assert state["rounds"][0]["user_level_epsilon"] == pytest.approx(ledger.spent_epsilon())
    card = (run_dir / "privacy_card.md").read_text()
    assert "Secure aggregation (SecAgg+)" in card and "at each site before masking" in card


@pytest.mark.parametrize("changes, message", [
    ({"clients": 2, "min-clients": 2}, "at least 3 sites per round"),
    ({"wire-dtype": "float16"}, "wire-dtype must be float32"),
    ({"secagg-threshold": 0.0}, "secagg-shares and secagg-threshold"),
])
def test_bad_secure_aggregation_settings_are_refused_before_anything_runs(changes, message):
    with pytest.raises(ConfigError, match=message):
        RunSettings.from_flat({"secure-aggregation": True, "clients": 5, "min-clients": 3, **changes})


def test_a_failed_secure_round_resumes_without_charging_any_site_twice(five_sites, tmp_path):
    # min-clients = 5: when client_1 fails in round 2 the secure sum has 4 adapters, the round
    # is not committed, and the run stops at round 1. The resumed run redoes round 2: the four
    # sites that already trained (and were charged) re-send what they released.
    run_dir = tmp_path / "run"
    with pytest.raises(RoundFailed, match="round 2: secure aggregation did not complete .4 masked adapters, need 5"):
        _secagg_run(five_sites, run_dir, rounds=2, min_clients=5, fail_client="client_1", fail_round=2)
    assert RunDirectory(run_dir).load_state()["completed_round"] == 1
    assert sorted(PrivacyLedger.load(run_dir / "ledgers" / "client_0.json").entries[-1]["charge_id"].split("/")) \
        == ["dp-lora", "round-2"]  # charged for the round that did not complete

    overrides = _overrides(five_sites, rounds=2, min_clients=5)
    state = simulate(prepare_run(RunSettings.from_toml(CONFIG, overrides), run_dir, True))
    assert state["completed_round"] == 2 and [r["round"] for r in state["rounds"]] == [1, 2]
    assert state["rounds"][1]["valid"] == 5
    for i in range(5):
        charges = [e["charge_id"] for e in PrivacyLedger.load(run_dir / "ledgers" / f"client_{i}.json").entries]
        assert charges == ["dp-lora/round-1", "dp-lora/round-2"], f"client_{i}: {charges}"
