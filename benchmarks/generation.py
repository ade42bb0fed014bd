"""Benchmark: synthetic-generation throughput, batched + KV cache against batch size 1.

Prints figures; asserts nothing about speed. For every model it times ``HFGenerator.generate``
(transformers ``generate``, KV cache, left padding, the synthesis phase's sampling: top-k 50,
top-p 0.9, no-repeat-ngram 2, temperature 1) on the same prompts, settings and seed, once with
``--batch`` prompts per ``generate`` call and once with one prompt per call, side by side in
one process: a warm-up call per side first, then ``--rounds`` rounds that alternate the two
sides (the order flips every round to cancel drift); tokens/s are summed over the rounds.

The models are built from config (``common.models.build.TINY_SPECS``) with random weights: the
cost of a decoding step does not depend on the weights, only on the shapes. Random weights
would stop at EOS at random lengths, so EOS is suppressed (``min_new_tokens =
max_new_tokens``): every sequence generates exactly ``--new-tokens`` tokens on both sides, and
the run checks it. Threads: 1 by default (``--threads``): this benchmark's own runs on a shared,
busy 2-core machine were 2-25x slower with torch's default of 2 threads (OpenMP's threads wait
on each other when another process holds a core). The tokenizer is the demo's: byte-level BPE with a ``--vocab``-token
vocabulary trained on the offline generated corpus's public split. Prompts are the synthesis
phase's: control codes (``label + "\\n\\n"``) and the BOS token, in equal shares.

Usage (from the repository root):

    .venv/bin/python benchmarks/generation.py                       # tiny-gpt2 and small-gpt2
    .venv/bin/python benchmarks/generation.py --models tiny-gpt2 --prompts 32 --new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_MODELS = ["tiny-gpt2", "small-gpt2"]
LABELS = ["billing", "cards", "loans"]


def build_tokenizer(vocab: int, public_records: int):
    """The demo's tokenizer: byte-level BPE trained on the generated corpus's public split."""
    from common.data.generate import generate_corpus
    from common.data.loading import load_records
    from common.models.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        generate_corpus(Path(tmp) / "corpus", n_clients=1, seed=0, public_records=public_records,
                        train_per_client=10, heldout_per_client=5)
        texts = [r.text for r in load_records(Path(tmp) / "corpus" / "public.jsonl")]
    return train_tokenizer(texts, vocab_size=vocab)


def bench_model(spec: str, tokenizer, prompts: list[str], batch: int, new_tokens: int, rounds: int,
                seed: int, device: str = "cpu") -> dict:
    import torch

    from common.models.build import build_model, count_parameters
    from common.models.generation import HFGenerator, SamplingSettings

    model = build_model(spec, tokenizer, max_positions=256, seed=0)
    generator = HFGenerator(model, tokenizer, device=device)
    sides = {
        "batched": SamplingSettings(max_new_tokens=new_tokens, min_new_tokens=new_tokens, batch_size=batch, seed=seed),
        "batch 1": SamplingSettings(max_new_tokens=new_tokens, min_new_tokens=new_tokens, batch_size=1, seed=seed),
    }
    for settings in sides.values():  # warm-up: one short call per side
        generator.generate(prompts[: settings.batch_size], settings, seed)
    totals = {name: {"tokens": 0, "seconds": 0.0, "calls": 0} for name in sides}
    for r in range(rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for name in order:
            out = generator.generate(prompts, sides[name], seed + r)
            stats = generator.last_stats
            if stats["new_tokens"] != len(prompts) * new_tokens or any(g.new_tokens != new_tokens for g in out):
                raise SystemExit(f"{spec} {name}: expected {new_tokens} new tokens per prompt, got "
                                 f"{sorted({g.new_tokens for g in out})}")
            totals[name]["tokens"] += stats["new_tokens"]
            totals[name]["seconds"] += stats["seconds"]
            totals[name]["calls"] += stats["batches"]
    for t in totals.values():
        t["tokens_per_second"] = t["tokens"] / t["seconds"]
    _, params = count_parameters(model)
    return {"model": spec, "parameters": params, "vocab": len(tokenizer), "threads": torch.get_num_threads(),
            "sides": totals, "ratio": totals["batched"]["tokens_per_second"] / totals["batch 1"]["tokens_per_second"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Figures go to stdout (a Markdown table); --json also writes them "
                                            "to a file.")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                        help=f"TINY_SPECS names (default: {' '.join(DEFAULT_MODELS)})")
    parser.add_argument("--prompts", type=int, default=32, help="prompts per generate call (default 32)")
    parser.add_argument("--batch", type=int, default=32, help="batch size of the batched side (default 32)")
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens generated per prompt (default 48)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per model (default 2)")
    parser.add_argument("--vocab", type=int, default=2048, help="tokenizer vocabulary (default 2048, the demo's)")
    parser.add_argument("--public-records", type=int, default=2000,
                        help="generated public records the tokenizer is trained on (default 2000)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1; 0 = torch's own choice, one per core: on a busy "
                             "2-core machine that ran 2-25x slower, see benchmarks/RESULTS.md)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda (bf16 autocast)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    for name in ("prompts", "batch", "new_tokens", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be ≥ 1")

    import torch
    import transformers

    from common.data.control import control_prompt

    if args.threads < 0:
        parser.error("--threads must be ≥ 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    tokenizer = build_tokenizer(args.vocab, args.public_records)
    shares = LABELS + [None]
    prompts = [control_prompt(shares[i % len(shares)], tokenizer.bos_token) for i in range(args.prompts)]
    results = [bench_model(spec, tokenizer, prompts, args.batch, args.new_tokens, args.rounds, args.seed, args.device)
               for spec in args.models]
    wall = time.perf_counter() - t0

    print(f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, torch "
          f"{torch.__version__}, transformers {transformers.__version__}, {results[0]['threads']} torch threads, "
          + (f"device {torch.cuda.get_device_name()} (bf16 autocast)" if args.device.startswith("cuda")
             else "CPU fp32, no GPU used"))
    print(f"1-minute load average: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
          f"(other processes compete for the same cores when it is above 0)")
    print(f"{args.prompts} prompts × {args.new_tokens} new tokens (EOS suppressed), top-k 50, top-p 0.9, "
          f"no-repeat-ngram 2; {args.rounds} alternating rounds; vocabulary {len(tokenizer)}; random weights")
    print()
    print("| model | parameters | side | batch | generate calls | new tokens | seconds | tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for res in results:
        for side, t in res["sides"].items():
            batch = args.batch if side == "batched" else 1
            print(f"| {res['model']} | {res['parameters'] / 1e6:.2f}M | {side} | {batch} | {t['calls']} | "
                  f"{t['tokens']:,} | {t['seconds']:.2f} | {t['tokens_per_second']:,.0f} |")
    print()
    for res in results:
        print(f"{res['model']}: batched (batch {args.batch}, KV cache) / batch 1 = {res['ratio']:.1f}×")
    print(f"total wall time {wall:.0f} s")
    if args.json:
        figures = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "results": results, "wall_seconds": wall, "load_before": load_before}
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
