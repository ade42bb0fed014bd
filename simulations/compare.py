"""`privdistill compare`: every distillation method on the same sites, data, seeds, student and ε.

A comparison is a grid of cells (method × ε × seed). Each cell is read off a real run of the
real pipelines (Flower's Simulation Engine, the sites' ledgers, export), and several cells
share one run where the method says they are the same release:

    run ``kd``       distildp pipeline at ε: gives the `teacher` row (its DP teacher), the
                     `distildp` row (its student) and, at ε = ∞, `nonprivate-kd`;
    run ``hard``     the `kd` run forked after synthesis (same DP teacher, same synthetic
                     text), distilled with hard labels only: `synthetic-hard`. The two rows
                     then differ by the loss alone;
    run ``dpsgd``    dp-lora pipeline on the public student: `dp-sgd-student`;
    run ``dpkd``     dp-lora teacher at ε/2, then dp-opd (off-policy) student rounds at ε/2 on
                     the same site ledgers: `dpkd`;
    run ``opd``      dp-opd pipeline (on-policy) with the public teacher: `dp-opd`.

Every cell records the held-out perplexity over the sites' held-out splits (weighted by
records), the public perplexity, parameters, wall time, the ε and δ the ledgers report, and
its leakage (MIA AUC by loss and Min-K%, mean exposure of the 16× canaries). A finished cell
is written to CELLS/…json and never redone; a cut run resumes from its own checkpoints, and
the ledgers refuse to charge any round twice.
"""

from __future__ import annotations

import difflib
import json
import math
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from common.atomic import atomic_write_json, json_safe
from common.errors import ConfigError
from common.settings import RunSettings, flatten_tables, read_toml, unknown_key_message
from simulations import compare_task

# method → the run it is read from, and what it reads there (see the module docstring).
METHODS = {
    "teacher": ("kd", "teacher"),
    "dp-sgd-student": ("dpsgd", "student"),
    "synthetic-hard": ("hard", "student"),
    "distildp": ("kd", "student"),
    "dpkd": ("dpkd", "student"),
    "nonprivate-kd": ("kd", "student"),   # always at ε = ∞
    "dp-opd": ("opd", "student"),
    # read on the task (simulations/compare_task.py): answer accuracy, not perplexity
    "pdss": ("pdss", "student"),
    "pdss-answer-only": ("pdss-answer-only", "student"),
}
FIXED_EPSILON = {"nonprivate-kd": math.inf}
TEACHER_RUN = "<the cell's own teacher run>"  # dpkd: filled in once that run has finished
NEEDS_MODE = {"dpkd": "dp-opd", "dp-opd": "dp-opd", "pdss": "pdss", "pdss-answer-only": "pdss"}  # methods that need a pipeline mode to exist


