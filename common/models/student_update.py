"""The pdss student's federated update: its LoRA adapter, or every weight of the small model.

``student-update = lora``: base + peft LoRA (the warm cache of common/models/cache.py); what a
site trains and sends is the adapter, and the export merges it into the base.

``student-update = full``: the plain base model, fine-tuned whole; what a site trains and sends
is the model's trainable parameters by name (``named_parameters`` lists GPT-2's tied input /
output embedding once), FedAvg averages them, the export writes them into the base.

Opacus computes per-sample gradients of every GPT-2 module here (transformers' Conv1D through
its functorch fallback; the tied embedding gets both uses summed, checked against a naive loop
in tests/test_pdss_student.py) except one: the learned *position* table. GPT-2 looks it up with
position ids of batch size 1 and broadcasts, so opacus sees one "sample" and its per-sample
gradient has the wrong shape. The position table is frozen (``FROZEN_FULL``); it is part of
neither the update nor the noise.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from common.errors import ConfigError

# Parameters a full update leaves frozen (name suffixes): see the module docstring.
FROZEN_FULL = ("wpe.weight",)


def is_full(settings) -> bool:
    return settings.pdss.student_update == "full"


def trainable_state(model) -> dict[str, np.ndarray]:
    """The model's trainable parameters as float32 numpy arrays that own their memory."""
    return {name: np.array(p.detach().to(torch.float32).cpu().numpy(), copy=True)
            for name, p in model.named_parameters() if p.requires_grad}


def load_full_student(model_dir, cfg, weights: dict[str, np.ndarray] | None = None):
    """``(model, tokenizer)``: the base model on its device, every parameter trainable except
    ``FROZEN_FULL``, and ``weights`` (from ``trainable_state``) written into it."""
    from transformers import AutoTokenizer

    from common.models.build import build_model, pick_device

    device, _ = pick_device(cfg.device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = build_model(model_dir).to(device)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.endswith(FROZEN_FULL))
    if weights is not None:
        own = dict(model.named_parameters())
        names = {n for n, p in own.items() if p.requires_grad}
        if set(weights) != names:
            missing, unknown = sorted(names - set(weights)), sorted(set(weights) - names)
            raise ConfigError(f"student weights do not match the model: missing {missing[:3]}, unknown {unknown[:3]} "
                              "(is student-update the same at the server and the sites?)")
        with torch.no_grad():
            for name, value in weights.items():
                if tuple(value.shape) != tuple(own[name].shape):
                    raise ConfigError(f"student weight {name} has shape {value.shape}, the model expects "
                                      f"{tuple(own[name].shape)}")
                own[name].copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))
    return model, tokenizer


@contextmanager
def student_model(model_dir, settings, weights: dict[str, np.ndarray] | None = None):
    """``(model, tokenizer)`` of the student, trainable as ``student-update`` says, with ``weights``
    (the global update) loaded. lora borrows the warm cached model; full loads the small model
    afresh for the message (a tiny model loads in well under a second)."""
    if not is_full(settings):
        from common.models.cache import warm_lora_model

        with warm_lora_model(model_dir, settings.dp, weights) as pair:
            yield pair
        return
    torch.manual_seed(settings.dp.seed)
    model, tokenizer = load_full_student(model_dir, settings.dp, weights)
    yield model.train(), tokenizer  # opacus wraps only a module in training mode (as peft's LoRA model is)


def student_weights(model, settings) -> dict[str, np.ndarray]:
    """What a site sends: the LoRA adapter, or the full model's trainable parameters."""
    if is_full(settings):
        return trainable_state(model)
    from common.models.cache import adapter_copy

    return adapter_copy(model)


def initial_student(settings) -> dict[str, np.ndarray]:
    """The round-0 global update on the student base (settings.model_dir): peft's LoRA
    initialisation (B = 0, under the run's seed), or the base model's own weights."""
    if is_full(settings):
        return trainable_state(load_full_student(settings.model_dir, settings.dp)[0])
    from common.models.build import adapter_state
    from common.models.loading import load_lora_model

    return adapter_state(load_lora_model(settings.model_dir, settings.dp)[0])  # as server_app.initial_adapter


def merged_student(model_dir, settings, weights: dict[str, np.ndarray]):
    """``(plain transformers model, tokenizer)`` of the federated student, for save_pretrained."""
    if is_full(settings):
        model, tokenizer = load_full_student(model_dir, settings.dp, weights)
        return model.requires_grad_(False).eval(), tokenizer
    from common.models.loading import load_lora_model

    model, tokenizer = load_lora_model(model_dir, settings.dp, weights)
    return model.merge_and_unload().eval(), tokenizer

