"""`privdistill simulate`: the whole federation on one machine with Flower's Simulation Engine."""

from __future__ import annotations

import logging
from pathlib import Path

from common.errors import ConfigError
from common.settings import RunSettings
from server.checkpoint import RunDirectory


def prepare_run(settings: RunSettings, run_dir: Path, resume: bool) -> RunSettings:
    """Fill in paths, generate the corpus / warm the teacher up when asked, check everything."""
    settings.run_dir = str(run_dir)
    settings.resume = resume
    if resume and not RunDirectory(run_dir).exists():
        raise ConfigError(f"{run_dir} has no state.json: nothing to resume; drop --resume to start a new run")
    if not resume and RunDirectory(run_dir).exists():
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-dir")
    if not settings.data_dir:
        settings.data_dir = str(run_dir / "corpus")
    if settings.mode == "pdss":
        from simulations.pdss import prepare_pdss

        prepare_pdss(settings, run_dir)
    if not settings.model_dir:
        settings.model_dir = str(run_dir / "teacher")
    data_dir, model_dir = Path(settings.data_dir), Path(settings.model_dir)
    if settings.generate_data and not (data_dir / "manifest.json").exists():
        from common.data.generate import generate_corpus

        generate_corpus(data_dir, n_clients=settings.clients, seed=settings.seed, site_stamp=settings.site_stamp)
    elif settings.generate_data:
        check_generated_stamp(data_dir, settings.site_stamp)
    if not (model_dir / "config.json").exists():
        public = data_dir / "public.jsonl"
        if not public.is_file():
            raise ConfigError(f"model-dir {model_dir} does not exist and there is no {public} to warm a teacher up on")
        from common.data.loading import load_records
        from common.models.warmup import warmup_teacher

        warmup_teacher([r.text for r in load_records(public)], model_dir, spec=settings.warmup_spec,
                       steps=settings.warmup_steps, seed=settings.seed)
    settings.check_paths()
    return settings


def check_generated_stamp(data_dir: Path, site_stamp: bool) -> None:
    """A corpus generated earlier is reused only when it has the site stamp setting asked for."""
    import json

    written = json.loads((data_dir / "manifest.json").read_text()).get("site_stamp", True)  # older corpora: stamped
    if written != site_stamp:
        raise ConfigError(f"{data_dir} was generated with site-stamp = {str(written).lower()}; delete it or "
                          f"point data-dir elsewhere to generate one with site-stamp = {str(site_stamp).lower()}")


def simulate(settings: RunSettings, client_mods: tuple = ()) -> dict:
    """Run the configured federation in the Simulation Engine; returns the final run state."""
    from flwr.simulation import run_simulation

    from client.client_app import build_client_app
    from server.server_app import build_server_app

    # Flower's own console handler prints its records; without this, a root handler set up
    # by a dependency prints every one of them a second time, DEBUG included.
    logging.getLogger("flwr").propagate = False
    run_config = settings.to_run_config()
    backend_config = {
        "client_resources": {"num_cpus": settings.client_cpus, "num_gpus": settings.client_gpus},
        "init_args": {"num_cpus": settings.num_cpus, "object_store_memory": 100 * 1024 ** 2},
    }
    run_simulation(server_app=build_server_app(run_config), client_app=build_client_app(run_config, client_mods),
                   num_supernodes=settings.clients, backend_config=backend_config)
    if settings.mode == "pdss":  # its card (student/README.md) states both mechanisms; then the research metrics
        from simulations.pdss import pdss_metrics

        run = RunDirectory(settings.run_dir)
        state = run.load_state()
        if state.get("phases", {}).get("pdss-students", {}).get("complete"):
            state["metrics"] = pdss_metrics(settings)
            run.commit(state)
        return state
    from common.audit.report import write_privacy_card

    write_privacy_card(Path(settings.run_dir))
    state = RunDirectory(settings.run_dir).load_state()
    if state.get("phases", {}).get("export", {}).get("complete") and settings.audit:
        audit_pipeline(settings)  # dp-opd: the run's model is its student (on the student base), the floor that base
    return RunDirectory(settings.run_dir).load_state()


def audit_pipeline(settings: RunSettings) -> dict:
    """Audit teacher and student (the KD-privacy study: students inherit the teacher's membership
    risk, so the student is what must be shown safe), then restate the student's card."""
    from common.audit.run import run_audit
    from server.export import STUDENT_DIR, audit_summary, write_cards

    run_dir = Path(settings.run_dir)
    report = run_audit(run_dir, [f"student={run_dir / STUDENT_DIR}"], max_records=settings.audit_max_records,
                       candidates=settings.audit_candidates, block_seeds=(0,), seed=settings.seed)
    write_cards(run_dir, audit_summary(report))
    return report


def report(state: dict, settings: RunSettings, console) -> None:
    """The round table and every client's ledger, as the demo prints them."""
    from rich.table import Table

    from common.privacy.ledger import PrivacyLedger, ledger_paths

    if settings.mode == "pdss":
        from simulations.pdss import pdss_report

        return pdss_report(state, settings, console)

    table = Table(title=f"{settings.name}: {settings.clients} clients × {settings.rounds} rounds, "
                        f"DP-LoRA at ε={settings.dp.epsilon} ({settings.run_dir})")
    for column in ("round", "loss", "ppl", "ε max", "ok", "drop", "rej", "ref", "s"):
        table.add_column(column, justify="right")
    baseline = state.get("baseline") or {}
    table.add_row("0", "", f"{baseline.get('perplexity', float('nan')):.3f}", "0", "", "", "", "", "")
    for r in state["rounds"]:
        loss = r["train"].get("train-loss")
        table.add_row(str(r["round"]), f"{loss:.4f}" if loss is not None else "–",
                      f"{r['evaluate']['perplexity']:.3f}", f"{max(r['epsilon'].values(), default=0):.3f}",
                      str(r["valid"]), str(len(r["dropouts"])), str(len(r["rejected"])), str(len(r["refused"])),
                      f"{r['seconds']:.1f}")
    console.print(table)
    console.print("loss: mean DP-SGD train loss; ppl: held-out perplexity over all sites (by records); ε max: "
                  "largest ε spent by a site; ok/drop/rej/ref: valid replies, dropouts, rejected updates, refusals")
    for ledger_path in ledger_paths(settings.ledger_dir()):
        console.print(PrivacyLedger.load(ledger_path).describe(), markup=False, highlight=False)
