"""Phase `distillation`: the DP teacher's knowledge into a compact student (DistilDP step 3).

Server only, on the DP synthetic corpus, so it is post-processing and costs no privacy. Each
step: the teacher's token distributions (and hidden states, when β > 0) under
``torch.inference_mode`` (bf16 autocast on GPU), then one full fine-tuning step of the
student on ``L = (1−λ)·CE + λ·T²·KL + β·MSE(W·h_s, h_t)`` (common/distill/losses.py).
Batches are a pure function of (seed, step), and every ``distill-checkpoint-every`` steps
student, projection, optimizer and schedule are checkpointed, so a killed run resumes at
its last checkpoint and ends exactly where an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from logging import INFO
from pathlib import Path

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch
from flwr.common.logger import log
from tqdm.auto import tqdm

from common.atomic import atomic_write_json
from common.data.control import with_control_code
from common.data.synthetic import load_synthetic_records
from common.distill.losses import HiddenProjector, kd_loss, soft_targets, uniform_layer_map
from common.models.build import count_parameters, pick_device
from common.models.lm import encode_texts
from common.models.loading import build_student, load_teacher, student_arrays
from server.synthesis import SYNTHETIC_DIR

DISTILL_DIR = "distill"
FINAL_DIR = "final"  # the trained student (save_pretrained), read by evaluation and export


def training_texts(rows: list[dict], control_codes: bool) -> list[str]:
    """The synthetic records as the student sees them: with their control code, like the teacher."""
    return [with_control_code(r.get("label"), r["text"]) if control_codes else r["text"] for r in rows]


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> np.ndarray:
    """The records of step ``step``: consecutive slices of one seeded permutation per epoch."""
    per_epoch = max(1, n // batch_size)
    epoch, offset = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[offset * batch_size: (offset + 1) * batch_size]


def lr_factor(step: int, total: int) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 10%."""
    warmup = max(1, total // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def hidden_width(model) -> int:
    return int(getattr(model.config, "n_embd", None) or model.config.hidden_size)


def layer_count(model) -> int:
    return int(getattr(model.config, "n_layer", None) or model.config.num_hidden_layers)


class Trainer:
    """Student, projection and optimizer of one distillation, with their checkpoints."""

    def __init__(self, settings, teacher, tokenizer, directory: Path):
        d = settings.distill
        self.settings, self.teacher, self.directory = settings, teacher, directory
        self.device, self.dtype = pick_device(settings.dp.device)
        self.student = build_student(d.student, teacher, tokenizer, seed=settings.seed).to(self.device)
        self.projector = None
        if d.kd_beta > 0:
            pairs = uniform_layer_map(layer_count(self.student), layer_count(teacher))
            self.projector = HiddenProjector(hidden_width(self.student), hidden_width(teacher), pairs).to(self.device)
        params = list(self.student.parameters()) + (list(self.projector.parameters()) if self.projector else [])
        self.optimizer = torch.optim.AdamW(params, lr=d.distill_learning_rate, weight_decay=0.01)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                          lambda s: lr_factor(s, d.distill_steps))
        self.step, self.history = 0, []

    # ---------------------------------------------------------------------------- one step
    def train_step(self, input_ids: torch.Tensor, mask: torch.Tensor) -> dict:
        d = self.settings.distill
        hidden = self.projector is not None
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            out = self.teacher(input_ids=input_ids, attention_mask=mask, output_hidden_states=hidden)
            targets = soft_targets(out.logits, d.kd_temperature, d.kd_top_k or None)
        # Inference tensors cannot be saved for backward: plain copies, still without grad.
        targets = type(targets)(targets.logprobs.clone(), None if targets.indices is None else targets.indices.clone())
        teacher_hidden = tuple(h.float().clone() for h in out.hidden_states) if hidden else None
        self.student.train()
        s_out = self.student(input_ids=input_ids, attention_mask=mask, output_hidden_states=hidden)
        hidden_loss = self.projector(s_out.hidden_states, teacher_hidden, mask) if hidden else None
        loss = kd_loss(s_out.logits, input_ids, mask, targets, lam=d.kd_lambda, temperature=d.kd_temperature,
                       hidden_loss=hidden_loss, beta=d.kd_beta, kl_start=d.kd_kl_start)
        loss.total.backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], 1.0)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"step": self.step, "loss": loss.total.item(), "ce": loss.ce.item(), "kl": loss.kl.item(),
                "hidden": loss.hidden.item()}

    # ---------------------------------------------------------------------------- checkpoints
    def save(self) -> None:
        """Write checkpoint ``step_K/``, then point ``checkpoint.json`` at it (atomically)."""
        folder = self.directory / f"step_{self.step}"
        folder.mkdir(parents=True, exist_ok=True)
        safetensors.numpy.save_file(student_arrays(self.student), str(folder / "student.safetensors"))
        if self.projector is not None:
            safetensors.torch.save_file(self.projector.state_dict(), str(folder / "projector.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict()},
                   folder / "optimizer.pt")
        atomic_write_json(self.directory / "checkpoint.json", {"step": self.step, "folder": folder.name,
                                                                 "history": self.history})
        for old in self.directory.glob("step_*"):
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)

    def load(self) -> bool:
        pointer = self.directory / "checkpoint.json"
        if not pointer.is_file():
            return False
        meta = json.loads(pointer.read_text())
        folder = self.directory / meta["folder"]
        weights = {k: torch.from_numpy(v) for k, v in
                   safetensors.numpy.load_file(str(folder / "student.safetensors")).items()}
        self.student.load_state_dict(weights, strict=False)
        self.student.tie_weights()
        if self.projector is not None:
            self.projector.load_state_dict(safetensors.torch.load_file(str(folder / "projector.safetensors")))
        saved = torch.load(folder / "optimizer.pt", weights_only=True, map_location=self.device)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.schedule.load_state_dict(saved["schedule"])
        self.step, self.history = int(meta["step"]), list(meta["history"])
        return True


