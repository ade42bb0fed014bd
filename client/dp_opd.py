"""The dp-opd client mode: one site's DP-SGD round on the student, on-policy against a frozen teacher.

Per physical batch of Poisson-sampled private records (DP-OPD, GKD):

1. each record is cut into a prefix (``opd-prefix``: a share of its tokens or a count) and its
   own continuation;
2. the current student samples a continuation of each prefix (``torch.no_grad``/inference
   mode, batched, KV cache, at ``opd-temperature``, at most ``opd-max-new-tokens``);
3. the frozen teacher scores prefix + continuation under inference mode (bf16 autocast on
   GPU). It is a separate model, outside opacus's wrapped module: its logits are constants
   of the record, and per-sample gradients exist for the student's LoRA only;
4. each record's loss is the generalised JSD over the continuation tokens only, mixed with
   the same divergence (and CE) on the record's own continuation (``OPDSettings``), and
   ``dp_lora``'s DP-SGD step clips each record's whole loss.

Everything around the steps (σ plan, ledger reserve → train → release, replay, refusal over
budget, empty Poisson batches, the warm student) is ``client/dp_lora.py``'s, unchanged: this
module only supplies the per-record loss and the teacher.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from client.dp_lora import train_dp_lora
from common.distill.losses import generalized_jsd_per_example
from common.models.cache import frozen_teacher
from common.models.generation import HFGenerator, SamplingSettings
from common.settings import OPDSettings, RunSettings


def prefix_lengths(lengths: torch.Tensor, prefix: float) -> torch.Tensor:
    """Tokens kept as each record's prefix: a share (< 1) or a count (≥ 1) of its ``lengths``,
    at least 1 (something to continue) and, where the record allows, one short of it (so its
    own continuation has a token)."""
    wanted = torch.floor(lengths * prefix) if prefix < 1 else torch.full_like(lengths, int(prefix))
    return torch.minimum(wanted.long().clamp(min=1), (lengths - 1).clamp(min=1))


def continuation_mask(attention_mask: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """``[B, L-1]``: logits position j counts iff its target, token j + 1, is a real token
    after the record's prefix (the prefix and padding never count)."""
    targets = torch.arange(1, attention_mask.size(1), device=attention_mask.device)
    return attention_mask[:, 1:].bool() & (targets[None, :] >= prefix[:, None])


@dataclass
class Sequences:
    """Token rows to score, with the positions that count (``continuation_mask``)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    counted: torch.Tensor

    def row(self, i: int) -> "Sequences":
        return Sequences(self.input_ids[i:i + 1], self.attention_mask[i:i + 1], self.counted[i:i + 1])


@dataclass
class OPDBatch:
    """One physical batch: the student's rollouts (on-policy) and the records themselves."""

    rollouts: Sequences | None
    records: Sequences | None

    def row(self, i: int) -> "OPDBatch":
        return OPDBatch(self.rollouts and self.rollouts.row(i), self.records and self.records.row(i))


def teacher_logits(teacher, seq: Sequences) -> torch.Tensor:
    """The teacher's next-token logits ``[B, L-1, V]``, a constant (no graph, float32)."""
    device = seq.input_ids.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        logits = teacher(input_ids=seq.input_ids, attention_mask=seq.attention_mask).logits[:, :-1].float()
    return logits.clone()  # an ordinary tensor: inference tensors cannot be saved for backward


def dp_opd_loss(student, teacher_of, batch: OPDBatch, opd: OPDSettings) -> torch.Tensor:
    """Each record's loss ``[B]``:
    ``(1 − w)·[λ·D_β(rollout) + (1 − λ)·D_β(own continuation)] + w·CE(own continuation)``.

    ``teacher_of(seq)`` gives the teacher's logits of ``seq`` (``teacher_logits``). Each term
    is a per-record mean over that record's counted tokens, so per-sample clipping bounds
    each record's whole contribution; a term whose weight is 0 is not computed.
    """
    lam, w, beta = opd.opd_lambda, opd.opd_ce_weight, opd.opd_beta
    loss = 0.0
    if batch.rollouts is not None and lam > 0 and w < 1:
        seq = batch.rollouts
        logits = student(input_ids=seq.input_ids, attention_mask=seq.attention_mask).logits[:, :-1]
        loss = loss + (1 - w) * lam * generalized_jsd_per_example(logits, teacher_of(seq), seq.counted, beta)
    if batch.records is not None and ((lam < 1 and w < 1) or w > 0):
        seq = batch.records
        logits = student(input_ids=seq.input_ids, attention_mask=seq.attention_mask).logits[:, :-1]
        if lam < 1 and w < 1:
            loss = loss + (1 - w) * (1 - lam) * generalized_jsd_per_example(logits, teacher_of(seq), seq.counted, beta)
        if w > 0:
            ce = F.cross_entropy(logits.float().transpose(1, 2), seq.input_ids[:, 1:], reduction="none")
            counted = seq.counted.float()
            loss = loss + w * (ce * counted).sum(1) / counted.sum(1).clamp(min=1)
    return loss


