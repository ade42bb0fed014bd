"""`privdistill simulate`: the whole federation on one machine with Flower's Simulation Engine."""

from __future__ import annotations

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
    if not settings.model_dir:
        settings.model_dir = str(run_dir / "teacher")
    data_dir, model_dir = Path(settings.data_dir), Path(settings.model_dir)
    if settings.generate_data and not (data_dir / "manifest.json").exists():
        from common.data.generate import generate_corpus

        generate_corpus(data_dir, n_clients=settings.clients, seed=settings.seed)
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


def simulate(settings: RunSettings, client_mods: tuple = ()) -> dict:
    """Run the configured federation in the Simulation Engine; returns the final run state."""
    from flwr.simulation import run_simulation

    from client.client_app import build_client_app
    from server.server_app import build_server_app

    run_config = settings.to_run_config()
    backend_config = {
        "client_resources": {"num_cpus": settings.client_cpus, "num_gpus": settings.client_gpus},
        "init_args": {"num_cpus": settings.num_cpus, "object_store_memory": 100 * 1024 ** 2},
    }
    run_simulation(server_app=build_server_app(run_config), client_app=build_client_app(run_config, client_mods),
                   num_supernodes=settings.clients, backend_config=backend_config)
    return RunDirectory(settings.run_dir).load_state()
