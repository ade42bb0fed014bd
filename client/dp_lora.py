"""The dp-lora client mode: one site's DP-SGD LoRA step on its private split.

``train_dp_lora`` is the unit Flower's ClientApp calls each round (and ``privdistill
train-local`` calls once, without any federation): config + data path + the global adapter
in, adapter tensors + metrics out. Nothing is pickled and no record leaves this function.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from common.atomic import atomic_write_bytes
from common.data.control import load_model_texts
from common.errors import BudgetExceeded
from common.models.build import build_model, pick_device
from common.models.cache import adapter_copy, warm_lora_model
from common.models.loading import load_lora_model
from common.models.lm import encode_texts, per_record_loss, perplexity
from common.privacy import plan_store
from common.privacy.dp_sgd import DPSGDPlan, make_private, plan_dp_sgd
from common.privacy.ledger import DPSGDCharge, PrivacyLedger
from common.settings import DPLoRAConfig

__all__ = ["DPLoRAConfig", "load_lora_model", "train_dp_lora", "run_round", "heldout_perplexity", "heldout_metrics"]


@dataclass
class LocalResult:
    adapter: dict[str, np.ndarray]
    metrics: dict[str, float]
    plan: DPSGDPlan
    history: list[float] = field(default_factory=list)  # train loss per logical step
    report: dict[str, float] = field(default_factory=dict)  # mode-specific metrics for the reply (timings)


def load_texts(path: str | Path, cfg: DPLoRAConfig) -> list[str]:
    """A site's records as its models see them (with control codes when ``label-field`` is set)."""
    return load_model_texts(path, cfg.text_field, cfg.label_field)


def plan_for(train_path: str | Path, cfg: DPLoRAConfig, store: str | Path | None = None
             ) -> tuple[list[str], DPSGDPlan]:
    """The site's records and its σ plan for the whole run.

    With ``store`` (a site's plan file beside its ledger, ``plan_store.path_for``) the plan is
    calibrated once and reused by every later message, also across processes.
    """
    texts = load_texts(train_path, cfg)
    args = (len(texts), cfg.batch_size, cfg.local_steps, cfg.rounds, cfg.epsilon, cfg.delta, cfg.max_grad_norm,
            cfg.accountant)
    plan = plan_store.load_or_plan(store, *args) if store is not None else plan_dp_sgd(*args)
    return texts, plan


def train_dp_lora(model_dir: str | Path, train_path: str | Path, cfg: DPLoRAConfig, ledger: PrivacyLedger | None,
                  run_id: str, round_id: int, adapter: dict[str, np.ndarray] | None = None,
                  save_to: str | Path | None = None, progress: bool = False,
                  planned: tuple[list[str], DPSGDPlan] | None = None, loss_fn=per_record_loss,
                  keep_at: str | Path | None = None) -> LocalResult:
    """Run ``cfg.local_steps`` DP-SGD steps on the LoRA adapters and charge the ledger once.

    ``keep_at``: where the update is kept (``save_release``) *before* the charge is marked
    released, so a charged round always has its update to re-send (a crash in between leaves a
    reservation, which is trained again: conservative, never a release without a copy).

    ``loss_fn`` is each record's loss (``_train_steps``): the LM loss here, dp-opd's
    rollout-against-the-teacher loss in ``client/dp_opd.py``.

    With ``cfg.private = False`` (audit baselines only) the same steps run without clipping
    or noise and nothing is charged: the result has no privacy guarantee (ε = ∞).
    """
    texts, plan = planned or plan_for(train_path, cfg)  # σ calibration costs seconds: reuse a plan
    charge = DPSGDCharge(plan.noise_multiplier, plan.sample_rate, cfg.local_steps, plan.max_grad_norm)
    charge_id = f"{run_id}/round-{round_id}"
    if cfg.private:  # holds the budget before any training (atomic check-and-reserve under the ledger's lock)
        ledger.reserve(charge_id, charge, run_id=run_id, round=round_id)

    # A warm model (this process's cached base + LoRA layers, common/models/cache.py) when there
    # is one: the same weights a cold load gives, reset and checked after the block.
    with warm_lora_model(model_dir, cfg, adapter) as (model, tokenizer):
        dataset = encode_texts(texts, tokenizer, cfg.max_length)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
        torch.seed()  # DP noise and Poisson sampling must not be predictable from the config's seed
        trained = model
        try:
            if cfg.private:
                _, trained, optimizer, loader = make_private(model, optimizer, dataset, cfg.batch_size, plan)
                batches = _physical_batches(loader, optimizer, cfg.max_physical_batch_size)
            else:
                batches = _shuffled_batches(dataset, cfg.batch_size)
            started = time.perf_counter()
            history = _train_steps(trained, optimizer, batches, cfg, round_id, progress, loss_fn)
            train_seconds = time.perf_counter() - started
        finally:
            if trained is not model:
                trained.to_standard_module()  # opacus's hooks and per-sample attributes off the model
        if save_to is not None:
            model.save_pretrained(save_to)
        adapter_out = adapter_copy(model)  # owns its memory: the cached model is reset after this block

    finite = [h for h in history if math.isfinite(h)]
    metrics = {
        "train_loss": float(np.mean(finite)) if finite else float("nan"),
        "examples": len(texts),
        "steps": cfg.local_steps,
        "noise_multiplier": plan.noise_multiplier if cfg.private else 0.0,
        "sample_rate": plan.sample_rate,
        "epsilon_spent": ledger.spent_epsilon() if cfg.private else math.inf,
        "epsilon_remaining": ledger.remaining_epsilon() if cfg.private else 0.0,
    }
    metrics["train_seconds"] = train_seconds  # wall seconds of the steps (a client mode may report its parts)
    if cfg.private:  # the update may now leave the site: kept first, then released
        if keep_at is not None:
            save_release(Path(keep_at), adapter_out, {"num-examples": len(texts), "train-loss": metrics["train_loss"]})
        ledger.release(charge_id)
        metrics["epsilon_spent"], metrics["epsilon_remaining"] = ledger.spent_epsilon(), ledger.remaining_epsilon()
    return LocalResult(adapter_out, metrics, plan, history)


