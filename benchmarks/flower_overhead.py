"""Benchmark: wall time of a simulated federated run vs the same DP-LoRA work without Flower.

Prints figures; asserts nothing. One process runs, side by side on the same corpus and teacher:

  baseline   ``client.dp_lora.train_dp_lora`` (the exact function the ClientApp's train handler
             reaches through ``run_round``) called C×R times sequentially in this process, plus
             the very same held-out evaluations the federation does (``heldout_perplexity``:
             round 0 with the initial adapter and after every round, on every client's held-out
             split) and the same initial adapter (``load_lora_model`` + ``adapter_state``, what the
             ServerApp's ``initial_adapter`` does) and a FedAvg of the C adapters (weighted by
             examples, in numpy). Same ``DPLoRAConfig`` object as the simulation (σ calibrated for
             R rounds × S steps), same client files, one ledger per client. ``baseline`` runs at
             torch's default thread count (2 here), ``baseline1`` at one thread.
  runround1  the same, one thread, but calling ``client.dp_lora.run_round`` (what the ClientApp's
             train handler calls: ledger opened from its file, σ planned, ``train_dp_lora``, the
             release file written) instead of ``train_dp_lora``: the app's own per-round cost
             without Flower, so serial − runround1 is what Flower itself adds.
  sim modes  ``simulations.run.simulate`` (Flower's Simulation Engine, Ray backend, in-process
             ServerApp) on the same settings with C clients, R rounds, S local steps:
               parallel  num-cpus=2, client-cpus=1: two ClientApp actors run side by side, each
                         with one torch thread (Ray sets OMP_NUM_THREADS to the actor's CPUs);
               serial    num-cpus=1, client-cpus=1: one client at a time, one torch thread;
               serial2   num-cpus=2, client-cpus=2: one client at a time, two torch threads
                         (optional: ``--modes ...,serial2``);
               serialcold  as serial, with the actors' warm-model cache off
                         (``PRIVDISTILL_WARM_MODELS=0``: every message loads the base model from
                         disk, as before issue 15; optional).
             Each is compared with the baseline that uses the cores the same way: parallel ↔
             baseline (both use the 2 cores: the issue's comparison), serial ↔ baseline1 (one
             thread, one client at a time), serial2 ↔ baseline. Thread count matters a lot for a
             0.7M-parameter model on a busy 2-core machine, hence the pairing.

Both sides therefore do the same work: 1 initial adapter, C×(R+1) evaluations, C×R DP-SGD
trainings of S logical steps, R FedAvgs. (Since issue 15 the simulation does its evaluations
inside the train messages — each site scores the incoming adapter before training — plus one
final evaluate message: R+1 messages per site instead of 2R+1. Its "train s" therefore
includes C×R of the evaluations; "eval s" is the final evaluate only. Both sides load the base
model through the same per-process warm-model cache, common/models/cache.py.) What only the simulation does is the overhead measured:
Ray start-up/shut-down, actor processes importing torch/transformers/peft/opacus, message
passing through Ray's object store, the server's strategy and validation, round checkpoints and
release files (privdistill's own fault-tolerance I/O) and ``run_round``'s own ``plan_for`` (σ,
memoised per process and, since issue 15, kept beside each site's ledger). One calibration is
timed separately below.

Timing details: the baseline runs in this process after torch & co. are imported (its imports
are not timed; its σ calibrations are, once per client, as the simulation's actors pay them);
the import cost a fresh process pays is measured separately (a subprocess importing
``client.client_app``) and shown next to the simulation's start-up. Inside the
simulation a ClientApp mod writes the wall-clock start/end of every handler call (train /
evaluate), its pid and torch's thread count to a JSONL file; from it: start-up = first handler
start − ``simulate()`` call, shut-down = ``simulate()`` return − last handler end, and the
busy time of the clients. A sampler thread reads the CPU time of this process and of every
process below it (Ray's gcs_server, raylet, workers/actors) every 0.5 s (psutil), so the CPU
seconds per kind of process are shown (approximate: ≤ 0.5 s of a process's last CPU time may be
missed when it exits between samples). The mod and the baseline also record the CPU time
(``time.process_time``) spent inside train / evaluate, so the report splits CPU seconds into
training, evaluation and the rest (imports, Ray, server).

This machine may be shared: the load average before/after each pass is printed; compare ratios
of passes run in the same invocation only.

``--deploy-rounds R`` also measures a real deployment, the test suite's setup
(tests/test_deployment.py: a TLS SuperLink, two SuperNodes, ``flwr run`` of the app in
``--deploy-app``, default this checkout; every message starts a fresh ``flwr-clientapp``
process), and prints its seconds per round. Point ``--deploy-app`` at an older checkout to
time the code before a change on the same machine.

Usage (from the repository root):

    .venv/bin/python benchmarks/flower_overhead.py        # baseline1,runround1,serial,baseline,parallel; 3×2×10
    .venv/bin/python benchmarks/flower_overhead.py --clients 2 --rounds 1 --steps 3 --modes baseline,parallel
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SIM_MODES = {  # mode → (num-cpus, client-cpus)
    "parallel": (2, 1.0),
    "serial": (1, 1.0),
    "serial2": (2, 2.0),
    "serialcold": (1, 1.0),
}
COLD_MODES = {"serialcold"}  # the warm-model cache turned off in the actors
# mode → (torch threads (None: torch's default), call run_round instead of train_dp_lora)
BASELINES = {"baseline": (None, False), "baseline1": (1, False), "runround1": (1, True)}
DEFAULT_MODES = "baseline1,runround1,serial,baseline,parallel"


# ---------------------------------------------------------------------------- measurement helpers
def make_timing_mod(path: str):
    """A ClientApp mod that appends one JSON line per handler call (runs inside the Ray actor)."""

    def timing_mod(msg, context, call_next):
        import json as _json
        import os as _os
        import time as _time

        import torch as _torch

        start, cpu = _time.time(), _time.process_time()
        reply = call_next(msg, context)
        end, cpu = _time.time(), _time.process_time() - cpu
        record = {"type": str(msg.metadata.message_type), "node": context.node_config.get("partition-id"),
                  "start": start, "end": end, "cpu": cpu, "pid": _os.getpid(), "threads": _torch.get_num_threads()}
        with open(path, "a", encoding="utf-8") as f:
            f.write(_json.dumps(record) + "\n")
        return reply

    return timing_mod


class CpuSampler(threading.Thread):
    """CPU seconds of this process and all its descendants, by kind, sampled every ``period`` s."""

    def __init__(self, period: float = 0.5):
        super().__init__(daemon=True)
        import psutil

        self.psutil, self.period = psutil, period
        self.me = psutil.Process(os.getpid())
        self.start_own = self._cpu(self.me)
        self.last: dict[int, tuple[str, float]] = {}
        self.stop_event = threading.Event()

    @staticmethod
    def _cpu(proc) -> float:
        t = proc.cpu_times()
        return t.user + t.system

    def _kind(self, proc) -> str:
        try:
            name = proc.name()
            cmd = " ".join(proc.cmdline())
        except self.psutil.Error:
            return "unclassified (exited)"
        if "gcs_server" in name or "gcs_server" in cmd:
            return "ray gcs_server"
        if "raylet" in name or "/raylet" in cmd:
            return "ray raylet"
        if "ClientAppActor" in name or "ClientAppActor" in cmd:
            return "ClientApp actors"
        if name.startswith("ray::") or "default_worker.py" in cmd:
            return "ray idle workers"
        return "ray other (log monitor, agents)"

    def sample(self) -> None:
        try:
            children = self.me.children(recursive=True)
        except self.psutil.Error:
            return
        for child in children:
            try:
                cpu = self._cpu(child)
                kind = self._kind(child)
            except self.psutil.Error:
                continue
            previous = self.last.get(child.pid)
            # an actor is renamed ray::ClientAppActor once it starts: keep the most specific kind
            if previous and previous[0] == "ClientApp actors":
                kind = previous[0]
            self.last[child.pid] = (kind, cpu)

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.period)

    def finish(self) -> dict[str, float]:
        self.sample()
        self.stop_event.set()
        self.join()
        out: dict[str, float] = {"this process (server, driver, baseline)": self._cpu(self.me) - self.start_own}
        for kind, cpu in self.last.values():
            out[kind] = out.get(kind, 0.0) + cpu
        return out


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> dict:
    import flwr
    import opacus
    import peft
    import psutil
    import ray
    import torch
    import transformers

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 2 ** 30, 1),
        "python": platform.python_version(), "torch": torch.__version__, "flwr": flwr.__version__,
        "ray": ray.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "opacus": opacus.__version__, "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "(unset)"),
    }


# ---------------------------------------------------------------------------- setup
def prepare_inputs(work: Path, clients: int, warmup_steps: int) -> tuple[Path, Path, dict]:
    """Corpus and tiny teacher under ``work`` (reused when already there with the same shape)."""
    from common.data.generate import generate_corpus
    from common.data.loading import load_records
    from common.models.warmup import warmup_teacher

    data_dir, model_dir = work / "corpus", work / "teacher"
    info: dict = {}
    manifest = data_dir / "manifest.json"
    if manifest.is_file() and int(json.loads(manifest.read_text()).get("n_clients", 0)) < clients:
        shutil.rmtree(data_dir)  # too few clients: regenerate (the teacher is warmed up on it again too)
        shutil.rmtree(model_dir, ignore_errors=True)
    if not manifest.is_file():
        started = time.perf_counter()
        generate_corpus(data_dir, n_clients=clients, seed=0)
        info["corpus_s"] = time.perf_counter() - started
    warm = model_dir / "warmup.json"
    if not warm.is_file() or json.loads(warm.read_text()).get("steps") != warmup_steps:
        started = time.perf_counter()
        shutil.rmtree(model_dir, ignore_errors=True)
        warmup_teacher([r.text for r in load_records(data_dir / "public.jsonl")], model_dir, spec="tiny-gpt2",
                       steps=warmup_steps, progress=False)
        info["teacher_s"] = time.perf_counter() - started
    return data_dir, model_dir, info


def settings_for(args, data_dir: Path, model_dir: Path, num_cpus: int = 2, client_cpus: float = 1.0):
    from common.settings import RunSettings

    overrides = {"name": "bench-flower", "clients": args.clients, "rounds": args.rounds,
                 "min-clients": args.clients, "local-steps": args.steps, "data-dir": str(data_dir),
                 "model-dir": str(model_dir), "generate-data": False, "num-cpus": num_cpus,
                 "client-cpus": client_cpus}
    return RunSettings.from_toml(ROOT / "simulations" / "configs" / "dp-lora.toml", overrides)


# ---------------------------------------------------------------------------- the two sides
def run_baseline(settings, out_dir: Path, mode: str = "baseline", threads: int | None = None,
                 use_run_round: bool = False) -> dict:
    """The federation's work, sequentially, without Flower (see the module docstring)."""
    import torch

    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads)
    try:
        return _run_baseline(settings, out_dir, mode, use_run_round)
    finally:
        torch.set_num_threads(default_threads)


