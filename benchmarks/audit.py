"""Audit benchmark: what do the public floor, federated DP-LoRA at ε = 2 and ε = 8, and the
same federated run without DP leak on the demo corpus? Prints the audit table (markdown).

    .venv/bin/python benchmarks/audit.py [--rounds 4] [--local-steps 40] [--out runs/bench-audit]

All runs share the corpus, the warmed-up teacher and every training setting; only the
privacy differs. Long enough training that the 16-times canaries can be learned without DP.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-audit"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=40)
    parser.add_argument("--lora-targets", default="c_attn,c_proj,c_fc")
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--candidates", type=int, default=500)
    args = parser.parse_args()

    from common.audit.report import markdown
    from common.audit.run import run_audit
    from common.settings import RunSettings
    from simulations.demo import prepare
    from simulations.run import prepare_run, simulate

    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = prepare(args.out)  # corpus (5 sites, seed 0) + tiny GPT-2 teacher
    config = Path(__file__).resolve().parents[1] / "simulations" / "configs" / "dp-lora.toml"
    common = {"rounds": args.rounds, "local-steps": args.local_steps, "lora-targets": args.lora_targets,
              "learning-rate": args.learning_rate, "data-dir": str(args.out / "corpus"),
              "model-dir": str(model_dir), "generate-data": False, "min-clients": 5}
    runs = {"dp-eps2": {"epsilon": 2.0}, "dp-eps8": {"epsilon": 8.0}, "no-dp": {"private": False}}
    seconds = {}
    for name, extra in runs.items():
        run_dir = args.out / name
        if (run_dir / "state.json").exists() and \
                json.loads((run_dir / "state.json").read_text())["completed_round"] == args.rounds:
            continue  # already trained by an earlier invocation
        started = time.perf_counter()
        settings = RunSettings.from_toml(config, {**common, **extra, "name": name})
        simulate(prepare_run(settings, run_dir, resume=(run_dir / "state.json").exists()))
        seconds[name] = time.perf_counter() - started
    report = run_audit(args.out / "dp-eps8", [f"federated DP-LoRA ε=2={args.out / 'dp-eps2'}",
                                               f"federated LoRA, no DP={args.out / 'no-dp'}"],
                       candidates=args.candidates, progress=True)
    print(markdown(report))
    print("training seconds:", {k: round(v) for k, v in seconds.items()})


if __name__ == "__main__":
    main()
