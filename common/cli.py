"""The `privdistill` command line.

Subcommands live next to the code they drive (``common/data/cli.py``, ...); this module
mounts them and turns a ``UserError`` into one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console
from rich.table import Table

from common.data.cli import data_app
from common.errors import UserError

console = Console()

app = typer.Typer(
    help="privdistill: federated, differentially private distillation of language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data_app, name="data")
teacher_app = typer.Typer(help="Build the shared base (teacher) model.", no_args_is_help=True)
ledger_app = typer.Typer(help="Inspect privacy ledgers.", no_args_is_help=True)
app.add_typer(teacher_app, name="teacher")
app.add_typer(ledger_app, name="ledger")


@teacher_app.command("warmup")
def teacher_warmup(
    public: Path = typer.Option(..., help="Public split (JSONL/CSV/TXT): costs no privacy."),
    out: Path = typer.Option(..., help="Directory to write the model and tokenizer to (save_pretrained)."),
    spec: str = typer.Option("tiny-gpt2", help="Tiny config to build (tiny-gpt2, tiny-llama, small-gpt2, "
                                               "small-llama, bench-gpt2-50m)."),
    steps: int = typer.Option(200, min=1, help="Optimizer steps on the public split."),
    batch_size: int = typer.Option(16, min=1),
    learning_rate: float = typer.Option(2e-3),
    vocab_size: int = typer.Option(2048, min=300, help="Byte-level BPE vocabulary size."),
    max_length: int = typer.Option(128, min=8),
    seed: int = typer.Option(0),
) -> None:
    """Train a byte-level BPE tokenizer and a tiny base model on public text (non-private)."""
    from common.data.loading import load_records
    from common.models.warmup import warmup_teacher

    texts = [r.text for r in load_records(public)]
    info = warmup_teacher(texts, out, spec, steps, batch_size, learning_rate, max_length, vocab_size, seed)
    console.print(f"warmed-up teacher saved to [bold]{out}[/]: {info['parameters']:,} parameters, "
                  f"public eval perplexity {info['public_eval_perplexity']:.2f}")


@app.command("train-local")
def train_local(
    data: Path = typer.Option(..., help="This site's private training file."),
    model: Path = typer.Option(..., help="Base model directory (from `teacher warmup`)."),
    epsilon: float = typer.Option(8.0, help="Target ε for this run."),
    delta: Optional[float] = typer.Option(None, help="δ (default min(1e-5, 1/(10·records)))."),
    steps: int = typer.Option(30, min=1, help="Logical DP-SGD steps."),
    batch_size: int = typer.Option(16, min=1, help="Expected logical batch (Poisson)."),
    max_physical_batch_size: int = typer.Option(16, min=1, help="Memory bound per forward pass."),
    max_grad_norm: float = typer.Option(1.0, help="Per-record clipping norm C."),
    learning_rate: float = typer.Option(5e-3),
    max_length: int = typer.Option(128, min=8),
    accountant: str = typer.Option("pld", help="pld (dp-accounting, tight, default), prv (opacus, tight) or rdp "
                                               "(opacus, a looser bound)."),
    lora_r: int = typer.Option(8, min=1),
    heldout: Optional[Path] = typer.Option(None, help="Held-out file: report perplexity before/after."),
    ledger: Optional[Path] = typer.Option(None, help="Ledger file (default: OUT/ledger.json)."),
    budget: Optional[float] = typer.Option(None, help="Client's total ε budget (default: --epsilon)."),
    client_id: str = typer.Option("local", help="Client id recorded in the ledger."),
    run_id: str = typer.Option("train-local", help="Run id; the ledger charges each run/round once."),
    out: Path = typer.Option(Path("runs/train-local"), help="Output directory (adapter, metrics)."),
) -> None:
    """DP-SGD LoRA fine-tuning on one data file, no federation (the overhead baseline)."""
    from client.dp_lora import DPLoRAConfig, heldout_perplexity, plan_for, train_dp_lora
    from common.privacy.ledger import PrivacyLedger

    cfg = DPLoRAConfig(epsilon=epsilon, delta=delta, local_steps=steps, batch_size=batch_size,
                       max_physical_batch_size=max_physical_batch_size, max_grad_norm=max_grad_norm,
                       learning_rate=learning_rate, max_length=max_length, accountant=accountant, lora_r=lora_r)
    cfg.validate()
    _, plan = plan_for(data, cfg)
    out.mkdir(parents=True, exist_ok=True)
    book = PrivacyLedger.open(ledger or out / "ledger.json", client_id, budget or epsilon, plan.delta, accountant)
    console.print(f"plan: σ={plan.noise_multiplier:.3f}, q={plan.sample_rate:.4f}, {plan.total_steps} steps, "
                  f"C={plan.max_grad_norm}, target ε={epsilon} at δ={plan.delta:.2e} ({accountant})")
    before = heldout_perplexity(model, heldout, cfg)[0] if heldout else None
    started = time.perf_counter()
    result = train_dp_lora(model, data, cfg, book, run_id=run_id, round_id=1, save_to=out / "adapter", progress=True)
    seconds = time.perf_counter() - started
    after = heldout_perplexity(model, heldout, cfg, result.adapter)[0] if heldout else None
    summary = {**result.metrics, "seconds": seconds, "heldout_perplexity_before": before,
               "heldout_perplexity_after": after, "plan": plan.to_dict()}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    table = Table(title="train-local (DP-SGD LoRA)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("examples", "steps", "noise_multiplier", "train_loss", "epsilon_spent", "epsilon_remaining"):
        value = result.metrics[key]
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    if heldout:
        table.add_row("held-out perplexity before", f"{before:.3f}")
        table.add_row("held-out perplexity after", f"{after:.3f}")
    table.add_row("wall time (s)", f"{seconds:.1f}")
    console.print(table)
    console.print(f"adapter saved to {out / 'adapter'}; ledger {book.path}")


@app.command("simulate")
def simulate_command(
    config: Path = typer.Option(Path("simulations/configs/dp-lora.toml"), help="Simulation TOML file."),
    run_dir: Optional[Path] = typer.Option(None, help="Run directory (default runs/<name>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --run-dir after its last completed round."),
    set_: list[str] = typer.Option([], "--set", help="Override a setting, e.g. --set rounds=5 --set epsilon=2."),
) -> None:
    """Run N simulated sites and the server with Flower's Simulation Engine on this machine.

    The config's `mode` picks the pipeline: dp-lora (dp-lora.toml), distildp (distildp.toml)
    or dp-opd (dp-opd.toml: DP-SGD on the student's own continuations against a frozen teacher).
    """
    from common.settings import RunSettings, parse_overrides
    from simulations.run import prepare_run, report, simulate

    settings = RunSettings.from_toml(config, parse_overrides(set_))
    settings = prepare_run(settings, run_dir or Path("runs") / settings.name, resume)
    report(simulate(settings), settings, console)


@app.command("audit")
def audit_command(
    run: Path = typer.Option(..., help="A run directory written by `privdistill simulate`."),
    models: list[str] = typer.Option([], "--models", help="More models: LABEL=RUN_DIR or LABEL=MODEL_DIR."),
    fpr: list[float] = typer.Option([], "--fpr", help="FPRs for TPR@FPR (default 1% and 0.1%, where resolvable)."),
    max_records: int = typer.Option(500, min=10, help="Members and non-members scored (each, at most)."),
    candidates: int = typer.Option(500, min=10, help="Random secrets per canary for exposure."),
    block_sigma: float = typer.Option(0.01, min=0.0, help="σ of the per-block weight perturbation."),
    seed: int = typer.Option(0),
) -> None:
    """Measure what the run's models leak: canary exposure, membership inference, extraction, per-block risk."""
    from common.audit.report import markdown
    from common.audit.run import run_audit

    report = run_audit(run, models, tuple(fpr) or None, max_records, candidates, block_sigma, seed=seed)
    console.print(markdown(report), markup=False, highlight=False)
    console.print(f"written: {run / 'audit.json'}, {run / 'audit.md'}, roc.png, blocks.png, privacy_card.md")


@app.command("distill")
def distill_command(
    run: Path = typer.Option(..., help="A finished `dp-lora` (or interrupted `distildp`) run directory."),
    set_: list[str] = typer.Option([], "--set", help="Override a setting, e.g. --set distill-steps=500 "
                                                     "--set student=from-teacher."),
) -> None:
    """Distil a finished DP teacher run into a compact student: synthetic text, KD, evaluation, export, audit."""
    from common.settings import RunSettings, parse_overrides
    from server.checkpoint import RunDirectory
    from simulations.run import prepare_run, simulate

    state = RunDirectory(run).load_state()
    if state.get("completed_round", 0) < int(state["settings"].get("rounds", 0)):
        raise UserError(f"{run}: the teacher finished {state.get('completed_round', 0)} of "
                        f"{state['settings'].get('rounds')} rounds; finish it first "
                        f"(privdistill simulate --run-dir {run} --resume)")
    overrides = parse_overrides(set_)
    values = {**state["settings"], "mode": "distildp", **overrides}
    if not values.get("label-field") and "prompt-source" not in overrides:
        values["prompt-source"] = "bos"  # the teacher was not trained on control codes
    settings = prepare_run(RunSettings.from_flat(values), run, resume=True)
    simulate(settings)
    console.print(f"student exported to {run / 'student'} (privacy.json, README.md); audit in {run / 'audit.md'}")


@app.command("demo")
def demo(name: str = typer.Option("demo", help="Run name: everything goes under runs/NAME/."),
         epsilon: float = typer.Option(8.0, help="Target ε of the teacher's DP-SGD at each site."),
         runs: Path = typer.Option(Path("runs"), help="Parent directory of run directories."),
         set_: list[str] = typer.Option([], "--set", help="Override a setting of simulations/configs/distildp.toml.")
         ) -> None:
    """The offline demo: the DistilDP pipeline end to end (corpus → DP teacher → synthetic text → student → audit)."""
    from common.settings import parse_overrides
    from simulations.demo import run_distildp_demo

    run_distildp_demo(name, runs, epsilon, parse_overrides(set_))


@app.command("compare")
def compare_command(
    config: Path = typer.Option(Path(__file__).resolve().parent.parent / "simulations" / "configs" / "compare.toml",
                                help="Comparison config: a [compare] table (methods, epsilons, seeds, models) and the "
                                     "run settings every cell shares."),
    out: Optional[Path] = typer.Option(None, help="Comparison directory (default: out-dir of the config). Re-running "
                                                  "it resumes: finished cells are kept, a cut run continues."),
    set_: list[str] = typer.Option([], "--set", help="Override a setting, e.g. --set 'epsilons=[2.0]' "
                                                     "--set 'methods=[\"distildp\"]' --set local-steps=30."),
    report_only: bool = typer.Option(False, "--report-only", help="Run nothing: rewrite compare.md/json/png from "
                                                                  "every finished cell in the directory."),
) -> None:
    """Every distillation method side by side at equal ε: compare.md, compare.json and compare.png."""
    from common.settings import parse_overrides
    from simulations.compare import load_comparison, run_comparison
    from simulations.console import quiet_console

    overrides = parse_overrides(set_)
    if out is not None:
        overrides["out-dir"] = str(out)
    comparison = load_comparison(config, overrides)
    cells = comparison.compare.cells()
    console.print(f"[bold]privdistill compare[/] → {comparison.out}: {len(cells)} cells "
                  f"({', '.join(comparison.compare.methods)} × ε {comparison.compare.epsilons} × seeds "
                  f"{comparison.compare.seeds}); dependencies' output goes to {comparison.out / 'log.txt'}")
    comparison.out.mkdir(parents=True, exist_ok=True)
    with quiet_console(comparison.out / "log.txt") as terminal:
        run_comparison(comparison, Console(file=terminal), report_only=report_only)
    console.print((comparison.out / "compare.md").read_text(encoding="utf-8"), markup=False, highlight=False)
    console.print(f"written: {comparison.out / 'compare.md'}, compare.json, compare.png")


@ledger_app.command("show")
def ledger_show(path: Path = typer.Argument(..., help="A client's (or the server's) ledger JSON file.")) -> None:
    """Print a ledger: budget, entries, and (ε, δ) rebuilt by its accountant (and the others beside it)."""
    from common.privacy.ledger import PrivacyLedger

    console.print(PrivacyLedger.load(path).describe(), markup=False, highlight=False)


@ledger_app.command("verify")
def ledger_verify(path: Path = typer.Argument(..., help="A client's (or the server's) ledger JSON file.")) -> None:
    """Recompute ε from a ledger's entries with every accountant (PLD, PRV, RDP) and print each.

    Exit code 1 when the ε written in the file is below what its own accountant gives from its
    entries (an edited or stale file), the entries are over budget, or the accountants disagree
    beyond their stated error.
    """
    from common.privacy.verify import verify_ledger

    report = verify_ledger(path)
    print(report.describe())  # plain: figures are compared by eye and by scripts, never re-wrapped
    if not report.ok:
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 user error)."""
    try:
        app(args=argv, prog_name="privdistill", standalone_mode=False)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except click.exceptions.ClickException as err:
        print(f"error: {err.format_message()}", file=sys.stderr)
        return err.exit_code
    except SystemExit as err:
        return int(err.code or 0)
    return 0


def entry() -> None:
    sys.exit(main())


# ---------------------------------------------------------------------------- deployment
# Real multi-process deployment (common/deploy.py): one SuperLink, one SuperNode per site.


@app.command("certs")
def certs_command(
    out: Path = typer.Option(..., help="Directory for ca.crt, ca.key, server.pem, server.key."),
    host: list[str] = typer.Option([], "--host", help="DNS name or IP the sites use to reach the server "
                                                      "(repeatable; default localhost, 127.0.0.1, ::1)."),
    days: int = typer.Option(365, min=1, help="Validity of both certificates, in days."),
    force: bool = typer.Option(False, "--force", help="Replace existing files (sites then need the new ca.crt)."),
) -> None:
    """Create a private CA and the SuperLink's TLS certificate (EC P-384)."""
    from common.deploy import DEFAULT_HOSTS, certificate_hosts, generate_certificates

    paths = generate_certificates(out, tuple(host) or DEFAULT_HOSTS, days=days, overwrite=force)
    print(f"certificates in {paths.ca_cert.parent} for {', '.join(certificate_hosts(paths.server_cert))}")
    print(f"  {paths.ca_cert.name:<11} CA certificate (public): copy it to EVERY site (privdistill client --ca-cert)\n"
          f"  {'':<11} and to whoever submits runs (privdistill run --ca-cert)\n"
          f"  {paths.server_cert.name:<11} server certificate: stays on the server\n"
          f"  {paths.server_key.name:<11} server private key (0600): stays on the server, never copied\n"
          f"  {paths.ca_key.name:<11} CA private key (0600): keep it offline; only needed to issue new certificates")
    print(f"next: privdistill server --certs {paths.ca_cert.parent} --port 9092 --host 0.0.0.0")