def _train_steps(trained, optimizer, batches, cfg: DPLoRAConfig, round_id: int, progress: bool,
                 loss_fn=per_record_loss) -> list[float]:
    """``cfg.local_steps`` logical steps; the mean train loss of each.

    ``loss_fn(trained, input_ids, mask)`` gives each record's loss ([batch]); per-sample
    clipping covers all of it (dp-opd passes its rollout + teacher loss here)."""
    device = next(trained.parameters()).device
    trained.train()
    history: list[float] = []   # mean train loss of each logical step
    step_losses: list[float] = []
    with tqdm(total=cfg.local_steps, desc=f"{'DP-SGD' if cfg.private else 'NON-PRIVATE'} round {round_id}",
              disable=not progress) as bar:
        for input_ids, mask in batches:
            if input_ids.numel():
                loss = loss_fn(trained, input_ids.to(device), mask.to(device)).mean()
                loss.backward()
                step_losses.append(loss.item())
            elif cfg.private:
                _empty_per_sample_grads(trained)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if getattr(optimizer, "_is_last_step_skipped", False):  # a physical slice of a logical batch
                continue
            history.append(float(np.mean(step_losses)) if step_losses else float("nan"))
            step_losses = []
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]:.3f}")
            if len(history) == cfg.local_steps:
                break
    return history


def _empty_per_sample_grads(model) -> None:
    """Zero-size per-sample gradients for an empty Poisson batch.

    The batch must still take its step (noise only): the accountant assumes every step samples,
    and skipping one would change the mechanism. The model cannot run a forward pass on zero
    records (GPT-2 cannot reshape an empty batch), and opacus refuses to step without per-sample
    gradients, so they are set here to what a forward/backward over no records would give.
    """
    for p in model.parameters():
        if p.requires_grad:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)


def _shuffled_batches(dataset, batch_size: int):
    """Endless shuffled batches for the non-private baseline."""
    while True:
        yield from DataLoader(dataset, batch_size=batch_size, shuffle=True)


# ---------------------------------------------------------------------------- federated round
@dataclass
class Site:
    """Where one site keeps its private data and its ledger (from Flower's node config)."""

    client_id: str
    train_path: Path
    heldout_path: Path
    ledger_path: Path
    epsilon_budget: float
    model_dir: Path
    extends_run: str = ""  # a run whose charges in this ledger this run's budget is planned on top of (dp-opd)


