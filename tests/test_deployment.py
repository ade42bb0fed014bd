"""Real multi-process deployment on loopback: SuperLink (TLS) + two SuperNodes + `flwr run`.

Everything goes through the same builders the CLI uses (common/deploy.py): certificates from
our private CA, `flower-superlink` on one free port, two `flower-supernode`s (distinct local
runtime ports) whose node configs point at client_0 / client_1 of a tiny generated corpus,
then `flwr run <repo> <connection> --run-config ... --stream` for 2 rounds. The run must
commit round 2, and each site's ledger must hold exactly the round-1 and round-2 charges.
The same with three SuperNodes and SecAgg+ (one round), and with node authentication.

Every process is started in its own process group and stopped in teardown (SIGTERM, then
SIGKILL), together with the detached helpers Flower spawns (found by parent pid).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import deploy
from common.deploy import (CertPaths, flwr_run_command, format_config, generate_certificates, node_config,
                           parse_address, run_status, superlink_command, supernode_command, tool_env,
                           write_connection)

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 2
EPSILON = 8.0
RUN_TIMEOUT = 480  # seconds for `flwr run --stream`; ~1.5-2 min on 2 idle CPUs, ~3 min on a busy box


# ---------------------------------------------------------------------------- process handling
def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all bound at once, then released)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _children() -> dict[int, list[int]]:
    """ppid → child pids, from /proc (empty where there is no /proc)."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _descendants(pids: list[int]) -> set[int]:
    tree, found, todo = _children(), set(), list(pids)
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return True


