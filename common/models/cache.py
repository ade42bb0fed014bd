"""Warm frozen weights: one per-process copy of base model + LoRA layers, reused across messages.

Flower's Simulation Engine keeps its Ray actors for the whole run, and one actor serves many
sites, message after message. Loading the base model from disk for every message costs more
than a short DP-SGD round; here the model is built once per process (exactly as a cold load
builds it: base → device → peft LoRA, ``load_lora_model``) and each message borrows it:

  borrow: the round's adapter is loaded into the LoRA layers (or the initial adapter kept);
  use:    train (opacus wraps it) or evaluate, as with a cold model;
  return: every trace of the message is removed and checked: LoRA values back to the initial
          adapter (no site's adapter survives its message), ``.grad`` and every attribute
          opacus put on parameters or modules gone, hook counts, ``requires_grad`` flags and
          train/eval modes as built, frozen weights unmodified (their in-place version
          counters unchanged). Anything that does not match evicts the entry: the next
          message builds a cold model again. A warm round is then bit-for-bit a cold round.

What is cached: frozen weights, the LoRA structure, the tokenizer. What is never cached: a
site's data, optimizer, ledger, adapter or privacy plan (those live and die in the message).

The key is (resolved model directory, size and mtime of its config, weight and tokenizer
files) + the LoRA shape, the initialisation seed and the device, so a re-trained teacher
in the same directory is loaded afresh. ``PRIVDISTILL_WARM_MODELS=0`` turns the cache off
(every borrow then builds a cold model). A borrower that finds the entry in use (another
thread) gets a cold model of its own.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from logging import WARNING, getLogger
from pathlib import Path

import numpy as np
import torch

from common.models.build import adapter_state, load_adapter_state, pick_device

MAX_ENTRIES = 2  # distinct (model, LoRA shape) pairs kept per process; the oldest goes first
_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt")
_logger = getLogger(__name__)


def enabled() -> bool:
    return os.environ.get("PRIVDISTILL_WARM_MODELS", "1").strip().lower() not in ("0", "false", "no", "off")


def model_key(model_dir) -> tuple:
    """The resolved directory and (name, size, mtime) of its config, weight and tokenizer files."""
    path = Path(model_dir)
    if not path.exists():  # a hub id
        return (str(model_dir),)
    path = path.resolve()
    files = []
    for entry in sorted(path.iterdir()):
        if entry.is_file() and entry.suffix in _FILE_SUFFIXES:
            st = entry.stat()
            files.append((entry.name, st.st_size, st.st_mtime_ns))
    return (str(path), tuple(files))


def lora_key(cfg) -> tuple:
    device, _ = pick_device(cfg.device)
    targets = tuple(cfg.lora_targets) if cfg.lora_targets else None
    return (int(cfg.lora_r), float(cfg.lora_alpha), float(cfg.lora_dropout), targets, int(cfg.seed), str(device))


@dataclass
class _Entry:
    model: torch.nn.Module
    tokenizer: object
    initial: dict[str, torch.Tensor]   # LoRA parameter values right after the cold build
    rng_after: torch.Tensor            # CPU RNG state right after the cold build
    snapshot: dict = field(default_factory=dict)
    in_use: bool = False


_entries: "OrderedDict[tuple, _Entry]" = OrderedDict()
_lock = threading.Lock()
stats = {"built": 0, "reused": 0, "evicted": 0}  # for tests and benchmarks


def clear() -> None:
    with _lock:
        _entries.clear()
        _teachers.clear()


def cached_entries() -> int:
    return len(_entries)


@contextmanager
def warm_lora_model(model_dir, cfg, adapter: dict[str, np.ndarray] | None = None):
    """``(model, tokenizer)`` as ``load_lora_model(model_dir, cfg, adapter)`` returns them,
    borrowed from this process's cache for the duration of the ``with`` block.

    Nothing returned from inside the block may alias the model's tensors: use
    :func:`adapter_copy` for the trained adapter (``adapter_state`` shares their memory).
    """
    key = (model_key(model_dir), lora_key(cfg))
    entry, cached = _checkout(key, model_dir, cfg)
    try:
        torch.manual_seed(cfg.seed)  # the global RNG as a cold load leaves it
        torch.set_rng_state(entry.rng_after)
        if adapter is not None:
            load_adapter_state(entry.model, adapter)
        yield entry.model, entry.tokenizer
    finally:
        if cached:
            _checkin(key, entry)


def adapter_copy(model) -> dict[str, np.ndarray]:
    """The LoRA adapter as float32 numpy arrays that own their memory."""
    return {name: np.array(value, dtype=np.float32, copy=True) for name, value in adapter_state(model).items()}


# ---------------------------------------------------------------------------- internals
def _build(model_dir, cfg) -> _Entry:
    from common.models.loading import load_lora_model

    model, tokenizer = load_lora_model(model_dir, cfg)
    rng_after = torch.get_rng_state()
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    entry = _Entry(model, tokenizer, initial, rng_after)
    entry.snapshot = _fingerprint(model)
    return entry


def _checkout(key, model_dir, cfg) -> tuple[_Entry, bool]:
    """(entry, whether it belongs to the cache)."""
    if not enabled():
        return _build(model_dir, cfg), False
    with _lock:
        entry = _entries.get(key)
        if entry is not None and not entry.in_use:
            entry.in_use = True
            _entries.move_to_end(key)
            stats["reused"] += 1
            return entry, True
        busy = entry is not None
    entry = _build(model_dir, cfg)
    stats["built"] += 1
    if busy:  # another thread holds the cached one: this borrower gets its own, uncached
        return entry, False
    with _lock:
        entry.in_use = True
        _entries[key] = entry
        while len(_entries) > MAX_ENTRIES:
            oldest = next((k for k, e in _entries.items() if not e.in_use), None)
            if oldest is None:
                break
            del _entries[oldest]
    return entry, True


def _checkin(key, entry: _Entry) -> None:
    try:
        problem = _reset(entry)
    except Exception as exc:  # noqa: BLE001 - whatever went wrong, the entry must not be reused
        problem = f"reset failed: {exc!r}"
    with _lock:
        entry.in_use = False
        if problem:
            stats["evicted"] += 1
            if _entries.get(key) is entry:
                del _entries[key]
    if problem:
        _logger.log(WARNING, "warm model evicted after a message (%s); the next message loads it cold", problem)


def _reset(entry: _Entry) -> str | None:
    """Put the model back as built; the reason it cannot be reused, or None."""
    model, snap = entry.model, entry.snapshot
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.grad = None
            for attr in set(vars(p)) - snap["param_attrs"][name]:
                delattr(p, attr)  # opacus: grad_sample, summed_grad, _forward_counter, ...
            if name in entry.initial:
                p.copy_(entry.initial[name])
            p.requires_grad_(snap["requires_grad"][name])
    for name, module in model.named_modules():
        extra = set(vars(module)) - snap["module_attrs"].get(name, set())
        for attr in extra:
            delattr(module, attr)  # opacus: autograd_grad_sample_hooks, activations, ...
        module.train(snap["training"].get(name, False))
    return _difference(snap, _fingerprint(model))


def _fingerprint(model) -> dict:
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    return {
        "modules": tuple(modules),
        "module_attrs": {n: set(vars(m)) for n, m in modules.items()},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                      len(m._backward_pre_hooks), len(getattr(m, "_state_dict_hooks", {})))
                  for n, m in modules.items()},
        "training": {n: m.training for n, m in modules.items()},
        "params": tuple(params),
        "param_attrs": {n: set(vars(p)) for n, p in params.items()},
        "requires_grad": {n: p.requires_grad for n, p in params.items()},
        "grads": {n: p.grad is None for n, p in params.items()},
        # in-place writes bump a tensor's version: the frozen weights must never be written
        "frozen_versions": {n: p._version for n, p in params.items() if not p.requires_grad},
        "buffers": {n: b._version for n, b in model.named_buffers()},
    }


def _difference(before: dict, after: dict) -> str | None:
    for key in before:
        if before[key] != after[key]:
            if isinstance(before[key], dict):
                names = [n for n in set(before[key]) | set(after[key]) if before[key].get(n) != after[key].get(n)]
                return f"{key} differ at {sorted(names)[:3]}"
            return f"{key} differ"
    return None


# ---------------------------------------------------------------------------- frozen teachers
# dp-opd's teacher is the largest model in the loop and is only ever read (inference mode, no
# LoRA, no opacus): one copy per process, keyed like the LoRA entries plus the DP adapter
# merged into it. Its weights' in-place version counters are checked on every fetch, so a
# teacher something wrote to is never served again.
_teachers: "OrderedDict[tuple, tuple]" = OrderedDict()
MAX_TEACHERS = 1


def _file_key(path) -> tuple | None:
    if path is None:
        return None
    st = Path(path).stat()
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def _versions(model) -> tuple:
    return tuple(p._version for p in model.parameters())


def frozen_teacher(model_dir, cfg, adapter_path=None):
    """``(teacher, tokenizer)`` as ``load_teacher(model_dir, cfg, adapter_path)`` returns them,
    every parameter frozen; loaded once per process while the files are unchanged."""
    from common.models.loading import load_teacher

    key = (model_key(model_dir), _file_key(adapter_path), str(pick_device(cfg.device)[0]))
    with _lock:
        hit = _teachers.get(key) if enabled() else None
        if hit is not None and _versions(hit[0]) == hit[2]:
            stats["reused"] += 1
            return hit[0], hit[1]
    rng = torch.get_rng_state()  # a cold load seeds the LoRA init; the caller's RNG is left as it was
    teacher, tokenizer = load_teacher(model_dir, cfg, adapter_path)
    torch.set_rng_state(rng)
    teacher.requires_grad_(False)
    stats["built"] += 1
    if enabled():
        with _lock:
            _teachers[key] = (teacher, tokenizer, _versions(teacher))
            while len(_teachers) > MAX_TEACHERS:
                _teachers.popitem(last=False)
    return teacher, tokenizer
