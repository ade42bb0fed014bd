"""pdss at a site: the step-by-step student, trained on the site's private records.

Each record gives one training row, both tasks of distilling step-by-step in one sequence:

    "predict: <question>\\n<answer><eos>explain: <question>\\n<rationale><eos>"

with token weights so that the record's loss is exactly L = (1 − α)·L_answer + α·L_rationale
(each term the mean token loss of its target). One row per record keeps DP-SGD's per-sample
clipping per record (two rows would be two "samples" of one record). The predict part comes
first, so its context is exactly the prompt the student sees at inference ("predict: q\\n");
the explain part also sees the predict part (a causal LM cannot hide it in one row).

Rationales come from the server's teacher, written for this site's *perturbed* prompts; a record
whose rationale came back empty or unparseable is skipped (and counted). With ``privatiser =
encoder-decoder`` the site's decoder (client/pdss_privatiser.py) first maps (sent prompt, teacher's
rationale, raw question) to a rationale for the raw question, and that is the target (an empty
decoding is skipped and counted the same way). With
``student-training = dp-sgd`` the LoRA update leaves the site, so it is trained with DP-SGD
(client/dp_lora.py's machinery) and each round is charged to the ledger, composed there with the
prompts' pure-ε charge; with ``local-only`` the model never leaves and is kept beside the ledger.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from client.dp_lora import _empty_per_sample_grads, _physical_batches, _shuffled_batches, load_release, save_release
from client.pdss import site_ledger, site_records
from common.data.task import normalise_answer
from common.errors import BudgetExceeded
from common.models.generation import HFGenerator, greedy_settings
from common.models.lm import token_losses, weighted_rows
from common.models.student_update import student_model, student_weights
from common.privacy import plan_store
from common.privacy.dp_sgd import make_private
from common.privacy.ledger import DPSGDCharge

PREDICT, EXPLAIN = "predict: ", "explain: "


def predict_prompt(question: str) -> str:
    return f"{PREDICT}{question}\n"


def multitask_rows(pairs: list[tuple[str, str, str]], tokenizer, alpha: float, max_length: int) -> TensorDataset:
    """(question, answer, rationale) triples → (input ids, mask, per-target-token weights)."""
    rows, weights = [], []
    for question, answer, rationale in pairs:
        ids, w = [], []
        tasks = ((PREDICT, answer, 1.0 - alpha), (EXPLAIN, rationale, alpha))
        for prefix, target, share in tasks[:1] if alpha == 0 else tasks:  # α = 0: the answer task alone
            context = tokenizer.encode(f"{prefix}{question}\n", add_special_tokens=False)
            goal = tokenizer.encode(target, add_special_tokens=False) + [tokenizer.eos_token_id]
            ids += context + goal
            w += [0.0] * len(context) + [share / len(goal)] * len(goal)
        rows.append(ids[:max_length])
        weights.append(w[:max_length])
    return TensorDataset(*weighted_rows(rows, weights, tokenizer.pad_token_id))


def record_loss(model, input_ids, mask, weights) -> torch.Tensor:
    """Each record's (1 − α)·L_answer + α·L_rationale (shape [batch])."""
    losses, _ = token_losses(model, input_ids, mask)
    return (losses * weights).sum(1)


def usable(records, rationales: list[str], answer_only: bool = False) -> tuple[list[tuple[str, str, str]], int]:
    """(training triples, records skipped because the teacher's rationale was empty/unparseable).
    ``answer_only``: no rationale was asked for, and every record trains the answer task."""
    if answer_only:
        return [(r.question, r.answer, "") for r in records], 0
    pairs = [(r.question, r.answer, why) for r, why in zip(records, rationales) if why.strip()]
    return pairs, len(records) - len(pairs)


def kept_model_path(site) -> Path:
    """local-only: where the site keeps its own model (it never leaves)."""
    return site.ledger_path.parent / f"{site.ledger_path.stem}.releases" / "pdss-local-student.safetensors"


def decoded_rationales(site, settings, records, prompts: list[str], rationales: list[str],
                       privatiser: str) -> list[str]:
    """encoder-decoder: each record's rationale target is the decoder's rationale for its *raw* question,
    from the prompt the site sent and the teacher's rationale for it (local post-processing of what the
    site holds: no new charge). "" where the decoder wrote nothing (the record is then skipped)."""
    from client.pdss_privatiser import load_privatiser

    return load_privatiser(site, settings, privatiser).decode(prompts, rationales, [r.question for r in records])


