"""Server-side checks of client updates, and Flower's FedAvg on known tensors."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from common.errors import ConfigError
from common.settings import RunSettings
from common.wire import from_array_record, to_array_record
from server.validation import update_problem

REFERENCE = {"a.lora_A.weight": np.zeros((4, 8), np.float32), "a.lora_B.weight": np.zeros((8, 4), np.float32)}


def _update(**changes):
    update = {k: v + 0.01 for k, v in REFERENCE.items()}
    update.update(changes)
    return update


def test_valid_update_passes():
    assert update_problem(_update(), REFERENCE, "float32", max_norm=1.0) is None


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_rejects_non_finite(bad):
    tensor = np.zeros((4, 8), np.float32)
    tensor[1, 2] = bad
    assert "non-finite" in update_problem(_update(**{"a.lora_A.weight": tensor}), REFERENCE, "float32", 1.0)


def test_rejects_wrong_shape():
    problem = update_problem(_update(**{"a.lora_A.weight": np.zeros((4, 9), np.float32)}), REFERENCE, "float32", 1.0)
    assert "shape (4, 9)" in problem


def test_rejects_unknown_tensor():
    problem = update_problem(_update(**{"b.lora_A.weight": np.zeros((4, 8), np.float32)}), REFERENCE, "float32", 1.0)
    assert "unknown tensor" in problem and "b.lora_A.weight" in problem


def test_rejects_missing_tensor():
    update = _update()
    del update["a.lora_B.weight"]
    assert "missing tensor" in update_problem(update, REFERENCE, "float32", 1.0)


def test_rejects_wrong_dtype():
    update = _update(**{"a.lora_B.weight": np.zeros((8, 4), np.float64)})
    assert "dtype float64" in update_problem(update, REFERENCE, "float32", 1.0)
    assert "dtype float32" in update_problem(_update(), REFERENCE, "float16", 1.0)


def test_rejects_absurd_norm():
    update = _update(**{"a.lora_A.weight": np.full((4, 8), 1e6, np.float32)})
    assert "exceeds the bound" in update_problem(update, REFERENCE, "float32", max_norm=50.0)


def test_fedavg_gives_weighted_mean_of_known_tensors(flower_identity):
    values = [(np.full((2, 3), 1.0, np.float32), 10), (np.full((2, 3), 4.0, np.float32), 20),
              (np.arange(6, dtype=np.float32).reshape(2, 3), 30)]
    replies = []
    for i, (tensor, examples) in enumerate(values):
        request = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=i + 1, message_type=MessageType.TRAIN)
        content = RecordDict({"arrays": to_array_record({"w": tensor}),
                              "metrics": MetricRecord({"num-examples": examples, "train-loss": float(i)})})
        replies.append(Message(content, reply_to=request))
    arrays, metrics = FedAvg().aggregate_train(1, replies)
    expected = sum(t * n for t, n in values) / sum(n for _, n in values)
    np.testing.assert_allclose(from_array_record(arrays)["w"], expected, rtol=1e-6)
    assert metrics["train-loss"] == pytest.approx((0 * 10 + 1 * 20 + 2 * 30) / 60)


@pytest.mark.parametrize("changes,message", [
    ({"mode": "dp-magic"}, "unknown mode"),
    ({"epsilon": 0.0}, "epsilon must be a positive"),
    ({"epsilon": -1.0}, "epsilon must be a positive"),
    ({"clients": 3, "min-clients": 4}, "min-clients (4) is larger than clients (3)"),
    ({"wire-dtype": "bfloat16"}, "wire-dtype"),
    ({"bogus-key": 1}, "unknown setting"),
])
def test_bad_settings_fail_with_clear_message(changes, message):
    with pytest.raises(ConfigError) as err:
        RunSettings.from_flat(changes)
    assert message in str(err.value)


def test_missing_data_path_fails_before_anything_starts(tmp_path):
    settings = RunSettings.from_flat({"clients": 2, "min-clients": 1, "data-dir": str(tmp_path / "nope"),
                                      "model-dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="missing data file .*client_0"):
        settings.check_paths()


def test_site_clipping_rejects_an_update_the_site_did_not_clip(flower_identity):
    from server.server_app import sort_train_replies

    settings = RunSettings.from_flat({"clients": 3, "min-clients": 2, "central-dp": True, "central-clip": 0.1,
                                      "central-noise-multiplier": 5.0, "central-epsilon": 100.0,
                                      "central-clip-at": "site"})
    unit = np.full((4, 8), 1 / np.sqrt(32), np.float32)  # norm 1 over the A tensor
    updates = {"clipped": {**REFERENCE, "a.lora_A.weight": 0.1 * unit},      # norm = C
               "unclipped": {**REFERENCE, "a.lora_A.weight": 0.5 * unit}}    # norm = 5C
    messages, replies = [], []
    for i, (name, update) in enumerate(updates.items()):
        request = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=i + 1, message_type=MessageType.TRAIN)
        content = RecordDict({"arrays": to_array_record(update), "metrics": MetricRecord({"num-examples": 5}),
                              "client": ConfigRecord({"client-id": name})})
        messages.append(request)
        replies.append(Message(content, reply_to=request))
    outcome = sort_train_replies(messages, replies, REFERENCE, settings)
    assert len(outcome["valid"]) == 1
    assert [r["client"] for r in outcome["rejected"]] == ["unclipped"]
    assert "did not clip" in outcome["rejected"][0]["reason"]


def test_central_dp_refuses_an_exactly_zero_update():
    same = {k: v.copy() for k, v in REFERENCE.items()}
    assert update_problem(same, REFERENCE, "float32", 50.0) is None
    assert "exactly zero" in update_problem(same, REFERENCE, "float32", 50.0, nonzero=True)
