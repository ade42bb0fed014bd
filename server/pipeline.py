"""Pipelines: a mode is an ordered list of phases, run top to bottom by the ServerApp.

A phase is one module with ``run(phase: Phase) -> dict``: federated rounds of one message
type, a server-only step (synthesis, distillation, export), or a federated evaluation. Its
returned summary is recorded in ``state.json`` under ``phases[name]`` once it completes, so
``--resume`` skips finished phases and re-enters the one that was cut (each phase resumes
from its own checkpoints: the teacher rounds from the last committed round, synthesis from
the last complete shard, distillation from the last checkpoint).
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from logging import INFO

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid

from common.settings import RunSettings
from server.checkpoint import RunDirectory

# mode → phases, in order. Each phase name is a module under server/ (dashes → underscores).
PIPELINES: dict[str, tuple[str, ...]] = {
    "dp-lora": ("teacher-rounds",),
    "distildp": ("teacher-rounds", "label-histogram", "synthesis", "distillation", "student-evaluation", "export"),
    "dp-opd": ("student-rounds", "student-evaluation", "export"),
    "pdss": ("pdss-prompts", "pdss-rationales", "pdss-students", "pdss-evaluation", "pdss-export"),
}


@dataclass
class Phase:
    """What a phase gets: the grid (for federated phases), the run's settings and directory."""

    grid: Grid
    context: Context
    settings: RunSettings
    run: RunDirectory

    def state(self) -> dict:
        return self.run.load_state()

    def summary_of(self, name: str) -> dict:
        return self.state().get("phases", {}).get(name, {})


def phases_of(settings: RunSettings) -> tuple[str, ...]:
    """The run's phases: its mode's, with pdss's privatiser trained first under encoder-decoder."""
    if settings.mode == "pdss" and settings.pdss.encoder_decoder:
        return ("pdss-privatiser", *PIPELINES["pdss"])
    return PIPELINES[settings.mode]


def run_pipeline(grid: Grid, context: Context, settings: RunSettings) -> dict:
    run = RunDirectory(settings.run_dir)
    names = phases_of(settings)
    log(INFO, "pipeline %s: %s", settings.mode, " → ".join(names))
    for name in names:
        if run.exists() and phase_complete(run.load_state(), name, settings):
            log(INFO, "phase %s: already complete, skipped", name)
            continue
        started = time.monotonic()
        log(INFO, "phase %s: started", name)
        module = importlib.import_module(f"server.{name.replace('-', '_')}")
        summary = module.run(Phase(grid, context, settings, run))
        state = run.load_state()
        state["settings"] = settings.to_run_config()  # e.g. `privdistill distill` turns a dp-lora run into distildp
        state.setdefault("phases", {})[name] = {**summary, "complete": True,
                                                "seconds": round(time.monotonic() - started, 2)}
        run.commit(state)
        log(INFO, "phase %s: complete in %.1fs", name, time.monotonic() - started)
    return run.load_state()


def phase_complete(state: dict, name: str, settings: RunSettings) -> bool:
    if state.get("phases", {}).get(name, {}).get("complete"):
        return True
    # Runs written before pipelines existed (dp-lora only): their rounds are the teacher phase.
    return name == "teacher-rounds" and state.get("completed_round", 0) >= settings.rounds
