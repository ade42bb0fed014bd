"""Rounds that cost what their training costs: warm models, one message per site per round,
a σ plan calibrated once per site and run.

The federation tests here run the real ServerApp round loop (``run_federation``) against the
real ClientApp in this process, through a small in-process grid: every "site" is served by
this one process, as a Simulation Engine actor serves many, so the warm-model cache is
shared between sites exactly as it is there.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.common import MessageType

from client import dp_lora
from client.client_app import build_client_app
from common.models import cache
from common.models.lm import encode_texts, per_record_loss
from common.privacy import dp_sgd, plan_store
from common.privacy.dp_sgd import make_private
from common.privacy.ledger import PrivacyLedger
from common.settings import DPLoRAConfig, RunSettings
from server.checkpoint import RunDirectory
from server.server_app import run_federation
from simulations.run import prepare_run
from tests.conftest import fed_overrides

CONFIG = Path(__file__).resolve().parents[1] / "simulations" / "configs" / "dp-lora.toml"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.delenv("PRIVDISTILL_WARM_MODELS", raising=False)
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def seeded(monkeypatch):
    """Make DP noise and sampling reproducible (``train_dp_lora`` reseeds with ``torch.seed()``)."""
    monkeypatch.setattr(torch, "seed", lambda: torch.manual_seed(1234) and 1234)


def _cfg(**changes) -> DPLoRAConfig:
    return DPLoRAConfig(**{"epsilon": 8.0, "rounds": 2, "local_steps": 3, "batch_size": 16,
                           "max_physical_batch_size": 8, "max_length": 32, "accountant": "rdp", **changes})


def _site_paths(root, i):
    return root / "corpus" / f"client_{i}" / "train.jsonl", root / "corpus" / f"client_{i}" / "heldout.jsonl"


def _train(root, i, cfg, tmp_path, adapter=None, tag=""):
    train, _ = _site_paths(root, i)
    ledger = None
    if cfg.private:
        plan = dp_lora.plan_for(train, cfg)[1]
        ledger = PrivacyLedger.open(tmp_path / f"ledger_{i}{tag}.json", f"client_{i}", 100.0, plan.delta,
                                    cfg.accountant)
    return dp_lora.train_dp_lora(root / "teacher", train, cfg, ledger, "t", 1, adapter).adapter


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- warm models
@pytest.mark.parametrize("private", [False, True], ids=["noise-off", "dp-seeded"])
def test_warm_round_equals_cold_round_bit_for_bit(fed_root, tmp_path, seeded, monkeypatch, private):
    cfg = _cfg(private=private)
    start = _train(fed_root, 2, _cfg(private=False), tmp_path)  # some non-zero incoming adapter
    cache.clear()
    monkeypatch.setenv("PRIVDISTILL_WARM_MODELS", "0")
    cold = _train(fed_root, 0, cfg, tmp_path, start, tag="cold")
    assert cache.cached_entries() == 0
    monkeypatch.delenv("PRIVDISTILL_WARM_MODELS")
    _train(fed_root, 1, cfg, tmp_path, tag="other")  # another site's round first, on the same warm model
    reused = cache.stats["reused"]
    warm = _train(fed_root, 0, cfg, tmp_path, start, tag="warm")
    assert cache.stats["reused"] == reused + 1 and cache.cached_entries() == 1
    assert _same(warm, cold), "a round on a warm model differs from the same round on a cold one"
    assert not _same(warm, start)


def test_per_sample_gradients_on_a_reused_model(fed_root, tmp_path):
    cfg = _cfg(max_length=48)
    _train(fed_root, 0, cfg, tmp_path)  # a full DP round first: opacus wrapped and unwrapped the model
    built = cache.stats["built"]
    texts = dp_lora.load_texts(_site_paths(fed_root, 1)[0], cfg)[:6]
    with cache.warm_lora_model(fed_root / "teacher", cfg) as (model, tokenizer):
        assert cache.stats["built"] == built  # the same model object, reused
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # non-zero lora_B, so every adapter tensor has a gradient
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        dataset = encode_texts(texts, tokenizer, max_length=48)
        input_ids, mask = dataset.tensors
        plan = dp_sgd.DPSGDPlan(8.0, 1e-5, 0.0, dp_sgd.sample_rate_for(6, 6), 1, 1, 0.05, "rdp")
        optimizer = torch.optim.SGD([p for _, p in trainable], lr=0.1)
        _, private_model, optimizer, _ = make_private(model, optimizer, dataset, 6, plan)
        private_model.train()
        per_record_loss(private_model, input_ids, mask).mean().backward()
        samples = {n: p.grad_sample.detach().clone() for n, p in trainable}
        private_model.disable_hooks()
        for n, p in trainable:
            naive = []
            for i in range(len(input_ids)):
                for _, q in trainable:
                    q.grad = None
                per_record_loss(private_model, input_ids[i:i + 1], mask[i:i + 1]).sum().backward()
                naive.append(p.grad.detach().clone())
            torch.testing.assert_close(samples[n], torch.stack(naive), rtol=1e-4, atol=1e-6)
            assert torch.stack(naive).abs().max() > 0
        private_model.to_standard_module()
    assert cache.cached_entries() == 1 and cache.stats["evicted"] == 0

    # A borrower that leaves opacus's hooks on does not poison the cache: the entry is evicted.
    with cache.warm_lora_model(fed_root / "teacher", cfg) as (model, _):
        make_private(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
                     dataset, 6, plan)
    assert cache.cached_entries() == 0 and cache.stats["evicted"] == 1


def test_two_sites_in_one_process_never_see_each_other(fed_root, tmp_path, seeded, monkeypatch):
    cfg = _cfg()
    a = _train(fed_root, 0, cfg, tmp_path)
    kept = {k: v.copy() for k, v in a.items()}
    with cache.warm_lora_model(fed_root / "teacher", cfg) as (model, _):
        # Between messages the shared model holds the initial adapter, no gradient and no trace
        # of opacus (per-sample gradients, activations, hooks) from site A's round.
        entry = next(iter(cache._entries.values()))
        for name, p in model.named_parameters():
            assert p.grad is None and not {"grad_sample", "summed_grad", "_forward_counter"} & set(vars(p))
            if name in entry.initial:
                assert torch.equal(p, entry.initial[name]), f"{name} still holds a site's adapter"
        for module in model.modules():
            assert not hasattr(module, "activations") and not hasattr(module, "autograd_grad_sample_hooks")
            assert not module._forward_hooks and not module._backward_hooks
    b = _train(fed_root, 1, cfg, tmp_path)
    assert _same(a, kept), "site A's released adapter changed when site B used the warm model"
    # B's round is what B gets from a cold model: nothing of A's data or adapter reached it.
    cache.clear()
    monkeypatch.setenv("PRIVDISTILL_WARM_MODELS", "0")
    b_cold = _train(fed_root, 1, cfg, tmp_path, tag="cold")
    assert _same(b, b_cold) and not _same(a, b)


def test_a_changed_model_directory_is_loaded_again(fed_root, tmp_path):
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(fed_root / "teacher", teacher)
    cfg = _cfg(private=False)
    with cache.warm_lora_model(teacher, cfg):
        pass
    key = cache.model_key(teacher)
    weights = next(teacher.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10 ** 9))
    assert cache.model_key(teacher) != key
    built = cache.stats["built"]
    with cache.warm_lora_model(teacher, cfg):
        pass
    assert cache.stats["built"] == built + 1


# ---------------------------------------------------------------------------- one message per round
class InProcessGrid:
    """Flower's Grid, reduced to what the round loop uses; the ClientApp runs in this process."""

    def __init__(self, settings: RunSettings, sites: int, kill_in_round: int | None = None):
        self.app = build_client_app(settings.to_run_config())
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": i},
                                          state=RecordDict(), run_config={}) for i in range(sites)}
        self.kill_in_round, self.log = kill_in_round, []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            config = message.content["config"] if "config" in message.content else {}
            self.log.append({"type": message.metadata.message_type, "node": message.metadata.dst_node_id,
                             "round": int(config.get("server-round", 0)), "heldout": bool(config.get("heldout")),
                             "dtypes": {str(a.dtype) for a in message.content["arrays"].values()}})
            try:
                reply = self.app(message, self.contexts[message.metadata.dst_node_id])
            except Exception as exc:  # noqa: BLE001 - what Flower does with a ClientApp exception
                reply = Message(Error(code=0, reason=repr(exc)), reply_to=message)
            self.log[-1]["reply"] = reply
            replies.append(reply)
        if self.kill_in_round is not None and messages and \
                messages[0].metadata.message_type == MessageType.TRAIN and \
                int(messages[0].content["config"]["server-round"]) == self.kill_in_round:
            raise KeyboardInterrupt("server killed after the sites trained, before it committed the round")
        return replies


