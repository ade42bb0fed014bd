"""Loading a run's models: base + LoRA (+ a round's adapter), the merged DP teacher, a student.

Client modes, server phases and the audit all load models through here, so the wrapping
order that opacus + peft need (issue 820: base → device → LoRA) is written once.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import safetensors.numpy
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from common.errors import ConfigError
from common.models.build import TINY_SPECS, add_lora, build_model, load_adapter_state, pick_device


def load_lora_model(model_dir: str | Path, cfg, adapter: dict[str, np.ndarray] | None = None):
    """Base model → device → peft LoRA (this order; see ``add_lora``) → optional adapter.

    ``cfg`` carries the LoRA shape (``lora_r``, ``lora_alpha``, ``lora_dropout``,
    ``lora_targets``), the device and the seed of the LoRA initialisation (a DPLoRAConfig).
    """
    device, _ = pick_device(cfg.device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(cfg.seed)
    base = build_model(model_dir).to(device)  # LoRA training keeps fp32 master weights
    model = add_lora(base, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    if adapter is not None:
        load_adapter_state(model, adapter)
    return model, tokenizer


def load_teacher(model_dir: str | Path, cfg, adapter_path: str | Path | None):
    """The DP teacher as one plain model: base + the run's global adapter, merged (LoRA's
    extra matmuls gone, so generation and KD forwards cost what the base model costs)."""
    if adapter_path is None:
        device, _ = pick_device(cfg.device)
        return build_model(model_dir).to(device).eval(), AutoTokenizer.from_pretrained(model_dir)
    adapter = safetensors.numpy.load_file(str(adapter_path))
    model, tokenizer = load_lora_model(model_dir, cfg, adapter)
    return model.merge_and_unload().eval(), tokenizer


# ---------------------------------------------------------------------------- students
def _blocks(model):
    """The list of transformer blocks of a GPT-2 or Llama-style causal LM."""
    inner = getattr(model, "transformer", None) or getattr(model, "model", None)
    for name in ("h", "layers"):
        if inner is not None and hasattr(inner, name):
            return getattr(inner, name)
    raise ConfigError(f"cannot find the transformer blocks of a {type(model).__name__}; initialise the student "
                      "from a spec or a model directory instead of from-teacher")


def _layer_count_key(config) -> str:
    for key in ("n_layer", "num_hidden_layers"):
        if hasattr(config, key):
            return key
    raise ConfigError(f"model type {config.model_type!r} has no layer count in its config")


def student_from_teacher(teacher, keep_every: int = 2):
    """DistilGPT2-style: a copy of the teacher with every ``keep_every``-th block (0, 2, 4, ...)."""
    config = copy.deepcopy(teacher.config)
    blocks = _blocks(teacher)
    kept = list(range(0, len(blocks), keep_every))
    setattr(config, _layer_count_key(config), len(kept))
    if hasattr(config, "layer_types") and config.layer_types is not None:  # Llama-style per-layer attention types
        config.layer_types = [config.layer_types[i] for i in kept]
    student = AutoModelForCausalLM.from_config(config)
    state = teacher.state_dict()
    own = student.state_dict()
    for name in own:
        source = name
        for new_index, old_index in enumerate(kept):  # block i of the student ← block kept[i] of the teacher
            for prefix in ("transformer.h.", "model.layers."):
                if name.startswith(f"{prefix}{new_index}."):
                    source = f"{prefix}{old_index}." + name[len(f"{prefix}{new_index}."):]
        own[name] = state[source].detach().clone()
    student.load_state_dict(own)
    return student


def build_student(spec: str, teacher, tokenizer, seed: int = 0, keep_every: int = 2):
    """The student: ``from-teacher`` (every other block), a tiny spec name, or an HF id / local path.

    Teacher and student must share the tokenizer: a vocabulary mismatch is refused here,
    naming both sides.
    """
    torch.manual_seed(seed)
    if spec == "from-teacher":
        student = student_from_teacher(teacher, keep_every)
    elif spec in TINY_SPECS:
        student = build_model(spec, tokenizer, max_positions=teacher.config.max_position_embeddings
                              if hasattr(teacher.config, "max_position_embeddings") else 256, seed=seed)
    else:
        student = build_model(spec)
        path = Path(spec)
        if path.exists():
            check_same_tokenizer(tokenizer, AutoTokenizer.from_pretrained(path), "teacher", str(path))
    if student.get_output_embeddings().weight.shape[0] != teacher.get_output_embeddings().weight.shape[0]:
        raise ConfigError(f"student {spec!r} has a vocabulary of {student.get_output_embeddings().weight.shape[0]} "
                          f"tokens, the teacher {teacher.get_output_embeddings().weight.shape[0]}; teacher and "
                          "student must share the tokenizer")
    return student


def check_same_tokenizer(teacher_tokenizer, student_tokenizer, teacher_name: str, student_name: str) -> None:
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise ConfigError(f"tokenizer mismatch: the teacher ({teacher_name}, {len(teacher_tokenizer)} tokens) and the "
                          f"student ({student_name}, {len(student_tokenizer)} tokens) do not share a vocabulary; "
                          "distillation compares their token distributions, so they must use the same tokenizer")


def student_from_arrays(config_json: str, arrays: dict[str, np.ndarray], device=None):
    """Rebuild a student a site received: its config (JSON) and its weights (what travels)."""
    config = AutoConfig.for_model(**json.loads(config_json))
    model = AutoModelForCausalLM.from_config(config)
    state = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if m not in _tied_names(model)]
    if missing or unexpected:
        raise ConfigError(f"student weights do not match its config: missing {missing[:3]}, unknown {unexpected[:3]}")
    return model.to(device or pick_device()[0]).eval()


def student_arrays(model) -> dict[str, np.ndarray]:
    """The student's weights as float32 numpy arrays, tied copies left out (they travel once)."""
    tied = _tied_names(model)
    return {k: v.detach().to(torch.float32).cpu().numpy() for k, v in model.state_dict().items() if k not in tied}


def _tied_names(model) -> set[str]:
    if getattr(model.config, "tie_word_embeddings", False):
        return {"lm_head.weight"}
    return set()
