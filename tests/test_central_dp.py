"""User-level central DP: Flower's wrapper clips and noises as configured; opacus accounts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from opacus.accountants import RDPAccountant

from common.errors import ConfigError
from common.privacy.central import UNIT_WEIGHT_KEY, CentralDPPlan, plan_central_dp, wrap_strategy
from common.privacy.ledger import PrivacyLedger
from common.settings import RunSettings
from common.wire import from_array_record, to_array_record

SHAPES = {"a.lora_A.weight": (64, 100), "a.lora_B.weight": (100, 64)}  # 12,800 values


def _replies(updates):
    replies = []
    for i, update in enumerate(updates):
        request = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=i + 1, message_type=MessageType.TRAIN)
        content = RecordDict({"arrays": to_array_record(update),
                              "metrics": MetricRecord({"num-examples": 10 * (i + 1), UNIT_WEIGHT_KEY: 1})})
        replies.append(Message(content, reply_to=request))
    return replies


def _aggregate(plan, current, updates):
    strategy = wrap_strategy(FedAvg(weighted_by_key=UNIT_WEIGHT_KEY), plan)
    strategy.current_arrays = to_array_record(current)  # what configure_train records for the round
    arrays, _ = strategy.aggregate_train(1, _replies(updates))
    return from_array_record(arrays)


def test_noise_std_is_sigma_c_over_clients_per_round(flower_identity):
    # (Near-)zero updates: the aggregate is pure noise. Exactly-zero updates crash Flower 1.41's
    # clipping (0/0 in clip_inputs_inplace), so each site moves every value by 1e-7, which is
    # 1e-6 of the noise std. 12,800 draws estimate a std to about ±0.6% (one standard error);
    # the tolerance is 5%.
    plan = plan_central_dp(clients=10, per_round=5, rounds=3, min_clients=5, noise_multiplier=1.3,
                           clipping_norm=0.5, epsilon_budget=100.0)
    zeros = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    aggregate = _aggregate(plan, zeros, [{k: v + 1e-7 for k, v in zeros.items()}] * 5)
    noise = np.concatenate([v.ravel() for v in aggregate.values()])
    assert plan.noise_std == pytest.approx(1.3 * 0.5 / 5)
    assert np.std(noise) == pytest.approx(plan.noise_std, rel=0.05)
    assert abs(np.mean(noise)) < 5 * plan.noise_std / np.sqrt(noise.size)


def test_clipping_bounds_every_clients_contribution(flower_identity):
    # A tiny σ (the budget check is not the point here) makes the clipping visible.
    plan = CentralDPPlan(noise_multiplier=1e-9, clipping_norm=1.0, sample_rate=1.0, rounds=1, min_clients=4,
                         delta=1e-5, epsilon_budget=math.inf)
    current = {k: np.ones(s, np.float32) for k, s in SHAPES.items()}
    rng = np.random.default_rng(0)
    huge = [{k: v + rng.normal(0, 100, v.shape).astype(np.float32) for k, v in current.items()} for _ in range(3)]
    small = {k: v + 1e-4 for k, v in current.items()}  # norm ≈ 0.011 < C: passes unclipped
    aggregate = _aggregate(plan, current, huge + [small])
    for i in range(4):  # replacing one site's update moves the mean by at most 2C/n
        others = huge[:i] + huge[i + 1:] + [small] if i < 3 else huge
        swapped = _aggregate(plan, current, others + [{k: v + 1e-6 for k, v in current.items()}])
        delta = np.sqrt(sum(np.sum((aggregate[k] - swapped[k]) ** 2) for k in current))
        assert delta <= 2 * plan.clipping_norm / 4 + 1e-4
    mean_update = np.sqrt(sum(np.sum((aggregate[k] - current[k]) ** 2) for k in current))
    assert mean_update <= plan.clipping_norm + 1e-4


def test_server_ledger_epsilon_equals_accountant(tmp_path):
    # opacus's RDP accountant is the reference here, so plan and ledger use it explicitly (the
    # default accountant is dp-accounting's PLD since ledger v2).
    plan = plan_central_dp(clients=100, per_round=10, rounds=5, min_clients=10, noise_multiplier=1.1,
                           clipping_norm=1.0, epsilon_budget=50.0, accountant="rdp")
    ledger = PrivacyLedger.open(tmp_path / "server.json", "server", plan.epsilon_budget, plan.delta, "rdp")
    reference = RDPAccountant()
    for r in range(1, 6):
        ledger.charge(f"run/round-{r}", plan.round_charge(), run_id="run", round=r)
        reference.step(noise_multiplier=1.1, sample_rate=0.1)
        assert ledger.spent_epsilon() == pytest.approx(reference.get_epsilon(plan.delta), rel=1e-9)
    assert ledger.spent_epsilon() == pytest.approx(plan.planned_epsilon(), rel=1e-9)


def test_plan_over_budget_is_refused_before_round_one():
    with pytest.raises(ConfigError, match="over the server's budget"):
        RunSettings.from_flat({"clients": 5, "min-clients": 5, "rounds": 50, "central-dp": True,
                               "central-noise-multiplier": 0.5, "central-epsilon": 2.0})
    ok = RunSettings.from_flat({"clients": 5, "min-clients": 5, "rounds": 3, "central-dp": True,
                                "central-noise-multiplier": 5.0, "central-epsilon": 10.0})
    assert ok.central_plan().planned_epsilon() <= 10.0


def _adaptive_run(strategy, current, scale, rounds=5):
    """Five rounds in which every site moves every value by ``scale``; returns C after each."""
    norms = []
    for rnd in range(1, rounds + 1):
        strategy.current_arrays = to_array_record(current)
        strategy.aggregate_train(rnd, _replies([{k: v + scale for k, v in current.items()}] * 5))
        norms.append(strategy.clipping_norm)
    return norms


@pytest.mark.parametrize("scale, grows", [(10.0, True), (1e-6, False)])
def test_adaptive_clipping_moves_c_towards_the_update_norms(flower_identity, scale, grows):
    # Every update's norm is ≈ scale·113 (12,800 values): far above C = 1 (all clipped: C must
    # grow) or far below (none clipped: C must shrink). σ is tiny so the noisy count is exact.
    plan = plan_central_dp(clients=10, per_round=5, rounds=1, min_clients=5, noise_multiplier=1e-3,
                           clipping_norm=1.0, epsilon_budget=math.inf, clipping="adaptive", count_stddev=1e-3)
    current = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    norms = _adaptive_run(wrap_strategy(FedAvg(weighted_by_key=UNIT_WEIGHT_KEY), plan), current, scale)
    expected = [math.exp(0.2 * 0.5 * r * (1 if grows else -1)) for r in range(1, 6)]  # exp(±η(f − γ)) per round
    assert norms == pytest.approx(expected, rel=1e-2)


def test_flowers_own_adaptive_clipping_still_moves_the_wrong_way(flower_identity):
    # Why common/privacy/central.py overrides Flower's update: in flwr 1.41 C shrinks while every
    # update is clipped. When this fails, Flower has fixed it; drop AdaptiveClipping's override.
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping

    flower = DifferentialPrivacyServerSideAdaptiveClipping(FedAvg(weighted_by_key=UNIT_WEIGHT_KEY), 1e-3, 5,
                                                           initial_clipping_norm=1.0, clipped_count_stddev=1e-3)
    current = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    assert _adaptive_run(flower, current, 10.0)[-1] < 1.0


def test_adaptive_settings_are_checked_before_round_one():
    with pytest.raises(ConfigError, match="raise central-count-stddev above 0.5"):
        RunSettings.from_flat({"clients": 5, "min-clients": 5, "central-dp": True, "central-clipping": "adaptive",
                               "central-noise-multiplier": 1.0, "central-epsilon": 100.0})
    with pytest.raises(ConfigError, match="fixed only"):
        RunSettings.from_flat({"clients": 5, "min-clients": 3, "central-dp": True, "central-clipping": "adaptive",
                               "central-count-stddev": 2.0, "central-epsilon": 100.0, "secure-aggregation": True})
    with pytest.raises(ConfigError, match="fixed or adaptive"):
        RunSettings.from_flat({"clients": 5, "central-dp": True, "central-clipping": "median", "central-epsilon": 100.0})
    ok = RunSettings.from_flat({"clients": 5, "min-clients": 5, "central-dp": True, "central-clipping": "adaptive",
                                "central-count-stddev": 1.0, "central-noise-multiplier": 1.0, "central-epsilon": 100.0})
    assert ok.central_plan().round_charge().noise_multiplier == 1.0  # the ledger charges the configured σ