def _fed_settings(root, run_dir, resume=False, **changes):
    small = {"local-steps": 2, "batch-size": 8, "max-physical-batch-size": 8, "max-length": 32, "accountant": "rdp"}
    return prepare_run(RunSettings.from_toml(CONFIG, fed_overrides(root, **{**small, **changes})), run_dir, resume)


def _weighted_ppl(root, settings, adapter) -> float:
    loss = n_total = 0.0
    for i in range(settings.clients):
        ppl, n = dp_lora.heldout_perplexity(root / "teacher", _site_paths(root, i)[1], settings.dp, adapter)
        loss, n_total = loss + math.log(ppl) * n, n_total + n
    return math.exp(loss / n_total)


def _fp16(adapter):
    return {k: v.astype(np.float16) for k, v in adapter.items()}


def test_one_message_per_site_per_round_and_the_round_table(fed_root, tmp_path, flower_identity):
    run_dir = tmp_path / "run"
    settings = _fed_settings(fed_root, run_dir, name="one-msg", **{"wire-dtype": "float16"})
    grid = InProcessGrid(settings, 3)
    state = run_federation(grid, settings)

    kinds = [(m["round"], m["type"]) for m in grid.log]
    assert kinds == [(1, "train")] * 3 + [(2, "train")] * 3 + [(2, "evaluate")] * 3  # 2R+1 exchanges became R+1
    assert all(m["heldout"] for m in grid.log if m["type"] == "train"), grid.log
    assert all(m["dtypes"] == {"float16"} for m in grid.log), [m["dtypes"] for m in grid.log]  # the downlink respects wire-dtype

    run = RunDirectory(run_dir)
    adapters = [run.load_adapter(f"adapters/round_{k}.safetensors") for k in range(3)]
    # A train reply carries the held-out metrics of the adapter it came with, before training.
    for m in grid.log[:6]:
        metrics = m["reply"].content["metrics"]
        site = m["node"] - 100
        incoming = _fp16(adapters[m["round"] - 1])
        ppl, n = dp_lora.heldout_perplexity(fed_root / "teacher", _site_paths(fed_root, site)[1], settings.dp,
                                            incoming)
        assert metrics["heldout-examples"] == n and metrics["heldout-loss"] == pytest.approx(math.log(ppl), rel=1e-9)
    # The round table: baseline = round 0's model, round k = the model round k produced (the
    # last round's from the final evaluate), each over all three sites.
    figures = [state["baseline"]] + [r["evaluate"] for r in state["rounds"]]
    assert [f["clients"] for f in figures] == [3, 3, 3] and not any(f.get("pending") for f in figures)
    for figure, adapter in zip(figures, adapters):
        assert figure["perplexity"] == pytest.approx(_weighted_ppl(fed_root, settings, _fp16(adapter)), rel=1e-9)
    assert "heldout-loss" not in state["rounds"][0]["train"]
    assert json.loads((run_dir / "state.json").read_text())["rounds"][1]["evaluate"]["perplexity"] > 0


