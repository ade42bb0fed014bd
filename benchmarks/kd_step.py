"""Benchmark: one KD training step against one plain CE step of the same student, same batch.

Prints figures; asserts nothing about speed. Modes, all on the same ``--batch`` × ``--seq``
batch of random token ids (every token real), timed side by side in one process:

  ce          the student's plain next-token CE step (``common.models.lm.token_losses``):
              forward, backward, Adam step, zero_grad.
  kd          DistilDP's step as the distillation phase runs it: the teacher's forward under
              ``torch.inference_mode`` (with hidden states) → ``soft_targets`` (full vocabulary);
              the student's forward with hidden states → ``HiddenProjector`` (learned W,
              student width → teacher width, uniform layer map) → ``kd_loss`` with λ = 0.4,
              T = 1, β = 1; backward; Adam over the student and W.
  kd-top64    the same with top-k = 64 soft labels (``--top-k``).
  kd-nohidden the full-vocabulary KD step without hidden alignment (β = 0, no hidden states
              requested from either model): what the alignment itself costs.
  teacher-fwd the teacher's inference-mode forward alone (part of every KD step): attribution.

Warm-up first (``--warmup`` steps per mode), then ``--repeats`` repeats of one step of every
mode, the order rotating every repeat: the modes interleave step by step, so drift and other
processes' load hit them alike (the 1-minute load average is printed before and after). The
per-step median of each mode is reported, with the ratio to the CE step's median.

Usage (from the repository root):

    .venv/bin/python benchmarks/kd_step.py                   # small-gpt2 → tiny-gpt2, 16 × 128
    .venv/bin/python benchmarks/kd_step.py --batch 8 --seq 64 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODES = ["ce", "kd", "kd-top64", "kd-nohidden", "teacher-fwd"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="small-gpt2", help="tiny spec of the teacher (common/models/build.py)")
    p.add_argument("--student", default="tiny-gpt2", help="tiny spec of the student")
    p.add_argument("--vocab", type=int, default=2048, help="vocabulary size (the demo's BPE size)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--top-k", type=int, default=64, help="k of the top-k soft-label mode")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode")
    p.add_argument("--repeats", type=int, default=20, help="timed steps per mode (interleaved)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM

    from common.distill import HiddenProjector, kd_loss, soft_targets, uniform_layer_map
    from common.models.build import TINY_SPECS, count_parameters, tiny_config
    from common.models.lm import token_losses

    if args.threads:
        torch.set_num_threads(args.threads)

    def build(spec: str, seed: int):
        torch.manual_seed(seed)
        config = tiny_config(spec, args.vocab, max_positions=max(256, args.seq), pad_token_id=1, eos_token_id=0)
        return AutoModelForCausalLM.from_config(config)

    teacher = build(args.teacher, 0).eval()
    student = build(args.student, 1).train()
    for p in teacher.parameters():
        p.requires_grad_(False)
    s_spec, t_spec = TINY_SPECS[args.student], TINY_SPECS[args.teacher]
    layer_map = uniform_layer_map(s_spec["n_layers"], t_spec["n_layers"])
    projector = HiddenProjector(s_spec["width"], t_spec["width"], layer_map)

    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, args.vocab, (args.batch, args.seq), generator=gen)
    mask = torch.ones_like(input_ids)
    # Separate optimizers: each mode's Adam state is its own, as in its own training run.
    ce_opt = torch.optim.Adam(student.parameters(), lr=1e-4)
    kd_opt = torch.optim.Adam(list(student.parameters()) + list(projector.parameters()), lr=1e-4)
    sizes = {}

    def ce_step():
        losses, valid = token_losses(student, input_ids, mask)
        loss = losses.sum() / valid.sum()
        loss.backward()
        ce_opt.step()
        ce_opt.zero_grad(set_to_none=True)

    def kd_step(top_k, hidden: bool, name: str):
        with torch.inference_mode():
            t_out = teacher(input_ids=input_ids, attention_mask=mask, output_hidden_states=hidden)
            targets = soft_targets(t_out.logits, 1.0, top_k)
        sizes[name] = targets.logprobs.nbytes + (targets.indices.nbytes if targets.indices is not None else 0)
        s_out = student(input_ids=input_ids, attention_mask=mask, output_hidden_states=hidden)
        h = projector(s_out.hidden_states, t_out.hidden_states, mask) if hidden else None
        loss = kd_loss(s_out.logits, input_ids, mask, targets, lam=0.4, temperature=1.0,
                       hidden_loss=h, beta=1.0 if hidden else 0.0)
        loss.total.backward()
        kd_opt.step()
        kd_opt.zero_grad(set_to_none=True)

    def teacher_forward():
        with torch.inference_mode():
            teacher(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)

    steps = {
        "ce": ce_step,
        "kd": lambda: kd_step(None, True, "kd"),
        "kd-top64": lambda: kd_step(args.top_k, True, "kd-top64"),
        "kd-nohidden": lambda: kd_step(None, False, "kd-nohidden"),
        "teacher-fwd": teacher_forward,
    }
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    for mode in MODES:
        for _ in range(args.warmup):
            steps[mode]()
    times = {mode: [] for mode in MODES}
    cpu = {mode: [] for mode in MODES}  # process CPU time: less sensitive to other processes' load
    for r in range(args.repeats):
        for mode in MODES[r % len(MODES):] + MODES[: r % len(MODES)]:
            start, cpu_start = time.perf_counter(), time.process_time()
            steps[mode]()
            times[mode].append(time.perf_counter() - start)
            cpu[mode].append(time.process_time() - cpu_start)
    wall = time.perf_counter() - t0

    median = {mode: statistics.median(v) * 1e3 for mode, v in times.items()}
    cpu_median = {mode: statistics.median(v) * 1e3 for mode, v in cpu.items()}
    quartiles = {mode: statistics.quantiles(v, n=4) if len(v) >= 2 else [v[0]] * 3 for mode, v in times.items()}
    label = {"kd-top64": f"kd-top{args.top_k}"}
    print(f"teacher {args.teacher} ({t_spec['n_layers']}×{t_spec['width']}, "
          f"{count_parameters(teacher)[1] / 1e6:.2f}M params) → student {args.student} "
          f"({s_spec['n_layers']}×{s_spec['width']}, {count_parameters(student)[1] / 1e6:.2f}M); "
          f"vocab {args.vocab}; batch {args.batch} × {args.seq} tokens; layer map {layer_map}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}; {args.repeats} interleaved steps per mode "
          f"after {args.warmup} warm-up; {wall:.1f} s; "
          f"1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print()
    print("| mode | ms per step (median) | IQR (ms) | × CE step | CPU ms per step | × CE (CPU) "
          "| soft targets per step |")
    print("|---|---|---|---|---|---|---|")
    for mode in MODES:
        q = quartiles[mode]
        size = f"{sizes[mode] / 2**20:.2f} MiB" if mode in sizes else "—"
        print(f"| {label.get(mode, mode)} | {median[mode]:.1f} | {q[0] * 1e3:.1f}–{q[2] * 1e3:.1f} | "
              f"{median[mode] / median['ce']:.2f} | {cpu_median[mode]:.0f} | {cpu_median[mode] / cpu_median['ce']:.2f} "
              f"| {size} |")
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "median_ms": median, "ratio_to_ce": {m: median[m] / median["ce"] for m in MODES},
              "cpu_median_ms": cpu_median, "cpu_ratio_to_ce": {m: cpu_median[m] / cpu_median["ce"] for m in MODES},
              "soft_target_bytes": sizes, "wall_s": wall, "loadavg_before_after": [load_before, os.getloadavg()[0]], "threads": torch.get_num_threads()}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