def _run_baseline(settings, out_dir: Path, mode: str, use_run_round: bool) -> dict:
    import numpy as np

    from client.dp_lora import Site, heldout_perplexity, load_lora_model, plan_for, run_round, train_dp_lora
    from common.models.build import adapter_state
    from common.privacy.ledger import PrivacyLedger

    cfg, data = settings.dp, Path(settings.data_dir)
    clients = [f"client_{i}" for i in range(settings.clients)]
    ledgers = {}
    for c in clients:  # not timed: needs δ from the plan (one σ calibration per client)
        _, plan = plan_for(data / c / "train.jsonl", cfg)
        ledgers[c] = PrivacyLedger.open(out_dir / "ledgers" / f"{c}.json", c, cfg.epsilon, plan.delta, cfg.accountant)
    # The simulation calibrates each site's σ once (per actor process) inside its timed rounds; so
    # does the baseline, in its first train_dp_lora per site, once the memo filled above is cleared.
    from common.privacy.accounting import calibrate_noise

    calibrate_noise.cache_clear()

    sample_cpu = CpuSampler()
    sample_cpu.start()
    load0 = load_average()
    timings = {"init_s": 0.0, "train_s": 0.0, "eval_s": 0.0, "fedavg_s": 0.0, "rounds_s": [],
               "train_cpu_s": 0.0, "eval_cpu_s": 0.0}
    started = time.perf_counter()
    t = time.perf_counter()
    model, _ = load_lora_model(settings.model_dir, cfg)  # = server_app.initial_adapter
    adapter = adapter_state(model)
    del model
    timings["init_s"] += time.perf_counter() - t

    def evaluate(adapter) -> float:
        t, cpu = time.perf_counter(), time.process_time()
        ppl = [heldout_perplexity(settings.model_dir, data / c / "heldout.jsonl", cfg, adapter) for c in clients]
        timings["eval_s"] += time.perf_counter() - t
        timings["eval_cpu_s"] += time.process_time() - cpu
        return float(np.exp(sum(n * np.log(p) for p, n in ppl) / sum(n for _, n in ppl)))

    perplexities = [evaluate(adapter)]
    for server_round in range(1, settings.rounds + 1):
        round_start = time.perf_counter()
        results = []
        for c in clients:
            t, cpu = time.perf_counter(), time.process_time()
            if use_run_round:  # what the ClientApp's train handler calls: ledger file, σ, release file
                site = Site(c, data / c / "train.jsonl", data / c / "heldout.jsonl",
                            out_dir / "site-ledgers" / f"{c}.json", cfg.epsilon, Path(settings.model_dir))
                update, metrics, _ = run_round(site, cfg, settings.name, server_round, adapter)
                results.append((update, metrics["num-examples"]))
            else:
                result = train_dp_lora(settings.model_dir, data / c / "train.jsonl", cfg, ledgers[c],
                                       settings.name, server_round, adapter)
                results.append((result.adapter, result.metrics["examples"]))
            timings["train_s"] += time.perf_counter() - t
            timings["train_cpu_s"] += time.process_time() - cpu
        t = time.perf_counter()
        weights = np.array([n for _, n in results], dtype=np.float64)
        weights /= weights.sum()
        adapter = {k: sum(w * a[k].astype(np.float64) for w, (a, _) in zip(weights, results)).astype(np.float32)
                   for k in results[0][0]}
        timings["fedavg_s"] += time.perf_counter() - t
        perplexities.append(evaluate(adapter))
        timings["rounds_s"].append(time.perf_counter() - round_start)
    wall = time.perf_counter() - started
    cpu = sample_cpu.finish()
    return {"mode": mode, "wall_s": wall, **timings, "perplexities": perplexities, "cpu_s": cpu,
            "load_before": load0, "load_after": load_average(), "threads": __import__("torch").get_num_threads()}