class Processes:
    """Processes this test started; each leads its own process group."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.started: list[tuple[str, subprocess.Popen]] = []  # not yet stopped
        self.names: list[str] = []  # every log, for failure messages
        self.leftovers: list[int] = []

    def start(self, name: str, argv: list[str], env: dict) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")
        try:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True, preexec_fn=_die_with_parent)
        finally:
            log.close()
        self.started.append((name, proc))
        self.names.append(name)
        return proc

    def log(self, name: str, tail: int = 4000) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"----- {name}.log (tail)\n{self.log(name)}" for name in self.names)

    def stop_all(self, grace: float = 15.0) -> None:
        """SIGTERM every group (newest first) and Flower's detached helpers; SIGKILL what remains."""
        began = time.monotonic()
        procs = [p for _, p in reversed(self.started)]
        self.started = []  # never signal a (possibly recycled) process group twice
        helpers = _descendants([p.pid for p in procs])  # before the parents go: re-parenting hides them
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)
        for pid in helpers:
            _signal_pid(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        while time.monotonic() < deadline and any(_alive(pid) for pid in helpers):
            time.sleep(0.2)
        for proc in procs:
            _signal_group(proc, signal.SIGKILL)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for pid in helpers:
            if _alive(pid):
                _signal_pid(pid, signal.SIGKILL)
        self.leftovers += [pid for pid in helpers if _alive(pid)]
        print(f"teardown: {len(procs)} process groups and {len(helpers)} helpers stopped in "
              f"{time.monotonic() - began:.1f}s", flush=True)


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM if pytest itself is killed (teardown never runs then)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session=True: pgid == pid
    except (ProcessLookupError, PermissionError):
        pass


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


PORT_TAKEN = ("address already in use", "HTTP API failed to start")


def wait_listening(port: int, proc: subprocess.Popen, timeout: float) -> bool:
    """True once 127.0.0.1:port accepts connections; False if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


@pytest.fixture
def processes(tmp_path):
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    procs = Processes(log_dir)
    try:
        yield procs
    finally:
        procs.stop_all()
    assert not procs.leftovers, f"processes still alive after SIGKILL: {procs.leftovers}"


# ---------------------------------------------------------------------------- data
def process_env(tmp_path: Path, name: str) -> dict:
    """Environment for one Flower process: its own FLWR_HOME, quiet, offline, fast polling."""
    home = tmp_path / "flwr" / name
    home.mkdir(parents=True, exist_ok=True)
    return {**tool_env(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_flwr(processes, connection: str, run_config: str, cli_env: dict) -> subprocess.Popen:
    """`flwr run` this repository's app and wait for it (fails the test past RUN_TIMEOUT)."""
    flwr = processes.start("flwr_run", flwr_run_command(connection, run_config, app_dir=REPO), cli_env)
    try:
        flwr.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`flwr run` did not finish within {RUN_TIMEOUT}s\n{processes.logs()}")
    return flwr


def make_sites(corpus: Path, teacher: Path, sites: int = 2) -> None:
    """A tiny corpus (``sites`` clients) and a tiny warmed-up teacher."""
    from common.data.generate import generate_corpus
    from common.data.loading import load_records
    from common.models.warmup import warmup_teacher

    generate_corpus(corpus, n_clients=sites, seed=1, public_records=200, train_per_client=60, heldout_per_client=20)
    # steps=12, not 10: OneCycleLR(pct_start=0.1) divides by zero at exactly 10 total steps
    warmup_teacher([r.text for r in load_records(corpus / "public.jsonl")], teacher, spec="tiny-gpt2", steps=12,
                   progress=False)


# ---------------------------------------------------------------------------- unit checks
def test_certificates_and_commands(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    from common.deploy import certificate_hosts
    from common.errors import ConfigError

    paths = generate_certificates(tmp_path / "certs", ("server.example.org", "10.1.2.3"))
    assert sorted(certificate_hosts(paths.server_cert)) == ["10.1.2.3", "server.example.org"]
    for key in (paths.ca_key, paths.server_key):
        assert key.stat().st_mode & 0o777 == 0o600
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert isinstance(server.public_key().curve, ec.SECP384R1)
    with pytest.raises(ConfigError, match="already exists"):
        generate_certificates(tmp_path / "certs")

    argv = superlink_command(9092, paths)
    assert argv[:5] == ["flower-superlink", "--host", "127.0.0.1", "--port", "9092"]
    assert "--disable-runtime-dependency-installation" in argv and "--insecure" not in argv
    assert argv[argv.index("--ssl-keyfile") + 1] == str(paths.server_key)
    config = node_config("site a", "d/train.jsonl", "d/heldout.jsonl", "teacher", "l/ledger.json", 4.0)
    assert all(Path(config[k]).is_absolute() for k in ("data-path", "heldout-path", "model-dir", "ledger-path"))
    sn = supernode_command("[::1]:9092", config, ca_cert=paths.ca_cert, port=9200)
    assert sn[sn.index("--superlink") + 1] == "[::1]:9092" and sn[sn.index("--port") + 1] == "9200"
    from flwr.common.config import parse_config_args

    assert parse_config_args([sn[-1]]) == config  # Flower reads back exactly what we built
    assert parse_address("server.example.org:9092") == ("server.example.org", 9092)
    for bad in ("localhost", "https://x:1", "x:0", "x:70000", ":9092"):
        with pytest.raises(ConfigError):
            parse_address(bad)
    home = tmp_path / "flwr"
    write_connection(home, "127.0.0.1:9092", ca_cert=paths.ca_cert, name="site")
    import tomllib

    document = tomllib.loads((home / "config.toml").read_text())
    assert document["superlink"]["site"] == {"address": "127.0.0.1:9092", "root-certificates": str(paths.ca_cert)}
    assert document["superlink"]["default"] == "local"  # Flower's defaults are kept


def test_cli_validates_before_starting(tmp_path, capsys):
    from common.cli import main

    certs = generate_certificates(tmp_path / "certs")
    cases = [
        (["server", "--port", "9092", "--certs", str(tmp_path / "none")], "not found"),
        (["server", "--port", "0", "--certs", str(tmp_path / "certs")], "out of range"),
        (["client", "--server", "localhost", "--data", "x", "--heldout", "y", "--model", "m", "--ledger", "l",
          "--client-id", "a", "--ca-cert", str(certs.ca_cert)], "is not HOST:PORT"),
        (["client", "--server", "localhost:9092", "--data", str(tmp_path / "missing.jsonl"), "--heldout", "y",
          "--model", "m", "--ledger", "l", "--client-id", "a", "--ca-cert", str(certs.ca_cert)], "not found"),
        (["client", "--server", "localhost:9092", "--data", "x", "--heldout", "y", "--model", "m", "--ledger", "l",
          "--client-id", "a", "--ca-cert", str(tmp_path / "nope.crt")], "--ca-cert"),
        (["run", "--server", "127.0.0.1:9092", "--ca-cert", str(tmp_path / "nope.crt"),
          "--flwr-home", str(tmp_path / "h")], "not found"),
        (["run", "--server", "127.0.0.1:9092", "--ca-cert", str(certs.ca_cert), "--run-config", "rounds=0",
          "--flwr-home", str(tmp_path / "h")], "rounds"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "h").exists()  # nothing written before validation passed


def test_run_exit_code_follows_the_run_status(monkeypatch, capsys):
    """`flwr run --stream` exits 0 even when the ServerApp failed: `privdistill run` asks `flwr ls`."""
    fake_flwr = [sys.executable, "-c", "print('Successfully started run 42'); print('log line')"]
    for status, code in (("finished:completed", 0), ("finished:failed", 1), ("finished:stopped", 1), ("", 1)):
        monkeypatch.setattr(deploy, "run_status", lambda connection, run_id, env, s=status: s)
        assert deploy.run_and_report(fake_flwr, dict(os.environ), "conn") == code, status
        out, err = capsys.readouterr()
        assert "log line" in out
        assert (f"run 42: {status}" in out) if code == 0 else ("error: run 42 ended as" in err)
    no_run = [sys.executable, "-c", "import sys; print('connection refused'); sys.exit(1)"]
    assert deploy.run_and_report(no_run, dict(os.environ), "conn") == 1
    assert "before the run started" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the real thing
def deploy_over_tls(tmp_path, processes, sites: int, rounds: int, extra: dict) -> tuple[dict, list[Path]]:
    """SuperLink (TLS) + ``sites`` SuperNodes + `flwr run` of this app; returns (run state, site ledgers)."""
    started = time.monotonic()

    def mark(what: str) -> None:
        print(f"{time.monotonic() - started:6.1f}s {what}", flush=True)

    corpus, teacher = tmp_path / "corpus", tmp_path / "teacher"
    certs = generate_certificates(tmp_path / "certs")  # localhost, 127.0.0.1, ::1

    def env(name: str) -> dict:
        return process_env(tmp_path, name)

    ledgers = [tmp_path / f"site_{i}" / "ledger.json" for i in range(sites)]

    def boot(attempt: int):
        """SuperLink + the SuperNodes on fresh free ports; None if a port was taken meanwhile."""
        superlink_port, *node_ports = free_ports(1 + sites)
        address = f"127.0.0.1:{superlink_port}"
        argv = superlink_command(superlink_port, CertPaths.in_dir(certs.ca_cert.parent))
        name = f"superlink{attempt}"
        launched = [(name, superlink_port, processes.start(name, argv, env("superlink")))]
        for i, port in enumerate(node_ports):
            site = corpus / f"client_{i}"
            config = node_config(f"client_{i}", site / "train.jsonl", site / "heldout.jsonl", teacher, ledgers[i],
                                 EPSILON)
            argv = supernode_command(address, config, ca_cert=certs.ca_cert, port=port)
            name = f"supernode_{i}{attempt}"
            launched.append((name, port, processes.start(name, argv, env(f"supernode_{i}"))))
        if attempt == 0:  # the processes boot while the data and the teacher are made (read per message)
            make_sites(corpus, teacher, sites)
            mark("corpus and teacher ready")
        for name, port, proc in launched:
            if not wait_listening(port, proc, 90):
                if any(text in processes.log(name) for text in PORT_TAKEN):
                    return None
                pytest.fail(f"{name} exited with code {proc.returncode} before listening\n{processes.logs()}")
        return address

    for attempt in range(3):
        address = boot(attempt)
        if address:
            break
        processes.stop_all()  # a free port was taken by someone else before we bound it: start over
    else:
        pytest.fail(f"could not bind free loopback ports three times\n{processes.logs()}")
    mark("SuperLink and SuperNodes listening")

    cli_env = env("cli")
    connection = "deploy-test"
    write_connection(cli_env["FLWR_HOME"], address, ca_cert=certs.ca_cert, name=connection)
    run_dir = tmp_path / "run"
    run_config = format_config({"rounds": rounds, "min-clients": 2, "clients": sites, "local-steps": 3,
                                "epsilon": EPSILON, "round-timeout": 120.0, "run-dir": str(run_dir),
                                "model-dir": str(teacher), "data-dir": str(corpus), "name": "deploy-test", **extra})
    flwr = run_flwr(processes, connection, run_config, cli_env)
    mark(f"flwr run exited with {flwr.returncode}")

    assert flwr.returncode == 0, processes.logs()
    started_run = re.search(r"Successfully started run (\d+)", processes.log("flwr_run", tail=1_000_000))
    assert started_run, processes.logs()
    assert run_status(connection, started_run.group(1), cli_env) == "finished:completed", processes.logs()
    state_path = run_dir / "state.json"
    assert state_path.is_file(), f"no run state written\n{processes.logs()}"
    return json.loads(state_path.read_text()), ledgers


def check_site_ledgers(state: dict, ledgers: list[Path], rounds: int) -> None:
    from common.privacy.ledger import PrivacyLedger

    for i, ledger_path in enumerate(ledgers):
        assert ledger_path.is_file(), f"site {i} has no ledger"
        ledger = PrivacyLedger.load(ledger_path)
        assert ledger.client_id == f"client_{i}"
        assert [e["charge_id"] for e in ledger.entries] == [f"deploy-test/round-{r}" for r in range(1, rounds + 1)]
        assert 0 < ledger.spent_epsilon() <= EPSILON + 1e-9
        assert state["rounds"][-1]["epsilon"][f"client_{i}"] == pytest.approx(ledger.spent_epsilon())


def test_two_sites_over_tls(tmp_path, processes):
    state, ledgers = deploy_over_tls(tmp_path, processes, sites=2, rounds=ROUNDS, extra={})
    assert state["completed_round"] == ROUNDS, processes.logs()
    assert [r["round"] for r in state["rounds"]] == [1, 2]
    assert all(r["valid"] == 2 and not r["dropouts"] and not r["rejected"] for r in state["rounds"]), state["rounds"]
    assert (tmp_path / "run" / state["adapter"]).is_file()
    check_site_ledgers(state, ledgers, ROUNDS)


def test_secure_aggregation_over_tls(tmp_path, processes):
    # SecAgg+ between real processes: four train messages per site and round, the SecAgg+ mod's
    # state kept by each SuperNode between them.
    state, ledgers = deploy_over_tls(tmp_path, processes, sites=3, rounds=1, extra={"secure-aggregation": True})
    assert state["completed_round"] == 1, processes.logs()
    assert state["rounds"][0]["valid"] == 3 and not state["rounds"][0]["dropouts"], state["rounds"]
    check_site_ledgers(state, ledgers, 1)


def test_supernode_auth_admits_only_registered_keys(tmp_path, processes):
    """SuperLink with --enable-supernode-auth: a registered site key joins and trains a round,
    an unregistered one is refused (Flower exits with 305 "Failed to activate SuperNode")."""
    started = time.monotonic()

    def mark(what: str) -> None:
        print(f"{time.monotonic() - started:6.1f}s {what}", flush=True)

    corpus, teacher = tmp_path / "corpus", tmp_path / "teacher"
    certs = generate_certificates(tmp_path / "certs")
    keys = tmp_path / "keys"
    key_a, pub_a = deploy.make_node_keys(keys, "site_a")
    key_b, _ = deploy.make_node_keys(keys, "site_b")  # never registered
    assert key_a.stat().st_mode & 0o777 == 0o600

    def env(name: str) -> dict:
        return process_env(tmp_path, name)

    superlink_port, port_a, port_b = free_ports(3)
    address = f"127.0.0.1:{superlink_port}"
    argv = superlink_command(superlink_port, CertPaths.in_dir(certs.ca_cert.parent), auth=True)
    assert "--enable-supernode-auth" in argv
    superlink = processes.start("superlink", argv, env("superlink"))
    make_sites(corpus, teacher)  # while the SuperLink boots
    mark("corpus and teacher ready")
    assert wait_listening(superlink_port, superlink, 90), f"SuperLink exited\n{processes.logs()}"

    cli_env = env("cli")
    connection = "auth-test"
    write_connection(cli_env["FLWR_HOME"], address, ca_cert=certs.ca_cert, name=connection)
    register = subprocess.run(deploy.supernode_register_command(pub_a, connection, name="site_a"), env=cli_env,
                              capture_output=True, text=True, timeout=120)
    assert register.returncode == 0 and "registered" in register.stdout, register.stdout + register.stderr
    mark("site_a registered")

    def start_node(name: str, i: int, port: int, key: Path) -> subprocess.Popen:
        site = corpus / f"client_{i}"
        config = node_config(f"client_{i}", site / "train.jsonl", site / "heldout.jsonl", teacher,
                             tmp_path / f"site_{i}" / "ledger.json", EPSILON)
        argv = supernode_command(address, config, ca_cert=certs.ca_cert, port=port, max_retries=2, auth_key=key)
        assert argv[argv.index("--auth-supernode-private-key") + 1] == str(key)
        return processes.start(name, argv, env(name))

    node_a = start_node("supernode_a", 0, port_a, key_a)
    node_b = start_node("supernode_b", 1, port_b, key_b)
    try:
        code_b = node_b.wait(timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the SuperNode with an unregistered key is still running after 90s\n{processes.logs()}")
    mark(f"unregistered SuperNode exited with {code_b}")
    assert code_b != 0 and (code_b == 305 or "Failed to activate" in processes.log("supernode_b")), processes.logs()
    assert wait_listening(port_a, node_a, 60), f"registered SuperNode exited\n{processes.logs()}"
    assert node_a.poll() is None, processes.logs()

    run_dir = tmp_path / "run"
    run_config = format_config({"rounds": 1, "min-clients": 1, "clients": 1, "local-steps": 3,
                                "epsilon": EPSILON, "round-timeout": 120.0, "run-dir": str(run_dir),
                                "model-dir": str(teacher), "data-dir": str(corpus), "name": "auth-test"})
    flwr = run_flwr(processes, connection, run_config, cli_env)
    mark(f"flwr run exited with {flwr.returncode}")
    assert flwr.returncode == 0, processes.logs()
    state_path = run_dir / "state.json"
    assert state_path.is_file(), f"no run state written\n{processes.logs()}"
    state = json.loads(state_path.read_text())
    assert state["completed_round"] == 1, processes.logs()
    assert state["rounds"][0]["valid"] == 1, state["rounds"]
    assert node_a.poll() is None, processes.logs()
    mark("checks passed")
