"""The pdss rows of a comparison: methods that learn a *task* (question → answer), read on one.

pdss trains a step-by-step student on a task, not on free text, so its rows come from a
task-shaped dataset (the [compare] ``task-config``: simulations/configs/pdss.toml by default,
the generated arithmetic word problems or a user's question/answer files) and their figure is
held-out answer accuracy (exact match), never perplexity. Same ε targets and seeds as the rest
of the comparison; each cell is one real pdss run:

    pdss              the prompts pay ``prompt-share`` of ε (token exponential mechanism, once
                      per record) and the step-by-step student's DP-SGD the rest;
    pdss-answer-only  no prompt leaves a site, and the whole ε pays for DP-SGD on the answer
                      task alone: what rationales have to beat at equal ε.

A prompt's ε is ε_token × tokens perturbed, and which record is longest is private; so the
per-token ε comes from a public bound, ``prompt-tokens``: ε_token = prompt-share · ε /
prompt-tokens, and a site holding a longer record refuses before sending anything, naming it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from common.settings import RunSettings, flatten_tables, read_toml

# method → what it changes in the task config's run settings
TASK_METHODS = {
    "pdss": {},
    "pdss-answer-only": {"rationale-weight": 0.0},
}


def task_values(comparison) -> dict:
    """The task config's flat run settings, with the task data under the comparison by default."""
    path = Path(comparison.compare.task_config)
    values = flatten_tables(read_toml(path, "simulations/configs/pdss.toml"), str(path))
    if not values.get("data-dir"):
        values["data-dir"] = str(comparison.out / "task")
    return values


def cell_values(comparison, cell, bases: Path) -> dict:
    """The flat settings of a pdss cell's run."""
    c = comparison.compare
    values = {**task_values(comparison), **TASK_METHODS[cell.method], "mode": "pdss", "seed": cell.seed,
              "name": cell.run_key, "generate-data": False, "teacher-dir": str(bases / "task" / "teacher"),
              "model-dir": str(bases / "task" / "student-base")}
    answer_only = values.get("rationale-weight") == 0.0
    if math.isinf(cell.epsilon):
        return {**values, "private": False, "token-epsilon": math.inf}
    prompt_epsilon = 0.0 if answer_only else c.prompt_share * cell.epsilon
    values.update({"private": True, "epsilon": cell.epsilon - prompt_epsilon})
    if not answer_only:
        values.update({"prompt-epsilon": prompt_epsilon, "token-epsilon": prompt_epsilon / c.prompt_tokens})
    return values


def prepare_task_bases(comparison, bases: Path, console=None) -> None:
    """The task data (when generated) and its public teacher and student base (pdss's own warm-ups)."""
    from simulations.compare import _say
    from simulations.pdss import prepare_pdss

    target = bases / "task"
    if (target / "teacher" / "config.json").exists() and (target / "student-base" / "config.json").exists():
        return
    values = {**task_values(comparison), "mode": "pdss", "seed": 0}
    _say(console, f"task: data in {values['data-dir']}, public teacher and student base in {target}")
    settings = RunSettings.from_flat(values)
    settings.run_dir = str(target)
    prepare_pdss(settings, target)


def figures(run_dir: Path) -> dict:
    """A pdss cell: held-out answer accuracy (the sites computed it), the teacher's accuracy on
    what it saw, leakage of the prompts, ε and δ from the ledgers, parameters, wall time."""
    from common.models.build import build_model, count_parameters
    from server.checkpoint import RunDirectory
    from simulations.compare_cells import ledger_epsilon

    state = RunDirectory(run_dir).load_state()
    flat = dict(state["settings"])
    if flat.get("token-epsilon", 0) is None:  # state.json holds ∞ as null (validation refuses NaN): no perturbation
        flat["token-epsilon"] = math.inf
    settings = RunSettings.from_flat(flat)
    phases, metrics = state.get("phases", {}), state.get("metrics", {})
    epsilon, delta = ledger_epsilon(run_dir, settings)
    return {"accuracy": phases["pdss-evaluation"]["accuracy"],
            "accuracy_sites": phases["pdss-evaluation"]["sites"],
            "teacher_accuracy_seen": metrics.get("teacher_accuracy_perturbed"),
            "leakage": metrics.get("leakage"), "canaries_read_back": metrics.get("canaries_read_back"),
            "canaries": metrics.get("canaries"), "token_epsilon": settings.pdss.token_epsilon,
            "epsilon": epsilon, "delta": delta,
            "parameters": count_parameters(build_model(run_dir / "student"))[1],
            "wall_seconds": sum(p.get("seconds", 0.0) for p in phases.values())}


def floor_figures(comparison, bases: Path, console=None) -> dict:
    """{"task-student": …}: the public student base on every site's held-out questions (it never
    saw a private record), once per comparison; {} when the comparison has no task."""
    from common.atomic import atomic_write_json
    from simulations.compare import _say

    path = comparison.out / "cells" / "floor-task.json"
    if path.is_file():
        return {"task-student": json.loads(path.read_text())}
    if not (bases / "task" / "student-base" / "config.json").exists():
        return {}
    _say(console, "floor: scoring the public task student base")
    out = _floor_accuracy(comparison, bases)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, out)
    return {"task-student": out}


def _floor_accuracy(comparison, bases: Path) -> dict:
    from client.dp_lora import Site
    from client.pdss_student import heldout_accuracy
    from common.models.build import build_model, count_parameters
    from common.models.student_update import initial_student

    from simulations.compare import Cell

    values = cell_values(comparison, Cell("pdss-answer-only", math.inf, 0), bases)
    settings = RunSettings.from_flat(values)
    correct = records = 0
    data = Path(settings.data_dir)
    for i in range(settings.clients):
        site = Site(f"client_{i}", data / f"client_{i}" / "train.jsonl", data / f"client_{i}" / "heldout.jsonl",
                    bases / "task" / "unused-ledger.json", 0.0, Path(settings.model_dir))
        accuracy, n = heldout_accuracy(site, settings, initial_student(settings))  # B = 0: the base model itself
        correct, records = correct + accuracy * n, records + n
    return {"accuracy": correct / records, "parameters": count_parameters(build_model(settings.model_dir))[1]}


def check_task_data(comparison) -> None:
    """A user's task data must have the files and fields pdss reads: said before the first run."""
    from common.data.task import load_task

    values = task_values(comparison)
    data = Path(values["data-dir"])
    if values.get("generate-data") and not (data / "public.jsonl").exists():
        return  # generated before the first pdss cell
    settings = RunSettings.from_flat({**values, "mode": "pdss", "model-dir": "unused"})
    settings.check_paths()  # every site's train and held-out file
    p = settings.pdss
    for path in [settings.public_file()] + [data / f"client_{i}" / f"{split}.jsonl" for i in range(settings.clients)
                                            for split in ("train", "heldout")]:
        load_task(path, p.question_field, p.answer_field, p.rationale_field)  # a one-line DataError if not


def is_task_method(method: str) -> bool:
    return method in TASK_METHODS