def run_sim(settings, run_dir: Path, mode: str) -> dict:
    import math

    from simulations.run import prepare_run, simulate

    prepare_run(settings, run_dir, resume=False)
    timing_file = run_dir.parent / f"{run_dir.name}-handlers.jsonl"
    timing_file.unlink(missing_ok=True)
    marks = time_calls()  # ray.init and the server's initial adapter, both run in this process
    sample_cpu = CpuSampler()
    sample_cpu.start()
    load0 = load_average()
    called = time.time()
    started = time.perf_counter()
    saved_env = os.environ.get("PRIVDISTILL_WARM_MODELS")
    if mode in COLD_MODES:  # ray.init starts the raylet from this environment: the actors inherit it
        os.environ["PRIVDISTILL_WARM_MODELS"] = "0"
    try:
        state = simulate(settings, client_mods=(make_timing_mod(str(timing_file)),))
    finally:
        wall = time.perf_counter() - started
        returned = time.time()
        cpu = sample_cpu.finish()
        marks.restore()
        if saved_env is None:
            os.environ.pop("PRIVDISTILL_WARM_MODELS", None)
        else:
            os.environ["PRIVDISTILL_WARM_MODELS"] = saved_env
    calls = [json.loads(line) for line in timing_file.read_text().splitlines() if line.strip()]
    by_type: dict[str, float] = {}
    for call in calls:
        kind = "train" if "train" in call["type"] else "evaluate" if "evaluate" in call["type"] else call["type"]
        by_type[kind] = by_type.get(kind, 0.0) + call["end"] - call["start"]
        by_type[kind + "_cpu"] = by_type.get(kind + "_cpu", 0.0) + call["cpu"]
    first, last = min(c["start"] for c in calls), max(c["end"] for c in calls)
    busy, covered_until = 0.0, first  # union of the handler intervals
    for call in sorted(calls, key=lambda c: c["start"]):
        begin = max(call["start"], covered_until)
        if call["end"] > begin:
            busy += call["end"] - begin
            covered_until = call["end"]
    perplexities = [state["baseline"]["perplexity"]] + [r["evaluate"]["perplexity"] for r in state["rounds"]]
    return {
        "mode": mode, "num_cpus": settings.num_cpus, "client_cpus": settings.client_cpus, "wall_s": wall,
        "startup_s": first - called, "shutdown_s": returned - last, "between_s": last - first,
        "no_handler_s": (last - first) - busy, "ray_init_s": marks.seconds.get("ray.init", float("nan")),
        "initial_adapter_s": marks.seconds.get("initial_adapter", float("nan")),
        "handler_train_s": by_type.get("train", 0.0), "handler_eval_s": by_type.get("evaluate", 0.0),
        "train_cpu_s": by_type.get("train_cpu", 0.0), "eval_cpu_s": by_type.get("evaluate_cpu", 0.0),
        "handler_calls": len(calls), "actors": len({c["pid"] for c in calls}),
        "calls_by_type": {t: sum(1 for c in calls if c["type"] == t) for t in sorted({c["type"] for c in calls})},
        "actor_threads": sorted({c["threads"] for c in calls}),
        "rounds_s": [r["seconds"] for r in state["rounds"]],
        "bytes_per_client": [r["bytes_per_client"] for r in state["rounds"]],
        "completed_rounds": state["completed_round"],
        "perplexities": [p if p is not None and math.isfinite(p) else float("nan") for p in perplexities],
        "cpu_s": cpu, "load_before": load0, "load_after": load_average(),
    }