@dataclass
class CompareSettings:
    """The [compare] table; every other table is a run setting (common/settings.py)."""

    methods: list = field(default_factory=lambda: ["teacher", "dp-sgd-student", "synthetic-hard", "distildp",
                                                   "dpkd", "nonprivate-kd"])
    epsilons: list = field(default_factory=lambda: [2.0, 8.0, math.inf])
    seeds: list = field(default_factory=lambda: [0])
    out_dir: str = "runs/compare"
    teacher_model: str = "small-gpt2"   # a tiny spec (warmed up on the public split), an HF id or a local path
    student_model: str = "tiny-gpt2"    # the same; shares the teacher's tokenizer
    teacher_warmup_steps: int = 300
    student_warmup_steps: int = 300
    histogram_share: float = 0.1        # distildp: share of ε for the DP label histogram (the rest: teacher)
    public_records: int = 600           # generated corpus only
    train_per_client: int = 200
    heldout_per_client: int = 50
    leakage_records: int = 150          # members and non-members scored per cell
    leakage_candidates: int = 200       # exposure: candidates per canary
    task_config: str = "simulations/configs/pdss.toml"  # the pdss rows' task, models and pdss settings
    prompt_share: float = 0.5           # pdss: share of ε for the prompts (the rest: the student's DP-SGD)
    prompt_tokens: int = 12             # pdss: public bound on a prompt's perturbed tokens (ε_token = share·ε / it)

    def validate(self) -> None:
        if not self.methods:
            raise ConfigError("methods is empty; name at least one of " + ", ".join(METHODS))
        for method in self.methods:
            if method not in METHODS:
                close = difflib.get_close_matches(str(method), METHODS, n=1)
                raise ConfigError(f"unknown method {method!r}; available: {', '.join(METHODS)}"
                                  + (f" (did you mean {close[0]!r}?)" if close else ""))
        if not self.epsilons:
            raise ConfigError("epsilons is empty; give at least one target ε (e.g. epsilons = [2.0, 8.0, inf])")
        for eps in self.epsilons:
            if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
                raise ConfigError(f"every ε must be a number > 0 (inf for no DP), got {eps!r}")
        if not self.seeds or not all(isinstance(s, int) for s in self.seeds):
            raise ConfigError(f"seeds must be a non-empty list of integers, got {self.seeds!r}")
        if not 0 < self.histogram_share < 0.5:
            raise ConfigError(f"histogram-share must be in (0, 0.5), got {self.histogram_share}")
        if not 0 < self.prompt_share < 1:
            raise ConfigError(f"prompt-share must be in (0, 1), got {self.prompt_share}")
        if any(compare_task.is_task_method(m) for m in self.methods) and not Path(self.task_config).is_file():
            raise ConfigError(f"task-config {self.task_config} not found: the pdss rows need a pdss config "
                              "(e.g. simulations/configs/pdss.toml)")
        for name in ("teacher_warmup_steps", "student_warmup_steps", "leakage_records", "leakage_candidates",
                     "prompt_tokens"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")

    def cells(self) -> list["Cell"]:
        out = []
        for method in self.methods:
            for eps in ([FIXED_EPSILON[method]] if method in FIXED_EPSILON else self.epsilons):
                if method == "distildp" and math.isinf(eps) and "nonprivate-kd" in self.methods:
                    continue  # the same run and student as nonprivate-kd: one row, not two
                for seed in self.seeds:
                    cell = Cell(method, float(eps), int(seed))
                    if cell not in out:
                        out.append(cell)
        return out


@dataclass(frozen=True)
class Cell:
    method: str
    epsilon: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}_eps{eps_text(self.epsilon)}_seed{self.seed}"

    @property
    def run_key(self) -> str:
        kind = METHODS[self.method][0]
        return f"{kind}_eps{eps_text(self.epsilon)}_seed{self.seed}"


