"""Benchmark: DP-SGD LoRA step (opacus) vs the non-private LoRA step, same model and batch.

Prints figures; asserts nothing about speed. For every model it reports tokens per second of

  (a) the non-private LoRA step: the peft LoRA model, plain ``torch.optim.Adam`` over the LoRA
      parameters, no opacus hooks at all;
  (b) the DP-SGD LoRA step: the same model object wrapped by ``common.privacy.dp_sgd.make_private``
      (opacus ``GradSampleModule`` hooks → per-sample gradients, per-sample clipping, Gaussian
      noise, ``DPOptimizer`` around Adam), exactly as ``client/dp_lora.py`` wires it.

Both modes use the same batch (``--batch`` records × ``--seq`` tokens, every token counted) and
are timed side by side in one process: warm-up first, then ``--rounds`` alternating blocks of
``--steps`` steps (the order flips every round to cancel drift), medians reported. The DP step is
fed one fixed physical batch equal to the logical batch (forward, backward, ``optimizer.step``,
``zero_grad``) instead of the Poisson loader, so batch-size variance does not enter the timing;
its cost per step is the same as a Poisson batch of the expected size.

To time (a) without opacus in the loop, the opacus hooks are *removed* (``remove_hooks``) before
every non-private block and re-added (``add_hooks``) before every DP block; the non-private step
therefore runs on a hook-free model with the very same tensors. A check after every
non-private block confirms no per-sample gradient was produced.

Attribution: during the timed DP steps opacus's own pieces are timed from the inside (activation
hooks, per-sample-gradient hooks, clip_and_accumulate, add_noise, scale_grad, the wrapped Adam
step), so the output says how much of the DP step is work the non-private step does not do.

Memory: each model runs in its own fresh subprocess. Peak RSS (``ru_maxrss``, a high-water mark)
is read after building the model, after the non-private warm-up (this is the non-private peak:
model + one non-private step) and after the DP warm-up (the DP peak). Because the non-private
step runs first, the DP peak minus the non-private peak is the extra memory the DP step needs.
The peak after the alternating phase is printed as "end" (not attributable to either mode).

Usage (from the repository root):

    .venv/bin/python benchmarks/dp_step.py                      # all four models, 16 × 128
    .venv/bin/python benchmarks/dp_step.py --models tiny-gpt2 --batch 8 --seq 64 --steps 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_MODELS = ["tiny-gpt2", "tiny-llama", "small-gpt2", "bench-gpt2-50m"]
# Vocabulary per model: 2048 is the demo's default byte-level BPE size (`teacher warmup --vocab-size`);
# the larger config gets a 32k vocabulary, which byte-level BPE cannot reach on the generated
# corpus (5,000 public records give ~12k), so its config is built with vocab_size=32000 directly.
DEFAULT_VOCAB = {"bench-gpt2-50m": 32000}
DEMO_VOCAB = 2048
LORA_R, LORA_ALPHA = 8, 16          # client/dp_lora.py defaults
LEARNING_RATE = 5e-3
NOISE_MULTIPLIER, MAX_GRAD_NORM = 1.0, 1.0   # values do not change the cost of a step


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


class _VocabOnly:
    """What ``build_model`` reads from a tokenizer: its length and special ids."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eos_token_id, self.pad_token_id = 0, 1

    def __len__(self) -> int:
        return self.vocab_size