def train_round(site, settings, run_name: str, server_round: int, rationales: list[str],
                global_adapter: dict[str, np.ndarray], prompts: list[str] | None = None,
                privatiser: str = "") -> tuple[dict[str, np.ndarray], dict, str]:
    """One round at a site: (adapter to send, metrics, refusal or "").

    encoder-decoder: ``prompts`` (what this site sent) and ``privatiser`` (its digest) turn the
    teacher's rationales into the decoder's (``decoded_rationales``) before training.

    local-only sites send no adapter back (an empty dict) and keep theirs in ``kept_model_path``.
    A DP-SGD round already charged re-sends the update it released (like dp_lora.run_round).
    """
    cfg, p = settings.dp, settings.pdss
    records = site_records(site.train_path, settings)
    if len(rationales) != len(records) and not p.answer_only:
        return {}, {}, f"{len(rationales)} rationales for {len(records)} records: the server's list is not this site's"
    decoded = {}
    if p.encoder_decoder:
        if not privatiser or prompts is None or len(prompts) != len(records):
            return {}, {}, "privatiser = encoder-decoder needs this site's sent prompts and its privatiser's digest"
        rationales = decoded_rationales(site, settings, records, prompts, rationales, privatiser)
        decoded = {"decoder-empty": sum(not r.strip() for r in rationales)}
    pairs, skipped = usable(records, rationales, p.answer_only)
    metrics = {"num-examples": len(pairs), "skipped-records": skipped, "train-loss": float("nan"), "refused": 0,
               "replayed": 0, **decoded}
    if not pairs:
        return {}, {**metrics, "refused": 1}, "no record has a usable rationale; nothing to train on"
    federated = p.student_training == "dp-sgd"
    private = federated and cfg.private  # private = false: the ε = ∞ baseline, federated without DP
    local = kept_model_path(site)
    if not federated and server_round > 1 and local.is_file():
        global_adapter = load_release(local)[0]  # local-only: continue from the site's own model
    ledger = site_ledger(site, settings, len(records))
    charge_id, release = f"{run_name}/pdss-round-{server_round}", local.with_name(f"{run_name}-pdss-round-{server_round}.safetensors")
    plan = None
    if private:
        plan = plan_store.load_or_plan(plan_store.path_for(site.ledger_path), len(pairs), cfg.batch_size,
                                       cfg.local_steps, settings.rounds, cfg.epsilon, ledger.delta, cfg.max_grad_norm,
                                       cfg.accountant)  # σ once per run, kept beside the ledger
        if ledger.status_of(charge_id) == "released":
            if release.is_file():
                adapter, saved = load_release(release)
                return adapter, {**saved, "replayed": 1}, ""
            return {}, {**metrics, "refused": 1}, f"round {server_round} was charged but its update was not kept"
        try:
            ledger.reserve(charge_id, DPSGDCharge(plan.noise_multiplier, plan.sample_rate, cfg.local_steps,
                                                  plan.max_grad_norm), run_id=run_name, round=server_round,
                           extra={"model": "pdss step-by-step student"})
        except BudgetExceeded as refusal:
            return {}, {**metrics, "refused": 1}, str(refusal)
    with student_model(site.model_dir, settings, global_adapter) as (model, tokenizer):
        data = multitask_rows(pairs, tokenizer, p.rationale_weight, cfg.max_length * 2)
        optimizer = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=cfg.learning_rate)
        torch.seed()  # DP noise and Poisson sampling must not follow the config's seed
        trained = model
        try:
            if private:
                _, trained, optimizer, loader = make_private(model, optimizer, data, cfg.batch_size, plan)
                batches = _physical_batches(loader, optimizer, cfg.max_physical_batch_size)
            else:
                batches = _shuffled_batches(data, cfg.batch_size)
            history = _steps(trained, optimizer, batches, cfg.local_steps, private)
        finally:
            if trained is not model:
                trained.to_standard_module()
        adapter = student_weights(model, settings)  # the LoRA adapter, or all trainable weights (full)
    finite = [h for h in history if math.isfinite(h)]
    metrics["train-loss"] = float(np.mean(finite)) if finite else float("nan")
    if private:
        save_release(release, adapter, metrics)  # kept first: a repeated request re-sends it
        ledger.release(charge_id)
        metrics["epsilon-spent"] = ledger.spent_epsilon()
        return adapter, metrics, ""
    if federated:
        return adapter, metrics, ""
    save_release(local, adapter, metrics)
    return {}, {**metrics, "local-only": 1}, ""


def _steps(model, optimizer, batches, steps: int, private: bool) -> list[float]:
    device = next(model.parameters()).device
    model.train()
    history, losses = [], []
    for input_ids, mask, weights in batches:
        if input_ids.numel():
            loss = record_loss(model, input_ids.to(device), mask.to(device), weights.to(device)).mean()
            loss.backward()
            losses.append(loss.item())
        elif private:
            _empty_per_sample_grads(model)  # an empty Poisson batch still takes its noise-only step
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if getattr(optimizer, "_is_last_step_skipped", False):
            continue
        history.append(float(np.mean(losses)) if losses else float("nan"))
        losses = []
        if len(history) == steps:
            break
    return history


def answer_of(text: str) -> str:
    return text.strip().split("\n")[0].strip()


def heldout_accuracy(site, settings, adapter: dict[str, np.ndarray] | None) -> tuple[float, int]:
    """Exact-match answer accuracy (after normalisation) of the student on the held-out split.

    ``adapter`` None: the site's own kept model (local-only)."""
    records = site_records(site.heldout_path, settings)
    if adapter is None:
        adapter = load_release(kept_model_path(site))[0]
    with student_model(site.model_dir, settings, adapter) as (model, tokenizer):
        generator = HFGenerator(model, tokenizer, device=next(model.parameters()).device)
        outs = generator.generate([predict_prompt(r.question) for r in records], greedy_settings(
            settings.pdss.student_eval_max_new_tokens, settings.pdss.teacher_batch_size), seed=0)
    correct = sum(normalise_answer(answer_of(o.text)) == normalise_answer(r.answer) for o, r in zip(outs, records))
    return correct / len(records), len(records)