def test_evaluation_sample_larger_than_the_training_sample(fed_root, tmp_path, flower_identity):
    # fraction-train 2/3 (2 of 3 sites), fraction-evaluate 1: the untrained site gets one
    # evaluate message per round, never a second message.
    settings = _fed_settings(fed_root, tmp_path / "run", name="eval-all", rounds=1,
                             **{"fraction-train": 0.67, "fraction-evaluate": 1.0})
    grid = InProcessGrid(settings, 3)
    state = run_federation(grid, settings)
    per_node = {}
    for m in grid.log[:3]:
        per_node.setdefault(m["node"], []).append(m["type"])
    assert sorted(map(len, per_node.values())) == [1, 1, 1] and sorted(t for ts in per_node.values() for t in ts) \
        == ["evaluate", "train", "train"]
    assert state["baseline"]["clients"] == 3 and state["rounds"][0]["valid"] == 2


def test_killed_server_resumes_fills_every_figure_and_charges_once(fed_root, tmp_path, flower_identity):
    run_dir = tmp_path / "run"
    settings = _fed_settings(fed_root, run_dir, name="killed", rounds=3)
    with pytest.raises(KeyboardInterrupt):
        run_federation(InProcessGrid(settings, 3, kill_in_round=2), settings)
    state = RunDirectory(run_dir).load_state()
    assert state["completed_round"] == 1 and state["rounds"][0]["evaluate"]["pending"]
    assert state["baseline"]["clients"] == 3
    for i in range(3):  # round 2 was trained and charged at every site before the kill
        assert [e["charge_id"] for e in PrivacyLedger.load(run_dir / "ledgers" / f"client_{i}.json").entries] \
            == ["killed/round-1", "killed/round-2"]

    settings = _fed_settings(fed_root, run_dir, resume=True, name="killed", rounds=3)
    grid = InProcessGrid(settings, 3)
    state = run_federation(grid, settings)
    assert state["completed_round"] == 3 and [r["round"] for r in state["rounds"]] == [1, 2, 3]
    replayed = [m["reply"].content["metrics"]["replayed"] for m in grid.log if m["round"] == 2]
    assert replayed == [1, 1, 1]  # round 2 re-sent, not trained again
    for i in range(3):
        assert [e["charge_id"] for e in PrivacyLedger.load(run_dir / "ledgers" / f"client_{i}.json").entries] \
            == ["killed/round-1", "killed/round-2", "killed/round-3"]
    figures = [state["baseline"]] + [r["evaluate"] for r in state["rounds"]]
    assert all(math.isfinite(f["perplexity"]) and f["clients"] == 3 and not f.get("pending") for f in figures)


