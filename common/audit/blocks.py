"""Per-block privacy risk: perturb one decoder block's weights and watch each record's loss.

Raw score (``block_scores``), per record: ``loss(original) - mean_s loss(perturbed_s)``, where
``perturbed_s`` adds N(0, sigma^2) noise (generator seeded with ``s``) to every parameter of
that one block. A block that memorised a record makes its loss rise when perturbed, so the raw
score is MORE NEGATIVE for members. ``per_block_auc`` therefore uses the negated raw score,
``mean_s loss(perturbed_s) - loss(original)`` (the loss increase), as the membership score
(higher = member, as everywhere in ``common.audit.mia``): AUC > 0.5 means the block's
weights separate members from non-members.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from common.audit.mia import AuditError, check_disjoint, roc_auc
from common.audit.scoring import mean_loss, token_logprobs


def transformer_blocks(model) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` for each decoder block, named as in ``model.named_modules()``.

    Finds the ``nn.ModuleList`` of identical blocks (``transformer.h`` in GPT-2,
    ``model.layers`` in Llama, also under a peft wrapper): the one whose length equals
    ``config.num_hidden_layers``, else the longest such list.
    """
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [(name, mod) for name, mod in model.named_modules()
                  if isinstance(mod, nn.ModuleList) and len(mod) > 0
                  and len({type(child) for child in mod}) == 1]
    exact = [c for c in candidates if len(c[1]) == n_layers]
    pool = exact or candidates
    if not pool:
        raise AuditError(f"cannot find the decoder blocks of {type(model).__name__} (no nn.ModuleList of "
                         "identical layers); per-block risk supports GPT-2 and Llama style models")
    name, blocks = min(pool, key=lambda c: (-len(c[1]), len(c[0])))
    return [(f"{name}.{i}", block) for i, block in enumerate(blocks)]


def _losses(model, tokenizer, texts, batch_size, max_length) -> np.ndarray:
    logprobs = token_logprobs(model, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    return np.array([mean_loss(lp) for lp in logprobs])


def block_scores(model, tokenizer, texts: list[str], block_index: int, sigma: float = 0.01,
                 seeds=(0, 1, 2), batch_size: int = 16, max_length: int = 128) -> np.ndarray:
    """Per record: ``loss(original) - mean over seeds of loss(perturbed)`` (see the module doc).

    For each seed, every parameter of block ``block_index`` (LoRA adapters inside it
    included) gets ``sigma * randn`` from a CPU ``torch.Generator`` seeded with that seed,
    drawn parameter by parameter in ``named_parameters`` order. The same seeds give the
    same noise whichever block is perturbed. All weights are restored bitwise afterwards,
    also on error.
    """
    blocks = transformer_blocks(model)
    if not 0 <= block_index < len(blocks):
        raise AuditError(f"block index {block_index} is out of range; the model has {len(blocks)} blocks "
                         f"(0..{len(blocks) - 1})")
    if sigma < 0 or not seeds:
        raise AuditError(f"block perturbation needs sigma >= 0 and at least one seed, got sigma={sigma}, "
                         f"seeds={tuple(seeds)}")
    params = list(blocks[block_index][1].named_parameters())
    saved = [p.detach().clone() for _, p in params]
    original = _losses(model, tokenizer, texts, batch_size, max_length)
    perturbed = []
    try:
        for seed in seeds:
            gen = torch.Generator(device="cpu").manual_seed(int(seed))
            with torch.no_grad():
                for (_, p), orig in zip(params, saved):
                    noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * sigma
                    p.copy_(orig + noise.to(p.device, p.dtype))
            perturbed.append(_losses(model, tokenizer, texts, batch_size, max_length))
    finally:
        with torch.no_grad():
            for (_, p), orig in zip(params, saved):
                p.copy_(orig)
    # mean of differences (= the difference of means): exactly 0 when the noise is 0
    return np.mean([original - loss for loss in perturbed], axis=0)


def per_block_auc(model, tokenizer, members: list[str], nonmembers: list[str], sigma: float = 0.01,
                  seeds=(0, 1, 2), batch_size: int = 16, max_length: int = 128) -> list[dict]:
    """``[{"block": i, "name": ..., "auc": ...}]``, one per decoder block, where ``auc`` is
    ``roc_auc(-block_scores(members), -block_scores(nonmembers))``: the loss increase under
    perturbation is the membership score (higher = member)."""
    check_disjoint(members, nonmembers)
    out = []
    for i, (name, _) in enumerate(transformer_blocks(model)):
        m = -block_scores(model, tokenizer, members, i, sigma, seeds, batch_size, max_length)
        n = -block_scores(model, tokenizer, nonmembers, i, sigma, seeds, batch_size, max_length)
        out.append({"block": i, "name": name, "auc": roc_auc(m, n)})
    return out