def eps_text(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


@dataclass
class Comparison:
    compare: CompareSettings
    run_values: dict          # flat run settings shared by every cell
    source: str = ""

    @property
    def out(self) -> Path:
        return Path(self.compare.out_dir)


def load_comparison(path: str | Path, overrides: dict | None = None) -> Comparison:
    """Read and check the whole comparison (every cell's settings) before anything runs."""
    path = Path(path)
    document = read_toml(path, "simulations/configs/compare.toml")
    compare_table = document.pop("compare", {})
    run_values = flatten_tables(document, str(path))
    known = {f.name for f in fields(CompareSettings)}
    compare_values = {}
    for key, value in {**compare_table, **(overrides or {})}.items():
        name = key.replace("-", "_")
        if name in known:
            compare_values[name] = value
        elif key in compare_table:
            raise ConfigError(f"{path}: [compare] " + unknown_key_message(key, known, "compare setting"))
        else:
            run_values[key] = value
    compare = CompareSettings(**compare_values)
    compare.out_dir = str(Path(compare.out_dir).resolve())  # runs record absolute paths: any later cwd finds them
    compare.task_config = str(Path(compare.task_config).resolve())  # like out-dir: relative to where it runs
    if "epsilons" in compare_values and not isinstance(compare.epsilons, list):
        compare.epsilons = [compare.epsilons]
    compare.validate()
    comparison = Comparison(compare, run_values, str(path))
    check_methods_available(comparison)
    for cell in compare.cells():  # every cell's settings parse (unknown keys, bad values) before any run
        for values in cell_runs(comparison, cell, Path("/nonexistent")):
            # the dpkd student's teacher run does not exist yet: its own settings are checked here
            RunSettings.from_flat({**values, "opd-teacher": "public"} if values.get("opd-teacher") == TEACHER_RUN
                                  else values)
    check_data(comparison)
    return comparison


# ---------------------------------------------------------------------------- runs per cell
def _eps_values(eps: float) -> dict:
    return {"private": False} if math.isinf(eps) else {"epsilon": eps, "private": True}


def cell_runs(comparison: Comparison, cell: Cell, bases: Path) -> list[dict]:
    """The flat settings of the run(s) a cell is read from, in order (dpkd: teacher, then student)."""
    c = comparison.compare
    kind = METHODS[cell.method][0]
    shared = {**comparison.run_values, "seed": cell.seed, "audit": False,
              "data-dir": comparison.run_values.get("data-dir") or str(comparison.out / "corpus")}
    teacher_dir, student_dir = str(bases / "teacher"), str(bases / "student")
    name = cell.run_key
    if compare_task.is_task_method(cell.method):
        return [compare_task.cell_values(comparison, cell, bases)]
    if kind in ("kd", "hard"):
        values = {**shared, "name": name.replace("hard_", "kd_"), "mode": "distildp", "model-dir": teacher_dir,
                  "student": student_dir, **_eps_values(cell.epsilon)}
        if not math.isinf(cell.epsilon):
            uses_histogram = RunSettings.from_flat({k: v for k, v in values.items()}).uses_label_histogram
            if uses_histogram:  # the histogram and the teacher split ε; their composition is below the sum
                values["histogram-epsilon"] = c.histogram_share * cell.epsilon
                values["epsilon"] = (1 - c.histogram_share) * cell.epsilon
        if kind == "hard":
            values.update({"kd-lambda": 0.0, "kd-beta": 0.0})
        return [values]
    if kind == "dpsgd":
        return [{**shared, "name": name, "mode": "dp-lora", "model-dir": student_dir, **_eps_values(cell.epsilon)}]
    if kind == "dpkd":  # the DistilDP paper's DPKD: ε/2 for the teacher, ε/2 for the student's DP-SGD KD
        half = _eps_values(cell.epsilon / 2)
        teacher = {**shared, "name": f"{name}-teacher", "mode": "dp-lora", "model-dir": teacher_dir, **half}
        # dp-opd's off-policy settings are DPKD's loss: 0.6·CE + 0.4·KL(teacher‖student) on every record token
        student = {**shared, "name": name, "mode": "dp-opd", "model-dir": teacher_dir, "student": student_dir,
                   "opd-teacher": TEACHER_RUN, "opd-lambda": 0.0, "opd-beta": 0.0, "opd-ce-weight": 0.6,
                   "opd-prefix": 1, **half}
        return [teacher, student]
    if kind == "opd":
        return [{**shared, "name": name, "mode": "dp-opd", "model-dir": teacher_dir, "student": student_dir,
                 "opd-teacher": "public", **_eps_values(cell.epsilon)}]
    raise AssertionError(kind)


def check_methods_available(comparison: Comparison) -> None:
    from common.settings import MODES

    missing = sorted({m for m in comparison.compare.methods if NEEDS_MODE.get(m) and NEEDS_MODE[m] not in MODES})
    if missing:
        raise ConfigError(f"method(s) {', '.join(missing)} need the {NEEDS_MODE[missing[0]]!r} pipeline, which this "
                          "installation does not have; drop them from methods")


def check_data(comparison: Comparison) -> None:
    """What a method needs but the data lacks is said before the first run."""
    if any(compare_task.is_task_method(m) for m in comparison.compare.methods):
        compare_task.check_task_data(comparison)
    if not has_text_methods(comparison):
        return
    values = comparison.run_values
    data_dir = values.get("data-dir")
    if not data_dir:
        if not values.get("generate-data", False):
            raise ConfigError("data-dir is not set and generate-data is false; point data-dir at a directory with "
                              "public.jsonl and client_i/{train,heldout}.jsonl")
        return
    probe = RunSettings.from_flat({**values, "mode": "distildp", "model-dir": "unused"})
    if not probe.public_file().is_file():
        raise ConfigError(f"{probe.public_file()} not found: every method warms its models up (and DistilDP scores "
                          "public perplexity) on the public split; add public.jsonl to data-dir")
    needs_labels = {"synthetic-hard", "distildp", "nonprivate-kd", "teacher"} & set(comparison.compare.methods)
    if needs_labels and probe.synthesis.prompt_source == "control-codes" and not probe.dp.label_field:
        raise ConfigError(f"method(s) {', '.join(sorted(needs_labels))} use control codes (prompt-source = "
                          "control-codes) but label-field is not set; set label-field to the data's label column "
                          "or prompt-source = bos")
    probe.check_paths()  # every site's files, and the label field in every record


# ---------------------------------------------------------------------------- running
def prepare_bases(comparison: Comparison, console=None) -> Path:
    """The corpus (when generated) and the public base models every method starts from."""
    from common.data.generate import generate_corpus
    from common.data.loading import load_records
    from common.models.build import TINY_SPECS
    from common.models.warmup import warmup_teacher
    from transformers import AutoTokenizer

    c, out = comparison.compare, comparison.out
    bases = out / "bases"
    if any(compare_task.is_task_method(m) for m in c.methods):
        compare_task.prepare_task_bases(comparison, bases, console)
    if not has_text_methods(comparison):
        return bases  # only the task rows: no corpus, no text base models
    values = comparison.run_values
    corpus = Path(values.get("data-dir") or out / "corpus")
    if not values.get("data-dir") and not (corpus / "manifest.json").exists():
        _say(console, f"corpus: generating {corpus}")
        generate_corpus(corpus, n_clients=int(values.get("clients", 5)), seed=0, public_records=c.public_records,
                        train_per_client=c.train_per_client, heldout_per_client=c.heldout_per_client,
                        site_stamp=bool(values.get("site-stamp", True)))
    public_path = Path(values.get("public-path") or corpus / "public.jsonl")
    label_field = values.get("label-field") or None
    from common.data.control import with_control_code

    texts = [with_control_code(r.label, r.text) if label_field else r.text
             for r in load_records(public_path, label_field=label_field)]
    for role, spec, steps in (("teacher", c.teacher_model, c.teacher_warmup_steps),
                              ("student", c.student_model, c.student_warmup_steps)):
        target = bases / role
        if (target / "config.json").exists():
            continue
        if spec in TINY_SPECS:
            tokenizer = AutoTokenizer.from_pretrained(bases / "teacher") if role == "student" else None
            _say(console, f"{role}: warming a {spec} up on the public split ({steps} steps)")
            warmup_teacher(texts, target, spec=spec, steps=steps, seed=0, progress=False, tokenizer=tokenizer)
        else:  # a user's model (HF id or path): used as given, copied so every cell reads the same files
            from common.models.build import build_model

            _say(console, f"{role}: {spec} (as given)")
            build_model(spec).save_pretrained(target)
            AutoTokenizer.from_pretrained(spec).save_pretrained(target)
    from common.models.loading import check_same_tokenizer

    # Said now, not after the teacher's rounds: every distillation compares token distributions.
    check_same_tokenizer(AutoTokenizer.from_pretrained(bases / "teacher"), AutoTokenizer.from_pretrained(bases / "student"),
                         c.teacher_model, c.student_model)
    return bases


def has_text_methods(comparison: Comparison) -> bool:
    return any(not compare_task.is_task_method(m) for m in comparison.compare.methods)


def run_cell(comparison: Comparison, cell: Cell, bases: Path, console=None) -> dict:
    """Run (or resume) what a cell needs and return its figures; written once complete."""
    from simulations import compare_cells

    cell_file = comparison.out / "cells" / f"{cell.name}.json"
    if cell_file.is_file():
        return json.loads(cell_file.read_text())
    started = time.monotonic()
    run_dirs = []
    for values in cell_runs(comparison, cell, bases):
        if values.get("opd-teacher") == TEACHER_RUN:  # its charges compose with the teacher's in the same ledgers
            values["opd-teacher"] = str(run_dirs[-1].resolve())
        run_dirs.append(_run_pipeline(comparison, cell, values, bases, console))
    figures = compare_task.figures(run_dirs[-1]) if compare_task.is_task_method(cell.method) \
        else compare_cells.figures(cell, run_dirs[-1], comparison, bases)
    figures.update({"method": cell.method, "epsilon_target": cell.epsilon, "seed": cell.seed,
                    "runs": [str(p) for p in run_dirs], "compare_seconds": round(time.monotonic() - started, 1)})
    cell_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cell_file, json_safe(figures))
    return figures