# ---------------------------------------------------------------------------- σ plan, once per site
class Calls(list):
    surrogate_for: tuple | None = None  # all calibrations but this one's answer σ = 10 (fast; ε ≪ target)


@pytest.fixture
def calibrations(monkeypatch):
    """Counts every σ calibration a plan asks for (the in-process memo behind it only saves time)."""
    calls = Calls()
    real = dp_sgd.calibrate_noise

    def counting(*args, **kwargs):
        calls.append(args)
        if calls.surrogate_for is not None and args != calls.surrogate_for:
            return 10.0
        return real(*args, **kwargs)

    monkeypatch.setattr(dp_sgd, "calibrate_noise", counting)
    return calls


def test_persisted_plan_is_reused_and_recomputed_when_an_input_changes(fed_root, tmp_path, calibrations, monkeypatch):
    train, _ = _site_paths(fed_root, 0)
    store = plan_store.path_for(tmp_path / "site" / "ledger.json")
    cfg = _cfg(accountant="rdp")
    first = dp_lora.plan_for(train, cfg, store)[1]
    assert len(calibrations) == 1 and store.is_file()
    calibrations.surrogate_for = calibrations[0]  # the changed plans below only need to be different
    assert dp_lora.plan_for(train, cfg, store)[1] == first and len(calibrations) == 1  # a later message, same process
    plan_store._checked.clear()  # a later message in a fresh process (a deployed site): from the file
    reused = plan_store.stats["reused"]
    again = dp_lora.plan_for(train, cfg, store)[1]
    assert again == first and len(calibrations) == 1 and plan_store.stats["reused"] == reused + 1
    for change in ({"batch_size": 8}, {"local_steps": 4}, {"rounds": 3}, {"epsilon": 4.0}, {"delta": 1e-6},
                   {"accountant": "pld"}):
        before = len(calibrations)
        plan = dp_lora.plan_for(train, _cfg(**{"accountant": "rdp", **change}), store)[1]
        assert len(calibrations) == before + 1, change
        assert plan.noise_multiplier != first.noise_multiplier or change.get("accountant"), change
    fewer = tmp_path / "fewer.jsonl"  # a different record count
    fewer.write_text("".join(train.read_text().splitlines(keepends=True)[:40]))
    before = len(calibrations)
    dp_lora.plan_for(fewer, cfg, store)
    assert len(calibrations) == before + 1
    before = len(calibrations)
    dp_lora.plan_for(train, cfg, store)  # every earlier plan is still there
    assert len(calibrations) == before
    real_version = plan_store.metadata.version  # a new opacus (or new accounting code) is a new input
    monkeypatch.setattr(plan_store.metadata, "version", lambda name: "999.0" if name == "opacus" else real_version(name))
    plan_store.code_versions.cache_clear()
    try:
        dp_lora.plan_for(train, cfg, store)
        assert len(calibrations) == before + 1
    finally:
        monkeypatch.undo()
        plan_store.code_versions.cache_clear()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "sigma-lowered", "sigma-lowered-redigested"])