class OPDLoss:
    """``dp_lora``'s ``loss_fn`` for dp-opd: rollouts, teacher, loss; keeps the seconds of each part."""

    def __init__(self, teacher, tokenizer, opd: OPDSettings):
        self.teacher, self.tokenizer, self.opd = teacher, tokenizer, opd
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # Plain sampling from the student's distribution (GKD): no top-k/top-p/repeat filters.
        self.sampling = SamplingSettings(max_new_tokens=int(opd.opd_max_new_tokens),
                                         temperature=float(opd.opd_temperature), top_k=0, top_p=1.0,
                                         no_repeat_ngram_size=0, batch_size=4096)
        self.seconds = {"generation": 0.0, "teacher": 0.0}

    def __call__(self, trained, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        prefix = prefix_lengths(mask.sum(1), self.opd.opd_prefix)
        records = Sequences(input_ids, mask, continuation_mask(mask, prefix))
        rollouts = self.rollouts(trained, input_ids, prefix) if self.opd.on_policy else None
        return dp_opd_loss(trained, self.timed_teacher, OPDBatch(rollouts, records), self.opd)

    def rollouts(self, trained, input_ids: torch.Tensor, prefix: torch.Tensor) -> Sequences:
        started = time.perf_counter()
        student = getattr(trained, "_module", trained)  # opacus's GradSampleModule wraps the peft model
        generator = HFGenerator(student, self.tokenizer, device=input_ids.device)
        prefixes = [row[:p].tolist() for row, p in zip(input_ids, prefix.tolist())]
        # Fresh randomness each step (the caller reseeded torch from the OS): nothing to predict.
        seed = int(torch.randint(0, 2 ** 62, (1,)).item())
        with torch.no_grad():
            continuations = generator.continue_ids(prefixes, self.sampling, seed)
        rows = [p + c for p, (c, _) in zip(prefixes, continuations)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            attention[i, :len(row)] = 1
        ids, attention = ids.to(input_ids.device), attention.to(input_ids.device)
        self.seconds["generation"] += time.perf_counter() - started
        return Sequences(ids, attention, continuation_mask(attention, prefix.to(input_ids.device)))

    def timed_teacher(self, seq: Sequences) -> torch.Tensor:
        started = time.perf_counter()
        logits = teacher_logits(self.teacher, seq)
        self.seconds["teacher"] += time.perf_counter() - started
        return logits

    def report(self, train_seconds: float) -> dict[str, float]:
        """Per round: student generation, teacher forwards, and the rest of the DP-SGD steps."""
        return {"generation-seconds": self.seconds["generation"], "teacher-seconds": self.seconds["teacher"],
                "dp-step-seconds": max(0.0, train_seconds - self.seconds["generation"] - self.seconds["teacher"])}


def train_dp_opd(model_dir, train_path, cfg, ledger, run_id, round_id, adapter=None, planned=None, keep_at=None, *,
                 opd: OPDSettings, teacher_dir, teacher_adapter=None):
    """``train_dp_lora`` with the dp-opd loss: same signature, same charges; timings in ``report``."""
    teacher, tokenizer = frozen_teacher(teacher_dir, cfg, teacher_adapter)
    loss = OPDLoss(teacher, tokenizer, opd)
    result = train_dp_lora(model_dir, train_path, cfg, ledger, run_id, round_id, adapter, planned=planned,
                           loss_fn=loss, keep_at=keep_at)
    result.report.update(loss.report(result.metrics["train_seconds"]))
    return result


def trainer_for(settings: RunSettings):
    """The ``train`` callable ``dp_lora.run_round`` takes for this run's dp-opd rounds."""
    teacher_dir, teacher_adapter = settings.opd_teacher_model()
    return partial(train_dp_opd, opd=settings.opd, teacher_dir=teacher_dir, teacher_adapter=teacher_adapter)