def _run_pipeline(comparison: Comparison, cell: Cell, values: dict, bases: Path, console) -> Path:
    from server.checkpoint import RunDirectory
    from simulations.run import prepare_run, simulate

    kind = METHODS[cell.method][0]
    run_dir = comparison.out / "runs" / (cell.run_key if kind != "dpkd" else values["name"])
    if kind == "hard" and not RunDirectory(run_dir).exists():  # the distildp run first, then its fork
        kd = Cell("distildp", cell.epsilon, cell.seed)
        fork_after_synthesis(_run_pipeline(comparison, kd, cell_runs(comparison, kd, bases)[0], bases, console),
                             run_dir)
    state = RunDirectory(run_dir).load_state() if RunDirectory(run_dir).exists() else None
    if state and state.get("phases", {}).get("export", {}).get("complete") or \
            (state and values["mode"] == "dp-lora" and state.get("completed_round", 0) >= int(values.get("rounds", 3))):
        return run_dir
    _say(console, f"{cell.name}: {values['mode']} run {run_dir.name} ({'resuming' if state else 'new'})")
    settings = prepare_run(RunSettings.from_flat(values), run_dir, resume=state is not None)
    simulate(settings)
    return run_dir


def fork_after_synthesis(source: Path, target: Path) -> None:
    """A copy of a distildp run up to its synthetic corpus: the same DP teacher and the same
    synthetic text (one release, one set of ledger charges), so a second student can be
    distilled from them with another loss. Nothing private is re-run and nothing is charged."""
    from server.checkpoint import RunDirectory

    state = RunDirectory(source).load_state()
    for name in ("distillation", "student-evaluation", "export"):
        state.get("phases", {}).pop(name, None)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for entry in ("adapters", "ledgers", "synthetic"):
        if (source / entry).exists():
            shutil.copytree(source / entry, staging / entry)
    RunDirectory(staging).commit(state)
    staging.rename(target)