def run(phase) -> dict:
    settings, d = phase.settings, phase.settings.distill
    state = phase.state()
    teacher, tokenizer = load_teacher(settings.model_dir, settings.dp, phase.run.path / state["adapter"])
    rows = load_synthetic_records(phase.run.path / SYNTHETIC_DIR)
    control_codes = settings.synthesis.prompt_source == "control-codes"
    data = encode_texts(training_texts(rows, control_codes), tokenizer, d.distill_max_length)
    trainer = Trainer(settings, teacher, tokenizer, phase.run.path / DISTILL_DIR)
    if trainer.load():
        log(INFO, "distillation: resuming at step %d of %d", trainer.step, d.distill_steps)
    input_ids, mask = data.tensors
    with tqdm(total=d.distill_steps, initial=trainer.step, desc="distilling the student") as bar:
        while trainer.step < d.distill_steps:
            index = torch.from_numpy(batch_indices(settings.seed, trainer.step, len(data), d.distill_batch_size))
            batch_ids, batch_mask = input_ids[index], mask[index]
            width = int(batch_mask.sum(1).max())  # drop the batch's all-pad columns
            metrics = trainer.train_step(batch_ids[:, :width].to(trainer.device),
                                         batch_mask[:, :width].to(trainer.device))
            trainer.history.append(metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            if trainer.step % d.distill_checkpoint_every == 0 or trainer.step == d.distill_steps:
                trainer.save()
                log(INFO, "distillation: step %d/%d, loss %.3f (CE %.3f, KL %.3f, hidden %.3f), checkpointed",
                    trainer.step, d.distill_steps, metrics["loss"], metrics["ce"], metrics["kl"], metrics["hidden"])
                if settings.fail_phase == "distillation" and trainer.step == settings.fail_phase_after:
                    raise RuntimeError(f"fault injected: distillation stops after step {trainer.step}")
    final = phase.run.path / DISTILL_DIR / FINAL_DIR
    trainer.student.save_pretrained(final)
    tokenizer.save_pretrained(final)
    last = trainer.history[-10:]
    return {"directory": DISTILL_DIR, "student": f"{DISTILL_DIR}/{FINAL_DIR}", "steps": trainer.step, "synthetic_records": len(rows),
            "student_parameters": count_parameters(trainer.student)[1],
            "teacher_parameters": count_parameters(teacher)[1],
            "final_loss": float(np.mean([h["loss"] for h in last])),
            "final_ce": float(np.mean([h["ce"] for h in last])),
            "final_kl": float(np.mean([h["kl"] for h in last]))}
