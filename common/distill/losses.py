"""Distillation losses for the student phases (DistilDP now, DP-OPD later).

One function per loss, in the spirit of TRL's ``GKDTrainer``:

* ``soft_targets``: the teacher's next-token distribution at temperature T, optionally cut to
  its top-k tokens and renormalised, so what is kept per step is [B, L-1, k] instead of
  [B, L-1, V].
* ``kd_loss``: DistilDP's loss ``(1−λ)·CE + λ·T²·KL(teacher_T ‖ student_T) + β·hidden``.
* ``HiddenProjector`` and ``uniform_layer_map``: hidden-state alignment ``MSE(W·h_s, h_t)`` over
  a layer map, with a learned W, so a student narrower than its teacher can be aligned too
  (the reference code aligns only the last hidden state of equal-width models).
* ``generalized_jsd`` / ``generalized_jsd_per_example``: GKD's generalised Jensen–Shannon
  divergence (Agarwal et al.), the DP-OPD objective.

Conventions shared by every function here:

* Next-token alignment is ``common.models.lm.token_losses``'s: ``logits[:, :-1]`` predict
  ``input_ids[:, 1:]``, and a position counts iff ``attention_mask[:, 1:]`` is 1 there (its
  *target* is a real token). Padding never counts in any term. The reference DistilDP code
  puts pad tokens into its labels; we don't.
* All softmaxes run in float32, whatever the models' dtype: bf16 keeps 8 mantissa bits, so
  its log-probs are off by more than a well-trained student's whole KL to the teacher.
* The teacher is a constant: its tensors must carry no gradient. Tensors it produced under
  ``torch.inference_mode`` are accepted (they are cloned into ordinary tensors where autograd
  has to save them, which inference tensors forbid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------

def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_unit_interval(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _plain(t: torch.Tensor) -> torch.Tensor:
    # Tensors created under torch.inference_mode cannot be saved for backward (e.g. gather
    # saves its index). A clone made outside inference mode is an ordinary constant tensor.
    return t.clone() if t.is_inference() else t


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is true; 0 when there are none.

    ``torch.where`` rather than a product, so a NaN/inf computed at a pad position (garbage
    logits after the end of a record) cannot leak into the mean.
    """
    mask = mask.bool()
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) over the last dim, from log-probabilities; entries with p = 0 contribute 0.

    (``0 · log 0`` is 0 by convention; computing it literally gives NaN when a logit is -inf.)
    """
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


# ---------------------------------------------------------------------------------------------
# Teacher soft targets
# ---------------------------------------------------------------------------------------------

@dataclass
class SoftTargets:
    """The teacher's distribution at temperature T over the shifted positions.

    ``logprobs[b, j]`` is the teacher's distribution of token ``j + 1`` given tokens ``0..j``.
    With top-k, ``indices[b, j]`` are the token ids of the kept entries and ``logprobs`` is
    renormalised over them; ``indices is None`` means the full vocabulary, in vocab order.
    """

    logprobs: torch.Tensor        # [B, L-1, K] float32
    indices: torch.Tensor | None  # [B, L-1, K] int64, or None for the full vocabulary


def soft_targets(teacher_logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None) -> SoftTargets:
    """Soft labels from the teacher's logits ``[B, L, V]`` (call it inside the teacher's
    ``torch.inference_mode`` block, so nothing here is recorded by autograd).

    The last position is dropped: it predicts the token after the record, which has no label.
    ``top_k`` keeps the teacher's k most likely tokens per position and renormalises, so the
    targets kept per step stay bounded for large vocabularies (the student side still uses
    its full softmax, see ``kd_loss``). ``top_k=None`` or ``top_k >= V`` keeps everything.
    """
    _check_temperature(temperature)
    if teacher_logits.dim() != 3:
        raise ValueError(f"teacher_logits must be [batch, length, vocab], got shape {_shape(teacher_logits)}")
    if teacher_logits.size(1) < 2:
        raise ValueError(f"teacher_logits need at least 2 positions for next-token targets, "
                         f"got shape {_shape(teacher_logits)}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    scaled = teacher_logits[:, :-1].float() / temperature
    if top_k is None or top_k >= scaled.size(-1):
        return SoftTargets(logprobs=F.log_softmax(scaled, dim=-1), indices=None)
    # Renormalising over the kept logits is exactly softmax restricted to the top-k support.
    values, indices = scaled.topk(top_k, dim=-1)
    return SoftTargets(logprobs=F.log_softmax(values, dim=-1), indices=indices)


# ---------------------------------------------------------------------------------------------
# Hidden-state alignment
# ---------------------------------------------------------------------------------------------

def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """(student, teacher) hidden-state index pairs for ``output_hidden_states=True``.

    Index 0 is the embedding output, index i the output after block i. Student block j is
    paired with teacher block round(j · teacher_layers / student_layers) (half rounds up),
    for j = 1..student_layers, so the last block always meets the last block and the map is
    monotone. A student deeper than its teacher shares teacher blocks (never the embeddings).
    """
    for name, n in (("student_layers", student_layers), ("teacher_layers", teacher_layers)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive integer, got {n!r}")
    # Integer arithmetic for round-half-up: Python's round() is banker's rounding.
    return [(j, max(1, (2 * j * teacher_layers + student_layers) // (2 * student_layers)))
            for j in range(1, student_layers + 1)]


class HiddenProjector(torch.nn.Module):
    """Learned projections W_i (``Linear(d_student, d_teacher)``), one per mapped layer pair.

    When the widths are equal each W starts as the identity (and zero bias), so at step 0
    the loss is exactly the reference's plain equal-width MSE and training can only refine
    the map. When they differ, W is a normal ``nn.Linear`` (PyTorch's default init, seeded
    by the caller). W is trained with the student and thrown away afterwards: it is not
    part of the exported model.
    """

    def __init__(self, student_width: int, teacher_width: int, layer_map: list[tuple[int, int]]):
        super().__init__()
        for name, n in (("student_width", student_width), ("teacher_width", teacher_width)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be a positive integer, got {n!r}")
        layer_map = [(int(s), int(t)) for s, t in layer_map]
        if not layer_map:
            raise ValueError("layer_map is empty: give at least one (student, teacher) pair")
        if any(s < 0 or t < 0 for s, t in layer_map):
            raise ValueError(f"layer_map indices must be >= 0, got {layer_map}")
        self.student_width, self.teacher_width = student_width, teacher_width
        self.layer_map = layer_map
        self.proj = torch.nn.ModuleList(torch.nn.Linear(student_width, teacher_width) for _ in layer_map)
        if student_width == teacher_width:
            with torch.no_grad():
                for lin in self.proj:
                    lin.weight.copy_(torch.eye(student_width))
                    lin.bias.zero_()

    def forward(self, student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...],
                mask: torch.Tensor) -> torch.Tensor:
        """Mean over mapped layers of the masked MSE ``mean_d (W·h_s − h_t)²`` over valid positions.

        ``mask`` is the (unshifted) attention mask ``[B, L]``: hidden states live at input
        positions, so position i counts iff token i is real.
        """
        ns, nt = len(student_hidden), len(teacher_hidden)
        losses = []
        for (si, ti), lin in zip(self.layer_map, self.proj):
            if si >= ns or ti >= nt:
                raise ValueError(f"layer map pair ({si}, {ti}) is out of range: the student has {ns} hidden "
                                 f"states and the teacher {nt} (index 0 = embeddings)")
            h_s, h_t = student_hidden[si], teacher_hidden[ti]
            if h_t.requires_grad:
                raise ValueError(f"teacher hidden state {ti} requires grad; compute the teacher under "
                                 "torch.inference_mode (the teacher is a constant)")
            if h_s.dim() != 3 or h_t.dim() != 3 or h_s.shape[:2] != h_t.shape[:2] or h_s.shape[:2] != mask.shape:
                raise ValueError(f"hidden-state shapes do not match: student {_shape(h_s)}, teacher {_shape(h_t)}, "
                                 f"mask {_shape(mask)} (expected [B, L, d_s], [B, L, d_t], [B, L])")
            if h_s.size(-1) != self.student_width or h_t.size(-1) != self.teacher_width:
                raise ValueError(f"hidden widths {h_s.size(-1)} (student) and {h_t.size(-1)} (teacher) differ "
                                 f"from the projector's {self.student_width} → {self.teacher_width}")
            pred = lin(h_s.to(lin.weight.dtype)).float()
            per_position = (pred - _plain(h_t).float()).pow(2).mean(-1)
            losses.append(_masked_mean(per_position, mask))
        return torch.stack(losses).mean()


# ---------------------------------------------------------------------------------------------
# DistilDP's KD loss
# ---------------------------------------------------------------------------------------------

@dataclass
class KDLoss:
    """The total and its parts (scalars). ``total`` is what to backpropagate; the parts are for
    logging (``ce`` is the student's plain next-token loss, ``kl`` is before λ·T²)."""

    total: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor
    hidden: torch.Tensor


def _check_kd_inputs(student_logits, input_ids, attention_mask, targets, lam, temperature, hidden_loss, beta,
                     kl_start) -> None:
    """Every ValueError of ``kd_loss``: settings first, then shapes (naming both sides)."""
    _check_unit_interval("lam (λ)", lam)
    _check_temperature(temperature)
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta (β, hidden-state weight) must be a finite number >= 0, got {beta!r}")
    if isinstance(kl_start, bool) or not isinstance(kl_start, int) or kl_start < 0:
        raise ValueError(f"kl_start must be an integer >= 0, got {kl_start!r}")
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [batch, length, vocab], got shape {_shape(student_logits)}")
    batch, length, vocab = student_logits.shape
    if _shape(input_ids) != (batch, length) or _shape(attention_mask) != (batch, length):
        raise ValueError(f"input_ids {_shape(input_ids)} and attention_mask {_shape(attention_mask)} must both be "
                         f"[batch, length] = {(batch, length)} to match student_logits {_shape(student_logits)}")
    t_logprobs, t_indices = targets.logprobs, targets.indices
    if t_logprobs.dim() != 3 or t_logprobs.shape[:2] != (batch, length - 1):
        raise ValueError(f"teacher soft targets {_shape(t_logprobs)} do not match student_logits "
                         f"{_shape(student_logits)}: expected [{batch}, {length - 1}, K] (one position fewer)")
    if t_indices is None and t_logprobs.size(-1) != vocab:
        raise ValueError(f"teacher vocabulary {t_logprobs.size(-1)} != student vocabulary {vocab}: "
                         "teacher and student must share the tokenizer")
    if t_indices is not None:
        if t_indices.shape != t_logprobs.shape:
            raise ValueError(f"top-k indices {_shape(t_indices)} and log-probs {_shape(t_logprobs)} differ in shape")
        if t_logprobs.size(-1) > vocab or (t_indices.numel() and int(t_indices.max()) >= vocab):
            raise ValueError(f"teacher top-k token ids reach {int(t_indices.max())}, beyond the student "
                             f"vocabulary {vocab}: teacher and student must share the tokenizer")
    if t_logprobs.requires_grad:
        raise ValueError("teacher soft targets require grad; compute them under torch.inference_mode")
    if hidden_loss is not None and hidden_loss.dim() != 0:
        raise ValueError(f"hidden_loss must be a scalar, got shape {_shape(hidden_loss)}")
    if beta > 0 and hidden_loss is None:
        raise ValueError(f"beta = {beta} weights a hidden-state loss, but hidden_loss is None")



def kd_loss(student_logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            targets: SoftTargets, lam: float = 0.4, temperature: float = 1.0,
            hidden_loss: torch.Tensor | None = None, beta: float = 0.0, kl_start: int = 0) -> KDLoss:
    """``L = (1−λ)·CE(hard labels) + λ·T²·KL(teacher_T ‖ student_T) + β·hidden_loss``.

    * CE: next-token cross-entropy, mean over the batch's valid target tokens.
    * KL: per position ``Σ_k p_t(k)·(log p_t(k) − log q_s(k))`` with ``q_s = softmax(student/T)``
      over the *full* vocabulary; with top-k targets the sum runs over the teacher's kept
      tokens (the student's log-probs are gathered there, not renormalised, so the term is
      still ≥ 0 and still pushes mass off the tokens the teacher dropped). Mean over valid
      positions with index ≥ ``kl_start`` (shifted positions: logits position j predicts token
      j + 1; the reference starts at 5, past the control-code prompt).
    * T² keeps the soft term's gradient scale independent of T (Hinton et al.): softening by
      T shrinks the logit gradients by 1/T².
    * ``hidden_loss``: e.g. ``HiddenProjector(...)(...)``; required when β > 0.
    """
    _check_kd_inputs(student_logits, input_ids, attention_mask, targets, lam, temperature, hidden_loss, beta,
                     kl_start)
    _, length, vocab = student_logits.shape
    t_logprobs, t_indices = targets.logprobs, targets.indices

    logits = student_logits[:, :-1].float()
    labels = input_ids[:, 1:]
    valid = attention_mask[:, 1:].bool()  # the target token is real

    # The student's log-probs at T over its full vocabulary. At T = 1 (the reference's
    # setting) the hard-label term reuses them: one [B, L-1, V] softmax and backward fewer.
    student_logprobs = F.log_softmax(logits / temperature if temperature != 1 else logits, dim=-1)
    hard_logprobs = student_logprobs if temperature == 1 else F.log_softmax(logits, dim=-1)

    # Hard labels. ignore_index makes pad targets contribute neither loss nor gradient.
    ce_sum = F.nll_loss(hard_logprobs.reshape(-1, vocab), labels.masked_fill(~valid, -100).reshape(-1),
                        ignore_index=-100, reduction="sum")
    ce = ce_sum / valid.sum().clamp(min=1)

    # Soft labels: the student's softmax is over its full vocabulary first, then (top-k)
    # gathered at the teacher's kept tokens, so both sides refer to the same token ids.
    if t_indices is not None:
        student_logprobs = student_logprobs.gather(-1, _plain(t_indices))
    # KL(p_t ‖ q_s) = Σ p_t·log p_t − Σ p_t·log q_s. The first sum is a constant (the teacher's
    # negative entropy, no graph); only the soft cross-entropy is differentiated: one product
    # per entry instead of _kl's where/sub/mul, measurably cheaper at [B, L-1, V].
    # p_t is computed here, outside inference mode, so autograd may save it.
    p_t = t_logprobs.exp()
    teacher_neg_entropy = torch.where(p_t > 0, p_t * t_logprobs, 0.0).sum(-1)
    kl_per_position = teacher_neg_entropy - (p_t * student_logprobs).sum(-1)
    positions = torch.arange(length - 1, device=valid.device)
    kl = _masked_mean(kl_per_position, valid & (positions >= kl_start))

    hidden = hidden_loss if hidden_loss is not None else logits.new_zeros(())
    total = (1.0 - lam) * ce + lam * temperature ** 2 * kl + beta * hidden
    return KDLoss(total=total, ce=ce, kl=kl, hidden=hidden)


# ---------------------------------------------------------------------------------------------
# Generalised JSD (GKD, DP-OPD)
# ---------------------------------------------------------------------------------------------

def _check_aligned(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> None:
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [batch, positions, vocab], got shape {_shape(student_logits)}")
    if teacher_logits.shape != student_logits.shape:
        if teacher_logits.dim() == 3 and teacher_logits.shape[:2] == student_logits.shape[:2]:
            raise ValueError(f"teacher vocabulary {teacher_logits.size(-1)} != student vocabulary "
                             f"{student_logits.size(-1)}: teacher and student must share the tokenizer")
        raise ValueError(f"teacher_logits {_shape(teacher_logits)} and student_logits {_shape(student_logits)} "
                         "must have the same shape (already aligned: [batch, positions, vocab])")
    if mask.shape != student_logits.shape[:2]:
        raise ValueError(f"mask {_shape(mask)} must be [batch, positions] = {_shape(student_logits)[:2]}")


def _jsd_per_position(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                      temperature: float) -> torch.Tensor:
    """Generalised JSD at every position, ``[B, N]`` (as TRL's ``generalized_jsd_loss``).

    M = β·P_t + (1−β)·P_s and JSD_β = β·KL(P_t ‖ M) + (1−β)·KL(P_s ‖ M). Taken literally,
    both limits vanish (M → one of the two), so, like TRL, β = 0 and β = 1 are *defined* as
    the two KLs the family interpolates between: forward KL(P_t ‖ P_s) (mode-covering, what
    DP-OPD found best) and reverse KL(P_s ‖ P_t) (mode-seeking). No T² factor (GKD has none).
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0:
        return _kl(t, s)
    if beta == 1:
        return _kl(s, t)
    # log M by logsumexp of the two weighted log-probs: stable where either is tiny.
    log_m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1.0 - beta)]), dim=0)
    return beta * _kl(t, log_m) + (1.0 - beta) * _kl(s, log_m)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                    beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Generalised JSD between aligned ``[B, N, V]`` logits, mean over the masked positions of
    the whole batch (the teacher is a constant: pass its logits without grad)."""
    _check_unit_interval("beta (β)", beta)
    _check_temperature(temperature)
    _check_aligned(student_logits, teacher_logits, mask)
    return _masked_mean(_jsd_per_position(student_logits, teacher_logits, beta, temperature), mask)


def generalized_jsd_per_example(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                                beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Per-example generalised JSD ``[B]``: each example's mean over its own masked positions.

    DP-SGD clips per example, so a per-example mean (not a token-weighted batch mean) makes
    each example's gradient that of its own loss whatever its length (as
    ``common.models.lm.per_record_loss`` does for CE). An example with no masked position
    gets 0.
    """
    _check_unit_interval("beta (β)", beta)
    _check_temperature(temperature)
    _check_aligned(student_logits, teacher_logits, mask)
    per_position = _jsd_per_position(student_logits, teacher_logits, beta, temperature)
    m = mask.bool()
    return torch.where(m, per_position, 0.0).sum(1) / m.sum(1).clamp(min=1)