def run_comparison(comparison: Comparison, console=None, report_only: bool = False) -> dict:
    """Run every missing cell, then write the report. ``report_only``: run nothing, and report
    every finished cell in the directory (a comparison grown over several invocations)."""
    from simulations.compare_report import write_report

    comparison.out.mkdir(parents=True, exist_ok=True)
    check_same_settings(comparison)
    bases = prepare_bases(comparison, console)
    from simulations import compare_cells

    floor = compare_cells.floor_figures(comparison, bases, console) \
        if has_text_methods(comparison) or (comparison.out / "cells" / "floor.json").is_file() else {}
    if any(compare_task.is_task_method(m) for m in comparison.compare.methods) or report_only:
        floor = {**floor, **compare_task.floor_figures(comparison, bases, console)}
    if report_only:
        results = [json.loads(p.read_text()) for p in sorted((comparison.out / "cells").glob("*_seed*.json"))]
    else:
        cells = comparison.compare.cells()
        results = []
        for i, cell in enumerate(cells, 1):
            _say(console, f"[{i}/{len(cells)}] {cell.method} at ε = {eps_text(cell.epsilon)}, seed {cell.seed}")
            results.append(run_cell(comparison, cell, bases, console))
    if report_only:  # the table lists methods in the usual order, whichever invocation ran them
        seen = {c["method"] for c in results}
        comparison.compare.methods = [m for m in METHODS if m in seen]
        comparison.compare.seeds = sorted({c["seed"] for c in results})
    document = {"format": "privdistill-compare", "version": 1, "config": comparison.source,
                "machine": machine(), "compare": asdict(comparison.compare), "settings": comparison.run_values,
                "floor": floor, "cells": results}
    write_report(json_safe(document), comparison.out)
    return document


GROWABLE = ("methods", "epsilons", "seeds", "out_dir")  # a comparison may gain cells; nothing else may change
DRILLS = ("fail-client", "fail-round", "fail-fraction", "fail-phase", "fail-phase-after")  # fault injection only


def check_same_settings(comparison: Comparison) -> None:
    """Cells of one comparison share every setting: a re-run with other settings is refused
    (its cells would not be comparable with the finished ones); more methods, ε or seeds are fine."""
    path = comparison.out / "settings.json"
    current = json_safe({"compare": {k: v for k, v in asdict(comparison.compare).items() if k not in GROWABLE},
                         "run": {k: v for k, v in comparison.run_values.items() if k not in DRILLS}})
    if not path.is_file():
        atomic_write_json(path, current)
        return
    saved = json.loads(path.read_text())
    changed = sorted({k for part in ("compare", "run") for k in set(saved[part]) | set(current[part])
                      if saved[part].get(k) != current[part].get(k)})
    if changed:
        raise ConfigError(f"{comparison.out} holds a comparison with other settings ({', '.join(changed)}); its cells "
                          "would not be comparable. Use another --out, or the same settings (only methods, epsilons "
                          "and seeds may grow)")


def machine() -> dict:
    import os

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "gpu": gpu}


def _say(console, text: str) -> None:
    if console is not None:
        console.print(text)