def test_corrupted_plan_file_is_recalculated_not_trusted(fed_root, tmp_path, calibrations, damage):
    train, _ = _site_paths(fed_root, 0)
    store = tmp_path / "ledger.plans.json"
    cfg = _cfg(accountant="rdp")
    good = dp_lora.plan_for(train, cfg, store)[1]
    text = store.read_text()
    if damage == "truncated":
        store.write_text(text[: len(text) // 2])
    elif damage == "garbage":
        store.write_bytes(b"\x00\xff not json")
    else:
        data = json.loads(text)
        entry = next(iter(data["plans"].values()))
        entry["plan"]["noise_multiplier"] *= 0.5  # would overspend the budget
        if damage == "sigma-lowered-redigested":  # consistent digest: only the ε check catches it
            entry["digest"] = plan_store._digest(entry["inputs"], entry["plan"])
        store.write_text(json.dumps(data))
    plan = dp_lora.plan_for(train, cfg, store)[1]  # same process: the memo sees the file changed
    assert len(calibrations) == 2 and plan == good
    json.loads(store.read_text())  # rewritten whole
    plan_store._checked.clear()
    dp_lora.plan_for(train, cfg, store)
    assert len(calibrations) == 2


def test_a_site_round_calibrates_once_per_run(fed_root, tmp_path, calibrations):
    train, heldout = _site_paths(fed_root, 0)
    site = dp_lora.Site("client_0", train, heldout, tmp_path / "ledger.json", 100.0, fed_root / "teacher")
    cfg = _cfg(local_steps=1)
    with cache.warm_lora_model(fed_root / "teacher", cfg) as (model, _):
        initial = cache.adapter_copy(model)
    for server_round in (1, 2):
        _, metrics, refusal = dp_lora.run_round(site, cfg, "once", server_round, initial)
        assert refusal == "" and metrics["replayed"] == 0
    assert len(calibrations) == 1 and (tmp_path / "ledger.plans.json").is_file()


def test_a_crash_right_after_the_release_still_replays_the_kept_update(fed_root, tmp_path, monkeypatch):
    """The update is kept before its charge is marked released: a site that dies between the two
    writes re-sends that update on the repeated request instead of refusing the round."""
    train, heldout = _site_paths(fed_root, 0)
    site = dp_lora.Site("client_0", train, heldout, tmp_path / "ledger.json", 100.0, fed_root / "teacher")
    cfg = _cfg(local_steps=1)
    with cache.warm_lora_model(fed_root / "teacher", cfg) as (model, _):
        initial = cache.adapter_copy(model)
    real_save, calls = dp_lora.save_release, []

    def dies_on_the_second_write(path, adapter, metrics):
        calls.append(path)
        if len(calls) == 2:  # the round's full metrics, written after ledger.release
            raise SystemExit("site killed")
        real_save(path, adapter, metrics)

    monkeypatch.setattr(dp_lora, "save_release", dies_on_the_second_write)
    with pytest.raises(SystemExit):
        dp_lora.run_round(site, cfg, "crash", 1, initial)
    monkeypatch.setattr(dp_lora, "save_release", real_save)
    ledger = PrivacyLedger.load(site.ledger_path)
    assert ledger.status_of("crash/round-1") == "released" and len(ledger.entries) == 1
    adapter, metrics, refusal = dp_lora.run_round(site, cfg, "crash", 1, initial)
    assert refusal == "" and metrics["replayed"] == 1 and len(PrivacyLedger.load(site.ledger_path).entries) == 1
    kept, _ = dp_lora.load_release(calls[0])
    assert all(np.array_equal(adapter[k], kept[k]) for k in kept)