def run_round(site: Site, cfg: DPLoRAConfig, run_name: str, server_round: int,
              global_adapter: dict[str, np.ndarray], train=None) -> tuple[dict[str, np.ndarray], dict[str, float], str]:
    """One federated round at a site: (adapter to send, metrics, refusal reason or "").

    ``train`` is the client mode's trainer, with ``train_dp_lora``'s signature (the default);
    dp-opd passes its own, so both charge the ledger the same way.

    A round already charged in the ledger is never trained twice: the update released then
    is sent again (re-sending the same bytes costs no privacy). A site over budget refuses.
    σ is calibrated once per run and kept beside the ledger (``plan_store``): a deployed site,
    which starts a fresh process for every message, does not search for it again each round.
    """
    train = train or train_dp_lora
    planned = plan_for(site.train_path, cfg, store=plan_store.path_for(site.ledger_path))
    plan = planned[1]
    if not cfg.private:
        result = train(site.model_dir, site.train_path, cfg, None, run_name, server_round, global_adapter,
                       planned=planned)
        return result.adapter, {"num-examples": result.metrics["examples"], "train-loss": result.metrics["train_loss"],
                                "noise-multiplier": 0.0, "epsilon-spent": math.inf, "epsilon-remaining": 0.0,
                                "refused": 0, "replayed": 0, "unit-weight": 1, **result.report}, ""
    if site.extends_run and not _holds_run(site.ledger_path, site.extends_run):
        # A fresh ledger would hide the earlier run's ε from this site's composed figure.
        return global_adapter, {"num-examples": 0, "refused": 1}, (
            f"ledger {site.ledger_path} holds no charges of run {site.extends_run!r}, whose release this run uses; "
            "point the site at the ledger that run charged")
    ledger = PrivacyLedger.open(site.ledger_path, site.client_id, site.epsilon_budget, plan.delta, cfg.accountant,
                                grow_budget=bool(site.extends_run))
    charge_id = f"{run_name}/round-{server_round}"
    release = site.ledger_path.parent / f"{site.ledger_path.stem}.releases" / f"{run_name}-round-{server_round}.safetensors"
    metrics = {"num-examples": 0, "train-loss": float("nan"), "noise-multiplier": plan.noise_multiplier,
               "epsilon-spent": ledger.spent_epsilon(), "epsilon-remaining": ledger.remaining_epsilon(),
               "refused": 0, "replayed": 0, "unit-weight": 1}
    # A reservation never released (a crash mid-training) released nothing: train under it again.
    if ledger.has_charge(charge_id) and ledger.status_of(charge_id) != "reserved":
        if release.is_file():
            adapter, saved = load_release(release)
            return adapter, {**metrics, **saved, "replayed": 1}, ""
        return global_adapter, {**metrics, "refused": 1}, (
            f"round {server_round} of run {run_name!r} was already charged but its update was not kept; "
            "not training it twice")
    try:
        result = train(site.model_dir, site.train_path, cfg, ledger, run_name, server_round, global_adapter,
                       planned=planned, keep_at=release)
    except BudgetExceeded as refusal:
        return global_adapter, {**metrics, "refused": 1}, str(refusal)
    metrics.update({"num-examples": result.metrics["examples"], "train-loss": result.metrics["train_loss"],
                    "epsilon-spent": result.metrics["epsilon_spent"],
                    "epsilon-remaining": result.metrics["epsilon_remaining"], **result.report})
    save_release(release, result.adapter, metrics)  # the same update, now with the whole round's metrics
    return result.adapter, metrics, ""


def _holds_run(ledger_path: Path, run_id: str) -> bool:
    return ledger_path.is_file() and any(e["run_id"] == run_id for e in PrivacyLedger.load(ledger_path).entries)


def save_release(path: Path, adapter: dict[str, np.ndarray], metrics: dict) -> None:
    """Keep what a round released (safetensors, metrics in its metadata) for exact replays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in adapter.items()},
                                  metadata={"metrics": json.dumps(metrics)})
    atomic_write_bytes(path, data)


def load_release(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    with safetensors.safe_open(str(path), framework="np") as f:
        metrics = json.loads(f.metadata()["metrics"])
        return {k: f.get_tensor(k) for k in f.keys()}, metrics


def _physical_batches(loader, optimizer, max_physical_batch_size: int):
    """Endless physical batches over Poisson-sampled logical batches (one pass = one epoch)."""
    from opacus.utils.batch_memory_manager import BatchMemoryManager  # lazy: evaluation never needs opacus

    while True:
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=max_physical_batch_size,
                                optimizer=optimizer) as batches:
            yield from batches


def heldout_perplexity(model_dir: str | Path, data_path: str | Path, cfg: DPLoRAConfig,
                       adapter: dict[str, np.ndarray] | None = None, model=None) -> tuple[float, int]:
    """Perplexity of the (adapted) model on a held-out file, and its record count.

    ``model`` (e.g. a distilled student) is scored with ``model_dir``'s tokenizer instead.
    """
    texts = load_texts(data_path, cfg)
    if model is not None:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    elif adapter is None:
        device, _ = pick_device(cfg.device)
        model, tokenizer = build_model(model_dir).to(device), AutoTokenizer.from_pretrained(model_dir)
    else:
        with warm_lora_model(model_dir, cfg, adapter) as (model, tokenizer):
            return perplexity(model, encode_texts(texts, tokenizer, cfg.max_length)), len(texts)
    return perplexity(model, encode_texts(texts, tokenizer, cfg.max_length)), len(texts)


def heldout_metrics(site: Site, cfg: DPLoRAConfig, adapter: dict[str, np.ndarray]) -> dict[str, float]:
    """What a train reply says about the adapter it came with, before the site trains on it:
    ``heldout-loss`` (mean token loss, = log perplexity), ``heldout-perplexity`` and
    ``heldout-examples`` (held-out records). Evaluation spends no privacy budget."""
    ppl, n = heldout_perplexity(site.model_dir, site.heldout_path, cfg, adapter)
    return {"heldout-loss": math.log(ppl), "heldout-perplexity": ppl, "heldout-examples": n}