# ------------------------------------------------------------------------------------ worker
def worker(spec: str, batch: int, seq: int, steps: int, rounds: int, warmup: int, budget_s: float,
           vocab: int) -> dict:
    import torch
    from torch.utils.data import TensorDataset

    from common.models.build import add_lora, build_model, count_parameters
    from common.models.lm import per_record_loss
    from common.privacy.dp_sgd import DPSGDPlan, make_private, sample_rate_for

    t_start = time.perf_counter()
    # The trainer's order: base model → device (CPU here) → add_lora → Adam → make_private.
    base = build_model(spec, _VocabOnly(vocab), max_positions=max(256, seq), seed=0).to("cpu")
    model = add_lora(base, LORA_R, LORA_ALPHA, 0.0)
    model.train()
    trainable, total = count_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]

    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, vocab, (batch, seq), generator=gen)
    mask = torch.ones_like(input_ids)
    tokens = batch * seq
    rss_built = _maxrss_mib()

    cpu_times = {"nonprivate": [], "dp": []}

    def step(fwd_model, optimizer) -> tuple[float, float, float, float, float]:
        c0 = time.process_time()
        t0 = time.perf_counter()
        loss = per_record_loss(fwd_model, input_ids, mask).mean()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, loss.item(), time.process_time() - c0

    # (a) non-private: plain Adam on the LoRA parameters, no opacus anywhere yet. Warm-up is cut
    # to one step per mode when a step is expensive relative to the time budget.
    plain_opt = torch.optim.Adam(params, lr=LEARNING_RATE)
    est_np = sum(step(model, plain_opt)[:3])
    warmup_used = max(1, warmup if est_np * 2 * warmup <= budget_s / 4 else 1)
    for _ in range(warmup_used - 1):
        est_np = sum(step(model, plain_opt)[:3])
    rss_nonprivate = _maxrss_mib()

    # (b) DP-SGD: the project's make_private (hooks mode, Poisson loader that we do not iterate).
    # Dataset of 16 batches so the sample rate is a realistic 1/16; the expected batch size that
    # DPOptimizer divides by is then exactly `batch`, the fixed physical batch fed below.
    n_records = 16 * batch
    dataset = TensorDataset(input_ids.repeat(16, 1), mask.repeat(16, 1))
    plan = DPSGDPlan(8.0, 1e-5, NOISE_MULTIPLIER, sample_rate_for(n_records, batch), steps_per_round=1,
                     rounds=1, max_grad_norm=MAX_GRAD_NORM, accountant="rdp")
    dp_adam = torch.optim.Adam(params, lr=LEARNING_RATE)
    _, private_model, dp_opt, _ = make_private(model, dp_adam, dataset, batch, plan)
    if dp_opt.expected_batch_size != batch:
        raise RuntimeError(f"opacus expects batch {dp_opt.expected_batch_size}, benchmark feeds {batch}")
    for _ in range(warmup_used):
        est_dp = sum(step(private_model, dp_opt)[:3])
    rss_dp = _maxrss_mib()

    # Attribute the DP step's extra work: time opacus's own pieces during the timed DP steps.
    # Instance attributes shadow the methods; the hooks re-added below bind these wrappers.
    dp_parts = {k: 0.0 for k in ("activation_hooks", "per_sample_grad_hooks", "clip_and_accumulate",
                                 "add_noise", "scale_grad", "adam_step")}
    timing_on = False

    def timed(name, fn):
        def wrapper(*a, **kw):
            if not timing_on:
                return fn(*a, **kw)
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                dp_parts[name] += time.perf_counter() - t
        return wrapper

    private_model.capture_activations_hook = timed("activation_hooks", private_model.capture_activations_hook)
    private_model.capture_backprops_hook = timed("per_sample_grad_hooks", private_model.capture_backprops_hook)
    dp_opt.clip_and_accumulate = timed("clip_and_accumulate", dp_opt.clip_and_accumulate)
    dp_opt.add_noise = timed("add_noise", dp_opt.add_noise)
    dp_opt.scale_grad = timed("scale_grad", dp_opt.scale_grad)
    dp_opt.original_optimizer.step = timed("adam_step", dp_opt.original_optimizer.step)

    hooks_on = True

    def set_hooks(on: bool) -> None:
        nonlocal hooks_on
        if on and not hooks_on:
            private_model.add_hooks(loss_reduction="mean", batch_first=True)
        elif not on and hooks_on:
            private_model.remove_hooks()
        hooks_on = on

    # Fit the plan into the time budget: prefer more alternation rounds (fairness under a
    # fluctuating load) over longer blocks; at least 3 rounds of 1 step each.
    pairs = max(3, int(budget_s // max(est_np + est_dp, 1e-9)))
    rounds_used = min(rounds, max(3, pairs // steps))
    steps_used = min(steps, max(1, pairs // rounds_used))

    times = {"nonprivate": [], "dp": []}
    phases = {m: {"forward": [], "backward": [], "optimizer": []} for m in times}
    block_means = {m: [] for m in times}
    losses = {m: [] for m in times}
    for r in range(rounds_used):
        order = ("nonprivate", "dp") if r % 2 == 0 else ("dp", "nonprivate")
        for mode in order:
            set_hooks(mode == "dp")
            fwd_model, opt = (model, plain_opt) if mode == "nonprivate" else (private_model, dp_opt)
            gc.collect()
            timing_on = mode == "dp"
            block = []
            for _ in range(steps_used):
                f, b, o, loss, cpu = step(fwd_model, opt)
                cpu_times[mode].append(cpu)
                block.append(f + b + o)
                phases[mode]["forward"].append(f)
                phases[mode]["backward"].append(b)
                phases[mode]["optimizer"].append(o)
                losses[mode].append(loss)
            # DPOptimizer.zero_grad leaves grad_sample at None and plain Adam never touches it,
            # so a per-sample gradient after a non-private block means the hooks were still on.
            if mode == "nonprivate" and any(getattr(p, "grad_sample", None) is not None for p in params):
                raise RuntimeError("opacus hooks still active on the non-private path")
            times[mode].extend(block)
            block_means[mode].append(statistics.fmean(block))
    set_hooks(True)
    timing_on = False
    n_dp = len(times["dp"])
    if dp_parts["per_sample_grad_hooks"] == 0.0:
        raise RuntimeError("instrumented opacus hooks never ran during the DP steps")

    med = {m: statistics.median(v) for m, v in times.items()}
    paired = [d / n for d, n in zip(block_means["dp"], block_means["nonprivate"])]
    return {
        "model": spec, "vocab": vocab, "batch": batch, "seq": seq, "tokens_per_step": tokens,
        "params_total": total, "params_trainable": trainable,
        "threads": torch.get_num_threads(),
        "steps_per_block": steps_used, "rounds": rounds_used, "warmup": warmup_used,
        "median_step_s": med,
        "tokens_per_s": {m: tokens / v for m, v in med.items()},
        "ratio_dp_over_nonprivate": med["dp"] / med["nonprivate"],
        "paired_block_ratios": paired,
        "phase_median_s": {m: {k: statistics.median(v) for k, v in ph.items()} for m, ph in phases.items()},
        "min_step_s": {m: min(v) for m, v in times.items()},
        "ratio_of_min_steps": min(times["dp"]) / min(times["nonprivate"]),
        "median_cpu_s": {m: statistics.median(v) for m, v in cpu_times.items()},
        "cpu_time_ratio": statistics.median(cpu_times["dp"]) / statistics.median(cpu_times["nonprivate"]),
        "rss_mib": {"built": rss_built, "nonprivate_peak": rss_nonprivate, "dp_peak": rss_dp,
                    "final_peak": _maxrss_mib()},
        "dp_parts_mean_s": {k: v / n_dp for k, v in dp_parts.items()},
        "last_loss": {m: v[-1] for m, v in losses.items()},
        "wall_s": time.perf_counter() - t_start,
    }


# ------------------------------------------------------------------------------------ driver
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return float("nan")


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def machine_info() -> dict:
    import opacus
    import peft
    import torch
    import transformers

    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": _cpu_model(), "logical_cpus": os.cpu_count(), "ram_gib": round(_ram_gib(), 1),
        "python": platform.python_version(), "torch": torch.__version__, "opacus": opacus.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__,
        "torch_threads": torch.get_num_threads(), "loadavg_start": _loadavg(),
    }


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def print_report(info: dict, results: list[dict], args) -> None:
    print(f"# DP-SGD LoRA step vs non-private LoRA step  ({info['date']})")
    print(f"CPU: {info['cpu']}, {info['logical_cpus']} logical CPUs, {info['ram_gib']} GiB RAM; "
          f"torch {info['torch']} ({info['torch_threads']} threads, default), opacus {info['opacus']}, "
          f"transformers {info['transformers']}, peft {info['peft']}, Python {info['python']}")
    print(f"load average (1/5/15 min): start {info['loadavg_start']}, end {info['loadavg_end']}")
    print(f"batch {args.batch} × seq {args.seq} = {args.batch * args.seq} tokens/step (no padding), "
          f"LoRA r={LORA_R} alpha={LORA_ALPHA} (GPT-2: c_attn; Llama: q_proj,v_proj), Adam lr={LEARNING_RATE}")
    print("DP step: fixed physical batch = logical batch fed straight through the opacus-wrapped model + "
          "DPOptimizer (forward, backward, step, zero_grad); no Poisson sampling, so batch-size variance "
          f"does not enter the timing. σ={NOISE_MULTIPLIER}, C={MAX_GRAD_NORM}, hooks mode.")
    print("Non-private step: same model object with the opacus hooks removed, plain Adam on the LoRA params.")
    print("Timing: warm-up, then alternating blocks (order flipped each round); medians of per-step times. "
          "Ratio = median DP step time / median non-private step time. Rounds and steps per block are cut to "
          f"fit --budget {args.budget:g} s of timed steps per model (at least 3 rounds of 1 step).")
    print("Peak RSS: one fresh subprocess per model; non-private peak read after the non-private warm-up "
          "(run first), DP peak after the DP warm-up, so Δ = extra high-water memory of the DP step; "
          "'end' is the peak after the alternating phase (both modes, hooks removed and re-added).")
    print()
    header = ("| model | params total / trainable | tok/s non-private | tok/s DP | ratio DP/non-private "
              "| paired block ratios (min–max) | peak RSS non-private / DP (Δ); end of run, MiB | steps × rounds |")
    print(header)
    print("|" + "---|" * 8)
    for r in results:
        if "error" in r:
            print(f"| {r['model']} | failed: {r['error']} |" + " |" * 6)
            continue
        tps, rss, pr = r["tokens_per_s"], r["rss_mib"], r["paired_block_ratios"]
        print(f"| {r['model']} (vocab {r['vocab']}) | {_fmt_params(r['params_total'])} / "
              f"{_fmt_params(r['params_trainable'])} | {tps['nonprivate']:,.0f} | {tps['dp']:,.0f} | "
              f"{r['ratio_dp_over_nonprivate']:.2f}× | {min(pr):.2f}–{max(pr):.2f} | "
              f"{rss['nonprivate_peak']:,.0f} / {rss['dp_peak']:,.0f} "
              f"(+{rss['dp_peak'] - rss['nonprivate_peak']:,.0f}); end {rss['final_peak']:,.0f} "
              f"| {r['steps_per_block']} × {r['rounds']} |")
    print()
    print("Per-phase median seconds per step (forward / backward / optimizer step + zero_grad):")
    for r in results:
        if "error" in r:
            continue
        ph = r["phase_median_s"]
        fmt = lambda p: f"{p['forward'] * 1e3:.1f} / {p['backward'] * 1e3:.1f} / {p['optimizer'] * 1e3:.1f} ms"
        print(f"  {r['model']:<16} non-private {fmt(ph['nonprivate'])};  DP {fmt(ph['dp'])};  "
              f"median step {r['median_step_s']['nonprivate'] * 1e3:.1f} vs {r['median_step_s']['dp'] * 1e3:.1f} ms; "
              f"ratio of fastest steps {r['ratio_of_min_steps']:.2f}×; "
              f"ratio of median process CPU time {r['cpu_time_ratio']:.2f}×; "
              f"subprocess wall {r['wall_s']:.0f} s; load avg {r['loadavg'][0]} → {r['loadavg'][1]}")
    print()
    print("Where the DP step's time goes (mean ms per DP step, timed inside opacus): activation hooks / "
          "per-sample-gradient hooks / clip_and_accumulate / add_noise / scale_grad / Adam step; "
          "then the median step-time difference DP − non-private:")
    for r in results:
        if "error" in r:
            continue
        p = r["dp_parts_mean_s"]
        parts = " / ".join(f"{p[k] * 1e3:.1f}" for k in ("activation_hooks", "per_sample_grad_hooks",
                                                         "clip_and_accumulate", "add_noise", "scale_grad",
                                                         "adam_step"))
        diff = (r["median_step_s"]["dp"] - r["median_step_s"]["nonprivate"]) * 1e3
        print(f"  {r['model']:<16} {parts} ms; opacus-specific total "
              f"{sum(v for k, v in p.items() if k != 'adam_step') * 1e3:.1f} ms; DP − non-private {diff:+.1f} ms")
    print()
    print("Goal stated in the issue: DP step ≤ 1.1× the non-private step time on CPU. One run's verdict "
          "(on a shared machine, read it with the load average and the paired block ratios):")
    for r in results:
        if "error" not in r:
            ratio, pr = r["ratio_dp_over_nonprivate"], r["paired_block_ratios"]
            sign = "≤" if ratio <= 1.1 else ">"
            print(f"  {r['model']}: {ratio:.2f}× ({sign} 1.1×; paired block ratios {min(pr):.2f}–{max(pr):.2f}, "
                  f"{len(pr)} pairs)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated TINY_SPECS names (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=16, help="records per step (default 16)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per record (default 128)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per block (default 5)")
    parser.add_argument("--rounds", type=int, default=8,
                        help="alternation rounds (non-private block + DP block) at most (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps per mode (default 2)")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="seconds of timed steps per model; rounds/steps are cut to fit, at least 3 rounds "
                             "of 1 step (default 60)")
    parser.add_argument("--vocab", type=int, default=None,
                        help=f"vocabulary for every model (default {DEMO_VOCAB}; 32000 for bench-gpt2-50m)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        vocab = args.vocab or DEFAULT_VOCAB.get(args.worker, DEMO_VOCAB)
        result = worker(args.worker, args.batch, args.seq, args.steps, args.rounds, args.warmup,
                        args.budget, vocab)
        print("RESULT " + json.dumps(result))
        return 0

    from common.models.build import TINY_SPECS

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in TINY_SPECS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(TINY_SPECS)}")
    info = machine_info()
    results = []
    for spec in models:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", spec, "--batch", str(args.batch),
               "--seq", str(args.seq), "--steps", str(args.steps), "--rounds", str(args.rounds),
               "--warmup", str(args.warmup), "--budget", str(args.budget)]
        if args.vocab:
            cmd += ["--vocab", str(args.vocab)]
        load_before = _loadavg()
        print(f"… {spec}: measuring in a fresh subprocess (load average {load_before})", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            results.append({"model": spec, "error": f"exit {proc.returncode}: {tail[0][:200]}"})
            continue
        results.append(json.loads(lines[-1][len("RESULT "):]) | {"loadavg": [load_before, _loadavg()]})
    info["loadavg_end"] = _loadavg()
    print_report(info, results, args)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "args": vars(args) | {"json": str(args.json)},
                                         "results": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