def _exec_tool(argv: list[str], env: dict) -> None:
    """Replace this process with a Flower tool (foreground; signals go straight to it)."""
    import os
    import shutil

    exe = shutil.which(argv[0], path=env.get("PATH"))
    if exe is None:
        raise UserError(f"{argv[0]} not found on PATH; install privdistill's dependencies (flwr) in this environment")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(exe, argv, env)


@app.command("server")
def server_command(
    port: int = typer.Option(9092, help="The SuperLink's one HTTPS port (Fleet, Control and Runtime APIs)."),
    certs: Optional[Path] = typer.Option(None, help="Directory from `privdistill certs` "
                                                    "(ca.crt, server.pem, server.key)."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain HTTP, no TLS: local tests only."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 for all interfaces)."),
    database: Optional[Path] = typer.Option(None, help="SuperLink state file (default: in memory)."),
    auth: bool = typer.Option(False, "--auth", help="Admit only SuperNodes whose public key was registered "
                                                    "(`privdistill register`); needs TLS."),
) -> None:
    """Start the SuperLink (the federation's server) in the foreground."""
    from common.deploy import CertPaths, check_port, superlink_command, tool_env

    check_port(port)
    paths = None
    if insecure:
        print("WARNING: --insecure: the SuperLink serves plain HTTP; model updates and the control API are "
              "unencrypted. Use it only for a test on one machine.", file=sys.stderr)
    else:
        if certs is None:
            raise UserError("pass --certs DIR (from `privdistill certs`), or --insecure for a local test")
        paths = CertPaths.in_dir(certs)
        paths.check_server_files()
    argv = superlink_command(port, paths, host=host, insecure=insecure,
                             database=database.expanduser().resolve() if database else None, auth=auth)
    console.print(f"starting SuperLink on {host}:{port} ({'INSECURE' if insecure else 'TLS'}): {' '.join(argv)}",
                  markup=False, highlight=False)
    _exec_tool(argv, tool_env())