class time_calls:
    """Wrap ``ray.init`` and ``server.server_app.initial_adapter`` to time them (restored after)."""

    def __init__(self):
        import ray

        import server.server_app as server_app

        self.seconds: dict[str, float] = {}
        self.patched = [(ray, "init", "ray.init"), (server_app, "initial_adapter", "initial_adapter")]
        self.originals = [getattr(module, attr) for module, attr, _ in self.patched]
        for (module, attr, label), original in zip(self.patched, self.originals):
            setattr(module, attr, self._wrap(original, label))

    def _wrap(self, function, label):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - started
        return timed

    def restore(self) -> None:
        for (module, attr, _), original in zip(self.patched, self.originals):
            setattr(module, attr, original)


def run_deployment(app_dir: Path, rounds: int, work: Path) -> dict:
    """tests/test_deployment.py's real-process setup (TLS SuperLink, two SuperNodes, `flwr run`
    of ``app_dir``): wall time of `flwr run`, and each committed round's seconds."""
    import tests.test_deployment as deployment

    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    processes = deployment.Processes(work / "logs")
    timed, original_run, original_repo = {}, deployment.run_flwr, deployment.REPO

    def timed_run_flwr(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original_run(*args, **kwargs)
        finally:
            timed["flwr_run_s"] = time.perf_counter() - started

    deployment.run_flwr, deployment.REPO = timed_run_flwr, Path(app_dir).resolve()
    load0 = load_average()
    try:
        state, _ = deployment.deploy_over_tls(work, processes, sites=2, rounds=rounds, extra={})
    finally:
        deployment.run_flwr, deployment.REPO = original_run, original_repo
        processes.stop_all()
    return {"app": str(app_dir), "rounds": rounds, "flwr_run_s": timed.get("flwr_run_s", float("nan")),
            "rounds_s": [r["seconds"] for r in state["rounds"]],
            "perplexities": [state["baseline"]["perplexity"]] + [r["evaluate"]["perplexity"] for r in state["rounds"]],
            "load_before": load0, "load_after": load_average()}


def print_deployment(result: dict) -> None:
    rounds = result["rounds_s"]
    print(f"\ndeployment ({result['app']}): TLS SuperLink + 2 SuperNodes, {result['rounds']} rounds × 3 local steps; "
          f"`flwr run` {result['flwr_run_s']:.1f} s ({result['flwr_run_s'] / result['rounds']:.1f} s per round, "
          f"start-up and round-0 evaluation included); committed rounds "
          f"{' / '.join(f'{x:.1f}' for x in rounds)} s (mean {sum(rounds) / len(rounds):.1f}); "
          f"load {result['load_before']} → {result['load_after']}")
    print("  held-out perplexity per round: " + " ".join(f"{p:.3f}" for p in result["perplexities"]))


def import_seconds() -> tuple[float, float]:
    """(wall, CPU) a fresh Python process (e.g. a Ray actor) pays to import the ClientApp's modules."""
    import resource

    started, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", "import client.client_app"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - started, (after.ru_utime + after.ru_stime) - (cpu.ru_utime + cpu.ru_stime)


def plan_seconds(settings) -> tuple[float, float]:
    """(wall, CPU) of one ``plan_for`` (σ calibration)."""
    from client.dp_lora import plan_for

    started, cpu = time.perf_counter(), time.process_time()
    plan_for(Path(settings.data_dir) / "client_0" / "train.jsonl", settings.dp)
    return time.perf_counter() - started, time.process_time() - cpu


# ---------------------------------------------------------------------------- report
# Each simulation is compared with the baseline that uses the cores the same way: two 1-thread
# actors side by side ↔ the sequential baseline at torch's default threads (both use 2 cores, as
# the issue asks); one 1-thread client at a time ↔ the 1-thread baseline; one 2-thread client at a
# time ↔ the default-threads baseline.
MATCH = {"parallel": "baseline", "serial": "baseline1", "serial2": "baseline", "runround1": "baseline1",
         "serialcold": "baseline1"}


def print_table(header: tuple, rows: list[tuple]) -> None:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths)))


