"""Build causal LMs (hub id, local path, or a tiny config), pick the device, add LoRA.

Tiny configs exist for tests and the offline demo: a few million parameters, 2-4 layers,
dropout off (DP-SGD already injects noise; dropout would only make the per-sample gradient
reference tests non-deterministic).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedModel

from common.errors import ConfigError

# Named tiny architectures: family, layers, width, heads, MLP width.
TINY_SPECS = {
    "tiny-gpt2": dict(family="gpt2", n_layers=2, width=128, heads=4, mlp=512),
    "tiny-llama": dict(family="llama", n_layers=2, width=128, heads=4, mlp=344),
    "small-gpt2": dict(family="gpt2", n_layers=4, width=256, heads=4, mlp=1024),
    "small-llama": dict(family="llama", n_layers=4, width=256, heads=4, mlp=688),
    # ~50M parameters: for the benchmark's "larger config" (with a 32k vocabulary).
    "bench-gpt2-50m": dict(family="gpt2", n_layers=8, width=512, heads=8, mlp=2048),
}

# LoRA target modules per family (peft's LoRA layers are nn.Linear, so opacus's hooks
# apply even where the base layer is GPT-2's Conv1D).
LORA_TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}


def tiny_config(name: str, vocab_size: int, max_positions: int = 256, pad_token_id: int | None = None,
                eos_token_id: int | None = None):
    """A transformers config for one of ``TINY_SPECS``."""
    if name not in TINY_SPECS:
        raise ConfigError(f"unknown tiny model {name!r}; choose one of {', '.join(TINY_SPECS)}")
    s = TINY_SPECS[name]
    if s["family"] == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_positions=max_positions, n_embd=s["width"], n_layer=s["n_layers"],
            n_head=s["heads"], n_inner=s["mlp"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        )
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=s["width"], intermediate_size=s["mlp"],
        num_hidden_layers=s["n_layers"], num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
        max_position_embeddings=max_positions, attention_dropout=0.0, tie_word_embeddings=False,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )


def build_model(spec: str | Path, tokenizer=None, max_positions: int = 256, seed: int = 0) -> PreTrainedModel:
    """A causal LM from a tiny spec name, a local directory, or a hub id (users who are online)."""
    spec = str(spec)
    if spec in TINY_SPECS:
        if tokenizer is None:
            raise ConfigError(f"building {spec!r} from a config needs a tokenizer (for its vocabulary)")
        config = tiny_config(spec, len(tokenizer), max_positions, tokenizer.pad_token_id, tokenizer.eos_token_id)
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)
    path = Path(spec)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path} has no config.json; pass a directory written by save_pretrained")
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ConfigError(f"model path {spec} does not exist; build one with `privdistill teacher warmup`")
    try:  # a hub id: works for users who are online or have it cached
        return AutoModelForCausalLM.from_pretrained(spec)
    except OSError as err:
        raise ConfigError(f"cannot load model {spec!r} from the hub or cache ({err.__class__.__name__}); "
                          "pass a local directory or one of " + ", ".join(TINY_SPECS)) from err


def model_family(model) -> str:
    model_type = getattr(model.config, "model_type", "")
    if model_type in LORA_TARGETS:
        return model_type
    raise ConfigError(f"no default LoRA targets for model type {model_type!r}; pass --lora-targets")


def pick_device(prefer: str | None = None) -> tuple[torch.device, torch.dtype]:
    """``cuda`` with bf16 when present and supported, else CPU fp32 (or what the user asks for)."""
    if prefer:
        device = torch.device(prefer)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return device, torch.bfloat16
    return device, torch.float32


def add_lora(model, r: int = 8, alpha: int = 16, dropout: float = 0.0, target_modules: list[str] | None = None):
    """Wrap ``model`` (already on its device) with peft LoRA; only the adapters stay trainable.

    Order matters (opacus issue 820): the trainer moves the base model to its device first,
    then calls this, then hands the result to opacus. The per-sample gradient tests use
    exactly this function.
    """
    targets = target_modules or LORA_TARGETS[model_family(model)]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        bias="none", task_type="CAUSAL_LM",
                        fan_in_fan_out=model_family(model) == "gpt2")
    return get_peft_model(model, config)


def adapter_state(peft_model) -> dict[str, np.ndarray]:
    """The LoRA adapter tensors only, as float32 numpy arrays (what goes on the wire)."""
    state = get_peft_model_state_dict(peft_model)
    return {name: t.detach().to(torch.float32).cpu().numpy() for name, t in state.items()}


def load_adapter_state(peft_model, state: dict[str, np.ndarray]) -> None:
    """Load adapter tensors produced by ``adapter_state`` (names and shapes must match)."""
    current = get_peft_model_state_dict(peft_model)
    if set(current) != set(state):
        missing, unknown = sorted(set(current) - set(state)), sorted(set(state) - set(current))
        raise ConfigError(f"adapter does not match the model: missing {missing[:3]}, unknown {unknown[:3]}")
    tensors = {}
    for name, ref in current.items():
        arr = np.asarray(state[name])
        if tuple(arr.shape) != tuple(ref.shape):
            raise ConfigError(f"adapter tensor {name} has shape {arr.shape}, the model expects {tuple(ref.shape)}")
        tensors[name] = torch.from_numpy(arr.astype(np.float32)).to(ref.device, ref.dtype)
    set_peft_model_state_dict(peft_model, tensors)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