@app.command("client")
def client_command(
    server: str = typer.Option(..., help="The SuperLink as HOST:PORT."),
    data: Path = typer.Option(..., help="This site's private training file."),
    heldout: Path = typer.Option(..., help="This site's held-out file (evaluation)."),
    model: Path = typer.Option(..., help="The shared base model directory (same on every site)."),
    ledger: Path = typer.Option(..., help="This site's privacy ledger (JSON; created on the first round)."),
    client_id: str = typer.Option(..., help="This site's id (recorded in its ledger)."),
    budget: Optional[float] = typer.Option(None, help="This site's total ε budget (default: the run's epsilon)."),
    ca_cert: Optional[Path] = typer.Option(None, help="The deployment's ca.crt (from the server admin)."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain HTTP to an --insecure server: local tests only."),
    port: Optional[int] = typer.Option(None, help="Local port for the SuperNode's runtime API (default 9094; "
                                                  "distinct per SuperNode on one machine)."),
    auth_key: Optional[Path] = typer.Option(None, help="This site's node private key (`privdistill keys`) for a "
                                                       "server started with --auth."),
) -> None:
    """Start this site's SuperNode in the foreground; the private data never leaves it."""
    from common.deploy import check_node_files, node_config, parse_address, supernode_command, tool_env

    parse_address(server, "--server")
    if insecure == (ca_cert is not None):
        raise UserError("pass exactly one of --ca-cert FILE (TLS) and --insecure")
    if ca_cert is not None and not ca_cert.is_file():
        raise UserError(f"--ca-cert {ca_cert} not found; copy ca.crt from the server admin (`privdistill certs`)")
    config = node_config(client_id, data, heldout, model, ledger, budget)
    check_node_files(config)
    argv = supernode_command(server, config, ca_cert=ca_cert, insecure=insecure, port=port, auth_key=auth_key)
    if insecure:
        print("WARNING: --insecure: this site talks plain HTTP to the server; use it only for a local test.",
              file=sys.stderr)
    console.print(f"starting SuperNode {config['client-id']!r} → {server}: {' '.join(argv)}",
                  markup=False, highlight=False)
    _exec_tool(argv, tool_env())


@app.command("run")
def run_command(
    server: str = typer.Option(..., help="The SuperLink as HOST:PORT."),
    ca_cert: Optional[Path] = typer.Option(None, help="The deployment's ca.crt."),
    insecure: bool = typer.Option(False, "--insecure", help="The server runs with --insecure (local tests only)."),
    run_config: str = typer.Option("", help="Run settings, Flower syntax: 'rounds=5 epsilon=4.0 name=\"x\"'."),
    flwr_home: Optional[Path] = typer.Option(None, help="Flower's config directory (default $FLWR_HOME or ~/.flwr)."),
    connection: str = typer.Option("privdistill", help="Name of the connection entry in FLWR_HOME/config.toml."),
) -> None:
    """Submit the privdistill app to a running SuperLink, stream its log (`flwr run`), report its status.

    Exit code 0 only when the run finished as completed (`flwr run` itself exits 0 even when
    the ServerApp failed); 1 when it failed or was stopped.
    """
    from common.deploy import (REPO_DIR, app_run_config, check_app_dir, flwr_home as resolve_home,
                               flwr_run_command, parse_address, parse_config, run_and_report, tool_env,
                               write_connection)
    from common.settings import RunSettings

    parse_address(server, "--server")
    if insecure == (ca_cert is not None):
        raise UserError("pass exactly one of --ca-cert FILE (TLS) and --insecure")
    if ca_cert is not None and not ca_cert.is_file():
        raise UserError(f"--ca-cert {ca_cert} not found; copy ca.crt from the server admin (`privdistill certs`)")
    app_dir = check_app_dir(REPO_DIR)
    overrides = parse_config(run_config)
    settings = RunSettings.from_flat({**app_run_config(app_dir), **overrides})  # bad keys/values: fail here
    for key, value in (("run-dir", settings.run_dir), ("model-dir", settings.model_dir)):
        if value and not Path(value).is_absolute():
            print(f"warning: {key}={value!r} is relative: the server resolves it against the SuperLink's working "
                  f"directory; pass an absolute path in --run-config", file=sys.stderr)
    home = resolve_home(flwr_home)
    path = write_connection(home, server, ca_cert=ca_cert, insecure=insecure, name=connection)
    console.print(f"connection {connection!r} → {server} written to {path}", markup=False, highlight=False)
    argv = flwr_run_command(connection, run_config, app_dir=app_dir)
    console.print(" ".join(argv), markup=False, highlight=False)
    code = run_and_report(argv, tool_env(home), connection)
    if code:
        raise SystemExit(code)


@app.command("keys")
def keys_command(
    out: Path = typer.Option(..., help="Directory for the key pair."),
    name: str = typer.Option(..., help="This site's name (the files are NAME and NAME.pub)."),
) -> None:
    """Create this site's SuperNode authentication key pair (ECDSA P-384, OpenSSH format)."""
    from common.deploy import make_node_keys

    private, public = make_node_keys(out, name)
    print(f"node keys for {name!r} in {private.parent}\n"
          f"  {public.name:<12} public key: send it to the coordinator (`privdistill register --key {public.name}`)\n"
          f"  {private.name:<12} private key (0600): keep it private on this site, never copy it\n"
          f"next: privdistill client ... --auth-key {private}")


@app.command("register")
def register_command(
    server: str = typer.Option(..., help="The SuperLink as HOST:PORT."),
    ca_cert: Path = typer.Option(..., help="The deployment's ca.crt."),
    key: Path = typer.Option(..., help="A site's public key (SITE.pub from `privdistill keys`)."),
    flwr_home: Optional[Path] = typer.Option(None, help="Flower's config directory (default $FLWR_HOME or ~/.flwr)."),
    connection: str = typer.Option("privdistill", help="Name of the connection entry in FLWR_HOME/config.toml."),
) -> None:
    """Register a site's public key with a SuperLink started with --auth (`flwr supernode register`)."""
    import subprocess

    from common.deploy import (flwr_home as resolve_home, parse_address, supernode_register_command, tool_env,
                               write_connection)

    parse_address(server, "--server")
    if not ca_cert.is_file():
        raise UserError(f"--ca-cert {ca_cert} not found; it is the ca.crt from `privdistill certs`")
    argv = supernode_register_command(key, connection, name=key.name.removesuffix(".pub"))
    home = resolve_home(flwr_home)
    write_connection(home, server, ca_cert=ca_cert, name=connection)
    console.print(" ".join(argv), markup=False, highlight=False)
    code = subprocess.run(argv, env=tool_env(home)).returncode
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    entry()