def print_report(args, results: list[dict], extra: dict, info: dict) -> None:
    by_mode = {r["mode"]: r for r in results}

    def baseline_for(r: dict) -> dict | None:
        return by_mode.get(MATCH[r["mode"]]) or next((by_mode[m] for m in BASELINES if m in by_mode), None)

    print()
    print(f"Flower overhead: {args.clients} clients × {args.rounds} rounds × {args.steps} local DP-SGD steps "
          f"(batch {extra['batch_size']}, max-length {extra['max_length']}, tiny-gpt2 teacher, "
          f"{extra['params']:,} parameters), {args.clients * (args.rounds + 1)} held-out evaluations on both sides")
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM; python {info['python']}, "
          f"torch {info['torch']} ({info['torch_threads']} threads by default), flwr {info['flwr']}, "
          f"ray {info['ray']}, transformers {info['transformers']}, peft {info['peft']}, opacus {info['opacus']}; "
          f"OMP_NUM_THREADS {info['OMP_NUM_THREADS']}; {info['date']}")
    header = ("pass", "Ray CPUs/client", "torch threads", "wall s", "vs", "× vs", "× vs, excl. start/shut-down",
              "start-up s", "shut-down s", "train s", "eval s", "rounds s", "load before → after")
    rows = []
    for r in results:
        rounds = " / ".join(f"{s:.1f}" for s in r["rounds_s"])
        load = f"{r['load_before']} → {r['load_after']}"
        if r["mode"] in BASELINES:
            ref = by_mode.get(MATCH.get(r["mode"], ""))
            ratio = f"{r['wall_s'] / ref['wall_s']:.2f}" if ref else "1.00"
            rows.append((f"{r['mode']} (no Flower, sequential)", "–", str(r["threads"]), f"{r['wall_s']:.1f}",
                         ref["mode"] if ref else "–", ratio, ratio, "–", "–", f"{r['train_s']:.1f}",
                         f"{r['eval_s']:.1f}", rounds, load))
            continue
        base = baseline_for(r)
        steady = r["wall_s"] - r["startup_s"] - r["shutdown_s"]
        rows.append((f"simulation {r['mode']}", f"{r['num_cpus']}/{r['client_cpus']:g}",
                     ",".join(map(str, r["actor_threads"])), f"{r['wall_s']:.1f}",
                     base["mode"] if base else "–", f"{r['wall_s'] / base['wall_s']:.2f}" if base else "–",
                     f"{steady / base['wall_s']:.2f}" if base else "–",
                     f"{r['startup_s']:.1f}", f"{r['shutdown_s']:.1f}", f"{r['handler_train_s']:.1f}",
                     f"{r['handler_eval_s']:.1f}", rounds, load))
    print_table(header, rows)
    print()
    print("train s / eval s: baseline = time inside train_dp_lora / heldout_perplexity; simulation = summed time "
          "inside the ClientApp's train / evaluate handlers (summed over actors, so > wall when parallel).")
    print("start-up: simulate() call → first handler starts (Ray init, actor processes, imports, the server's "
          "initial adapter); shut-down: last handler ends → simulate() returns. 'excl. start/shut-down' = "
          "(wall − start-up − shut-down) / baseline wall.")
    print(f"a fresh process importing client.client_app: {extra['import_s']:.1f} s ({extra['import_cpu_s']:.1f} "
          f"CPU s); one plan_for (σ calibration) {extra['plan_s']:.2f} s ({extra['plan_cpu_s']:.2f} CPU s) — "
          f"memoised per process, and run_round keeps it beside the site's ledger (once per site and run)")
    sims = [r for r in results if r["mode"] not in BASELINES]
    if "runround1" in by_mode and "serial" in by_mode:
        rr, sim = by_mode["runround1"], by_mode["serial"]
        steady = sim["wall_s"] - sim["startup_s"] - sim["shutdown_s"]
        print(f"serial simulation vs runround1 (the ClientApp's own work without Flower, same thread): "
              f"× {sim['wall_s'] / rr['wall_s']:.2f}, excluding start-up/shut-down × {steady / rr['wall_s']:.2f}")
    if sims:
        print()
        print("where the simulation's wall time goes (seconds):")
        header = ("pass", "wall", "Δ vs its baseline", "start-up", "  ray.init", "  initial adapter",
                  "  actors+imports+dispatch", "rounds: a handler busy", "rounds: no handler running", "shut-down")
        rows = []
        for r in sims:
            base = baseline_for(r)
            rest = r["startup_s"] - r["ray_init_s"] - r["initial_adapter_s"]
            rows.append((r["mode"], f"{r['wall_s']:.1f}",
                         f"{r['wall_s'] - base['wall_s']:+.1f} ({base['mode']})" if base else "–",
                         f"{r['startup_s']:.1f}", f"{r['ray_init_s']:.1f}", f"{r['initial_adapter_s']:.1f}",
                         f"{rest:.1f}", f"{r['between_s'] - r['no_handler_s']:.1f}", f"{r['no_handler_s']:.1f}",
                         f"{r['shutdown_s']:.1f}"))
        print_table(header, rows)
    for r in results:
        if r["mode"] in BASELINES:
            print(f"({r['mode']}: {r['wall_s']:.1f} s = initial adapter {r['init_s']:.1f} + train "
                  f"{r['train_s']:.1f} + eval {r['eval_s']:.1f} + FedAvg {r['fedavg_s']:.2f})")
    print()
    print("CPU seconds (less sensitive to other load on the machine than wall time):")
    header = ("pass", "all processes", "in train", "in eval", "rest (imports, Ray, server, I/O)", "× vs")
    rows = []
    for r in results:
        total = sum(r["cpu_s"].values())
        base = by_mode.get(MATCH.get(r["mode"], "")) or (r if r["mode"] in BASELINES else baseline_for(r))
        base_total = sum(base["cpu_s"].values()) if base else float("nan")
        rows.append((r["mode"], f"{total:.1f}", f"{r['train_cpu_s']:.1f}", f"{r['eval_cpu_s']:.1f}",
                     f"{total - r['train_cpu_s'] - r['eval_cpu_s']:.1f}",
                     f"{total / base_total:.2f} ({base['mode']})" if base else "–"))
    print_table(header, rows)
    print()
    print("CPU seconds by process (psutil, sampled every 0.5 s):")
    kinds = sorted({k for r in results for k in r["cpu_s"]})
    print("  " + " | ".join(["pass".ljust(10)] + [k for k in kinds]))
    for r in results:
        print("  " + " | ".join([r["mode"].ljust(10)] + [f"{r['cpu_s'].get(k, 0.0):.1f}".rjust(len(k)) for k in kinds]))
    print()
    for r in sims:
        print(f"{r['mode']}: bytes_per_client recorded by the ServerApp per round: {r['bytes_per_client']}; "
              f"ClientApp handler calls by message type: {r.get('calls_by_type')}")
    print()
    print("held-out perplexity per round (round 0 first; DP noise is unseeded, so they differ slightly):")
    for r in results:
        print(f"  {r['mode']:<10} " + " ".join(f"{p:.3f}" for p in r["perplexities"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="local DP-SGD steps per round")
    parser.add_argument("--warmup-steps", type=int, default=60, help="teacher warm-up steps (setup, not timed)")
    parser.add_argument("--modes", default=DEFAULT_MODES,
                        help="comma-separated passes, run in this order; from "
                             f"{','.join([*BASELINES, *SIM_MODES])}")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench-flower",
                        help="corpus + teacher (reused) and the passes' run directories (runs/ is git-ignored)")
    parser.add_argument("--keep", action="store_true", help="keep the passes' run directories")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--deploy-rounds", type=int, default=0,
                        help="also time the real-process deployment setup for this many rounds (0: skip)")
    parser.add_argument("--deploy-app", type=Path, default=ROOT,
                        help="the app (a checkout of this repository) the deployment runs")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in BASELINES and m not in SIM_MODES]
    if unknown or len(set(modes)) != len(modes):
        parser.error(f"unknown or repeated modes {modes}; choose from {','.join([*BASELINES, *SIM_MODES])}")

    import torch

    from common.models.build import build_model

    info = machine()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    print(f"setup in {args.work_dir} (load average {load_average()}) ...", flush=True)
    data_dir, model_dir, setup = prepare_inputs(args.work_dir, args.clients, args.warmup_steps)
    for key, value in setup.items():
        print(f"  {key}: {value:.1f}")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    passes_dir = args.work_dir / f"passes-{stamp}"
    passes_dir.mkdir(parents=True)
    base_settings = settings_for(args, data_dir, model_dir)
    (import_s, import_cpu_s), (plan_s, plan_cpu_s) = import_seconds(), plan_seconds(base_settings)
    extra = {"import_s": import_s, "import_cpu_s": import_cpu_s, "plan_s": plan_s, "plan_cpu_s": plan_cpu_s,
             "batch_size": base_settings.dp.batch_size, "max_length": base_settings.dp.max_length,
             "params": sum(p.numel() for p in build_model(model_dir).parameters())}
    results = []
    try:
        for mode in modes:
            print(f"\n=== {mode} (load average {load_average()}) ===", flush=True)
            if mode in BASELINES:
                result = run_baseline(settings_for(args, data_dir, model_dir), passes_dir / mode, mode,
                                      *BASELINES[mode])
            else:
                num_cpus, client_cpus = SIM_MODES[mode]
                result = run_sim(settings_for(args, data_dir, model_dir, num_cpus, client_cpus),
                                 passes_dir / f"sim-{mode}", mode)
            print(f"=== {mode}: {result['wall_s']:.1f} s ===", flush=True)
            results.append(result)
    finally:
        if not args.keep:
            shutil.rmtree(passes_dir, ignore_errors=True)
    torch.set_num_threads(info["torch_threads"])
    deployment = None
    if args.deploy_rounds:
        print(f"\n=== deployment of {args.deploy_app} (load average {load_average()}) ===", flush=True)
        deployment = run_deployment(args.deploy_app, args.deploy_rounds, passes_dir.parent / f"deploy-{stamp}")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                                         "extra": extra, "setup": setup, "results": results,
                                         "deployment": deployment}, indent=2) + "\n")
    if results:
        print_report(args, results, extra, info)
    if deployment:
        print_deployment(deployment)
    return 0


if __name__ == "__main__":
    sys.exit(main())
