"""Real multi-process deployment: certificates, and the Flower commands each site runs.

A deployment is one SuperLink (the coordinating server; Fleet, Control and Runtime APIs on
ONE HTTPS port) and one SuperNode per data-owning site. The ServerApp and ClientApps are the
same ones the simulation runs (``pyproject.toml`` → ``[tool.flwr.app.components]``); they are
shipped to the SuperLink by ``flwr run`` as a FAB built from the repository.

This module only *builds* things: the TLS material (a private CA and a server certificate,
EC P-384, with the ``cryptography`` package), the argv lists for ``flower-superlink``,
``flower-supernode`` and ``flwr run`` (shared by ``privdistill server|client|run`` and the
deployment test), and a ``$FLWR_HOME/config.toml`` connection entry. Every check raises a
one-line ``ConfigError`` before any process starts.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import math
import os
import re
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from common.atomic import atomic_write_bytes
from common.errors import ConfigError

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.pem", "server.key"
DEFAULT_CONNECTION = "privdistill"
NODE_CONFIG_KEYS = ("client-id", "data-path", "heldout-path", "ledger-path", "epsilon-budget", "model-dir")
REPO_DIR = Path(__file__).resolve().parents[1]  # the Flower app directory (holds pyproject.toml)

_HOSTNAME = re.compile(r"^(?=.{1,253}$)(\*\.)?([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)"
                       r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*$")
_CONNECTION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


# ---------------------------------------------------------------------------- certificates
@dataclass(frozen=True)
class CertPaths:
    """Where the TLS files of a deployment live (all in one directory)."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, directory: str | Path) -> "CertPaths":
        d = Path(directory).expanduser().resolve()
        return cls(d / CA_CERT, d / CA_KEY, d / SERVER_CERT, d / SERVER_KEY)

    def check_server_files(self) -> None:
        """The SuperLink needs ca.crt, server.pem and server.key (ca.key stays offline)."""
        for path in (self.ca_cert, self.server_cert, self.server_key):
            if not path.is_file():
                raise ConfigError(f"TLS file {path} not found; create the certificates with "
                                  f"`privdistill certs --out {path.parent}` (or pass --insecure for a local test)")


def generate_certificates(out_dir: str | Path, hosts: tuple[str, ...] | list[str] = DEFAULT_HOSTS,
                          days: int = 365, overwrite: bool = False) -> CertPaths:
    """A private CA and a server certificate valid for ``hosts`` (DNS names and/or IPs).

    Writes ca.crt, ca.key, server.pem, server.key to ``out_dir``; keys with 0600
    permissions. Refuses to replace existing files unless ``overwrite`` (a new CA invalidates
    the ca.crt every site already has).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    hosts = [h.strip() for h in (hosts or DEFAULT_HOSTS)]
    sans = [_subject_alt_name(h, x509) for h in hosts]
    if not (isinstance(days, int) and days >= 1):
        raise ConfigError(f"certificate validity must be ≥ 1 day, got {days!r}")
    paths = CertPaths.in_dir(out_dir)
    existing = [p for p in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key) if p.exists()]
    if existing and not overwrite:
        raise ConfigError(f"{existing[0]} already exists; a new CA would invalidate the ca.crt every site has. "
                          "Use another --out directory (or --force to replace it)")
    paths.ca_cert.parent.mkdir(parents=True, exist_ok=True)

    now = dt.datetime.now(dt.timezone.utc)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "privdistill"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "privdistill deployment CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA384()))

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "privdistill"),
                             x509.NameAttribute(NameOID.COMMON_NAME, hosts[0][:64])])
    server_cert = (x509.CertificateBuilder().subject_name(server_name).issuer_name(ca_name)
                   .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=True,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False)
                   .sign(ca_key, hashes.SHA384()))

    def key_bytes(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    for path, data, mode in ((paths.ca_key, key_bytes(ca_key), 0o600),
                             (paths.server_key, key_bytes(server_key), 0o600),
                             (paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644),
                             (paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), 0o644)):
        atomic_write_bytes(path, data)  # the temp file is created 0600, so a key is never world-readable
        os.chmod(path, mode)
    return paths


def make_node_keys(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """A SuperNode authentication key pair: ``OUT/NAME`` (private, OpenSSH, 0600) and
    ``OUT/NAME.pub`` (OpenSSH public key, sent to the coordinator for registration).

    ECDSA on NIST P-384, the key type Flower's ``flwr supernode register`` accepts. Refuses
    to overwrite either file (the registered public key would no longer match)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not _CONNECTION_NAME.match(name or ""):
        raise ConfigError(f"--name {name!r} must be letters, digits, '-' or '_' (e.g. the site's id)")
    out = Path(out_dir).expanduser().resolve()
    private, public = out / name, out / f"{name}.pub"
    for path in (private, public):
        if path.exists():
            raise ConfigError(f"{path} already exists; its public key may already be registered. "
                              "Use another --name or --out")
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption())
    public_bytes = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                 serialization.PublicFormat.OpenSSH) + f" {name}\n".encode()
    atomic_write_bytes(private, private_bytes)
    os.chmod(private, 0o600)
    atomic_write_bytes(public, public_bytes)
    os.chmod(public, 0o644)
    return private, public


def _subject_alt_name(host: str, x509):
    if not host:
        raise ConfigError("empty --host name; give a DNS name or an IP address (e.g. --host server.example.org)")
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    if not _HOSTNAME.match(host):
        raise ConfigError(f"--host {host!r} is neither an IP address nor a valid DNS name")
    return x509.DNSName(host.lower())


def certificate_hosts(cert_path: str | Path) -> list[str]:
    """The DNS names and IPs a certificate is valid for (for messages and tests)."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


# ---------------------------------------------------------------------------- addresses and values
def parse_address(address: str, what: str = "--server") -> tuple[str, int]:
    """``HOST:PORT`` / ``[IPv6]:PORT`` → (host, port); a ConfigError when it is not one."""
    text = (address or "").strip()
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)", text) or re.fullmatch(r"([^:\s/\[\]]+):(\d+)", text)
    if not match:
        raise ConfigError(f"{what} {address!r} is not HOST:PORT (e.g. 127.0.0.1:9092, "
                          "server.example.org:9092 or [::1]:9092); no URL scheme")
    host, port = match.group(1), int(match.group(2))
    check_port(port, f"{what} {address!r}: port")
    return host, port


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_port(port: int, what: str = "--port") -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{what} {port!r} is out of range; use a port in 1-65535")
    return port


def format_config(values: dict) -> str:
    """A dict → Flower's ``key=value key2="text"`` string (node config / run config).

    Strings are TOML literal strings ('...': backslashes and spaces survive as-is);
    Flower's parser cannot carry a string holding both quote characters.
    """
    parts = []
    for key, value in values.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", str(key)):
            raise ConfigError(f"config key {key!r} must be letters, digits, '-' or '_'")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int):
            text = str(value)
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ConfigError(f"{key}={value!r}: only finite numbers can go into a Flower config")
            text = repr(value)
        elif isinstance(value, (str, os.PathLike)):
            value = str(value)
            if any(ord(c) < 32 or ord(c) == 127 for c in value):
                raise ConfigError(f"{key}={value!r} holds a control character; Flower's config cannot carry it")
            if "'" not in value:
                text = f"'{value}'"
            elif '"' not in value and "\\" not in value:
                text = f'"{value}"'
            else:
                raise ConfigError(f"{key}={value!r} holds both a quote and an apostrophe (or a backslash); "
                                  "Flower's config cannot carry it: rename the path")
        else:
            raise ConfigError(f"{key}={value!r}: a Flower config holds only bool, int, float or str values")
        parts.append(f"{key}={text}")
    return " ".join(parts)


def parse_config(text: str, what: str = "--run-config") -> dict:
    """Flower's ``k=v k2="s"`` syntax → dict, exactly as ``flwr run`` will read it."""
    import click
    from flwr.common.config import parse_config_args

    text = (text or "").strip()
    if not text:
        return {}
    if text.endswith(".toml"):
        if not Path(text).expanduser().is_file():
            raise ConfigError(f"{what} file {text} not found")
    try:
        values = parse_config_args([text])
    except (click.ClickException, ValueError, OSError, tomllib.TOMLDecodeError) as err:
        message = err.format_message() if isinstance(err, click.ClickException) else str(err)
        raise ConfigError(f"{what} {text!r}: {message.splitlines()[0]}") from None
    if not values:
        raise ConfigError(f"{what} {text!r} has no key=value pair (e.g. 'rounds=3 epsilon=4.0')")
    return values


# ---------------------------------------------------------------------------- command builders
def superlink_command(port: int, certs: CertPaths | None, host: str = "127.0.0.1", insecure: bool = False,
                      database: str | Path | None = None, log_file: str | Path | None = None,
                      auth: bool = False) -> list[str]:
    """``flower-superlink``: ONE port for Fleet + Control + Runtime APIs, no ``uv sync`` of apps.

    ``auth``: only SuperNodes whose public key was registered (``flwr supernode register``) may
    connect (``--enable-supernode-auth``; needs TLS)."""
    check_port(port)
    argv = ["flower-superlink", "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    if insecure:
        argv.append("--insecure")
    else:
        if certs is None:
            raise ConfigError("the SuperLink needs certificates (--certs DIR) unless --insecure is given")
        argv += ["--ssl-ca-certfile", str(certs.ca_cert), "--ssl-certfile", str(certs.server_cert),
                 "--ssl-keyfile", str(certs.server_key)]
    if auth:
        if insecure:
            raise ConfigError("SuperNode authentication (--auth) needs TLS; drop --insecure and pass --certs DIR")
        argv.append("--enable-supernode-auth")
    if database is not None:
        argv += ["--database", str(database)]
    if log_file is not None:
        argv += ["--log-file", str(log_file)]
    return argv


def node_config(client_id: str, data_path: str | Path, heldout_path: str | Path, model_dir: str | Path,
                ledger_path: str | Path, epsilon_budget: float | None = None) -> dict:
    """The ClientApp's node config (client/client_app.py ``site_from_context``); paths absolute."""
    if not str(client_id).strip():
        raise ConfigError("--client-id must not be empty; it names this site in its privacy ledger")
    config = {
        "client-id": str(client_id).strip(),
        "data-path": str(Path(data_path).expanduser().resolve()),
        "heldout-path": str(Path(heldout_path).expanduser().resolve()),
        "ledger-path": str(Path(ledger_path).expanduser().resolve()),
        "model-dir": str(Path(model_dir).expanduser().resolve()),
    }
    if epsilon_budget is not None:
        budget = float(epsilon_budget)
        if not (budget > 0 and math.isfinite(budget)):
            raise ConfigError(f"--budget must be a positive number, got {epsilon_budget}")
        config["epsilon-budget"] = budget
    return config


def check_node_files(config: dict) -> None:
    """The site's files exist before its SuperNode starts (else every round would fail)."""
    for key, what in (("data-path", "--data training file"), ("heldout-path", "--heldout file")):
        if not Path(config[key]).is_file():
            raise ConfigError(f"{what} {config[key]} not found; point it at this site's JSONL/CSV/TXT file")
    model = Path(config["model-dir"])
    if not (model / "config.json").is_file():
        raise ConfigError(f"--model {model} is not a saved model directory (no config.json); copy the shared "
                          "teacher there (e.g. from `privdistill teacher warmup`)")
    ledger = Path(config["ledger-path"])
    if ledger.is_dir():
        raise ConfigError(f"--ledger {ledger} is a directory; give the ledger's JSON file path")
    parent = next((p for p in ledger.parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ConfigError(f"--ledger {ledger}: cannot create it (no writable parent directory)")


def supernode_command(superlink: str, config: dict, ca_cert: str | Path | None = None, insecure: bool = False,
                      port: int | None = None, max_retries: int | None = None,
                      auth_key: str | Path | None = None) -> list[str]:
    """``flower-supernode`` for one site. ``port`` is its local Runtime API port (distinct per
    SuperNode on one host; Flower's default is 9094). ``auth_key``: the site's node private key
    (``make_node_keys``) for a SuperLink started with ``auth``."""
    host, sl_port = parse_address(superlink, "--server")
    argv = ["flower-supernode", "--superlink", format_address(host, sl_port)]
    if insecure:
        argv.append("--insecure")
    else:
        if ca_cert is None:
            raise ConfigError("pass --ca-cert FILE (the deployment's ca.crt) or, for a local test only, --insecure")
        argv += ["--root-certificates", str(Path(ca_cert).expanduser().resolve())]
    if port is not None:
        argv += ["--port", str(check_port(port))]
    if max_retries is not None:
        argv += ["--max-retries", str(int(max_retries))]
    if auth_key is not None:
        if insecure:
            raise ConfigError("SuperNode authentication (--auth-key) needs TLS; pass --ca-cert FILE, not --insecure")
        key = Path(auth_key).expanduser().resolve()
        if not key.is_file():
            raise ConfigError(f"--auth-key {key} not found; create it with `privdistill keys --out DIR --name SITE`")
        argv += ["--auth-supernode-private-key", str(key)]
    argv += ["--node-config", format_config(config)]
    return argv


def supernode_register_command(public_key: str | Path, connection: str, name: str | None = None) -> list[str]:
    """``flwr supernode register PUBLIC_KEY CONNECTION`` (Control API; run by the coordinator)."""
    key = Path(public_key).expanduser().resolve()
    if not key.is_file():
        raise ConfigError(f"--key {key} not found; the site creates it with `privdistill keys` and sends NAME.pub")
    if not key.read_bytes().startswith(b"ecdsa-sha2-nistp"):
        raise ConfigError(f"--key {key} is not an OpenSSH ECDSA public key (NAME.pub from `privdistill keys`); "
                          "never send or register the private key")
    argv = ["flwr", "supernode", "register", str(key), connection]
    if name:
        argv += ["--name", name]
    return argv


def flwr_run_command(connection: str, run_config: str | dict | None = None, app_dir: str | Path = REPO_DIR,
                     stream: bool = True) -> list[str]:
    """``flwr run APP_DIR CONNECTION [--run-config ...] [--stream]``."""
    argv = ["flwr", "run", str(Path(app_dir).resolve()), connection]
    if isinstance(run_config, dict):
        run_config = format_config(run_config)
    if run_config:
        argv += ["--run-config", run_config]
    if stream:
        argv.append("--stream")
    return argv


def check_app_dir(app_dir: str | Path = REPO_DIR) -> Path:
    app_dir = Path(app_dir).expanduser().resolve()
    pyproject = app_dir / "pyproject.toml"
    try:
        document = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        document = {}
    if "app" not in document.get("tool", {}).get("flwr", {}):
        raise ConfigError(f"{app_dir} is not the privdistill Flower app (no [tool.flwr.app] in {pyproject}); "
                          "run from a checkout of the repository")
    return app_dir


def app_run_config(app_dir: str | Path = REPO_DIR) -> dict:
    """The app's default run config (pyproject ``[tool.flwr.app.config]``)."""
    document = tomllib.loads((Path(app_dir) / "pyproject.toml").read_text(encoding="utf-8"))
    return dict(document["tool"]["flwr"]["app"].get("config", {}))


# ---------------------------------------------------------------------------- $FLWR_HOME/config.toml
def flwr_home(explicit: str | Path | None = None) -> Path:
    """``explicit``, else ``$FLWR_HOME``, else ``~/.flwr`` (Flower's own rule)."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    if os.environ.get("FLWR_HOME"):
        return Path(os.environ["FLWR_HOME"]).expanduser().resolve()
    return Path.home() / ".flwr"


def write_connection(home: str | Path, address: str, ca_cert: str | Path | None = None, insecure: bool = False,
                     name: str = DEFAULT_CONNECTION, make_default: bool = False) -> Path:
    """Add/replace ``[superlink.NAME]`` in ``HOME/config.toml`` (other entries are kept)."""
    import tomli_w

    if not _CONNECTION_NAME.match(name):
        raise ConfigError(f"connection name {name!r} must be letters, digits, '-' or '_'")
    host, port = parse_address(address, "--server")
    entry: dict = {"address": format_address(host, port)}
    if insecure:
        entry["insecure"] = True
    else:
        if ca_cert is None:
            raise ConfigError("pass --ca-cert FILE (the deployment's ca.crt) or --insecure")
        entry["root-certificates"] = str(Path(ca_cert).expanduser().resolve())
    home = Path(home)
    path = home / "config.toml"
    if path.is_file():
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path} is not valid TOML ({err}); fix or remove it") from None
    else:
        from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

        document = tomllib.loads(DEFAULT_FLOWER_CONFIG_TOML)
    superlink = document.setdefault("superlink", {})
    if not isinstance(superlink, dict):
        raise ConfigError(f"{path}: [superlink] is not a table; fix or remove the file")
    superlink[name] = entry
    if make_default or "default" not in superlink:
        superlink["default"] = name
    home.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, tomli_w.dumps(document).encode("utf-8"))
    return path


def tool_env(home: str | Path | None = None) -> dict:
    """Environment for the Flower processes: this venv's bin first on PATH (the SuperLink and
    SuperNode start ``flower-superexec`` / ``flwr-*app`` by name), FLWR_HOME when given."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    if home is not None:
        env["FLWR_HOME"] = str(home)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    return env


# ---------------------------------------------------------------------------- submitting a run
_STARTED = re.compile(r"Successfully started run (\d+)")


def run_status(connection: str, run_id: str, env: dict) -> str:
    """``flwr ls CONNECTION --run-id ID``'s status, e.g. ``finished:completed`` ("" if unknown)."""
    try:
        out = subprocess.run(["flwr", "ls", connection, "--run-id", str(run_id), "--format", "json"], env=env,
                             capture_output=True, text=True, timeout=120).stdout
        runs = json.loads(out[out.index("{"):]).get("runs") or []
        return str(runs[0].get("status", "")) if runs else ""
    except (OSError, ValueError, subprocess.SubprocessError, AttributeError):
        return ""


def run_and_report(argv: list[str], env: dict, connection: str, out=None) -> int:
    """Run ``flwr run ... --stream`` with its output passed through, then check how the run
    ended: 0 = ``finished:completed``, 1 = anything else, 130 = interrupted here (the run
    itself goes on at the SuperLink)."""
    out = out or sys.stdout
    run_id = None
    proc = subprocess.Popen(argv, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1)
    try:
        for line in proc.stdout:
            out.write(line)
            out.flush()
            match = run_id is None and _STARTED.search(line)
            if match:
                run_id = match.group(1)
        code = proc.wait()
    except KeyboardInterrupt:
        proc.wait()
        print(f"\ninterrupted: run {run_id or '?'} goes on at the SuperLink; stop it with "
              f"`flwr stop {run_id or '<run-id>'} {connection}`", file=sys.stderr)
        return 130
    finally:
        if proc.stdout:
            proc.stdout.close()
    if run_id is None:
        print(f"error: `flwr run` exited with code {code} before the run started (see its output above)",
              file=sys.stderr)
        return code or 1
    status = ""
    for _ in range(10):  # the status turns finished:* just after the log stream ends
        status = run_status(connection, run_id, env)
        if status.startswith("finished") or not status:
            break
        time.sleep(1.0)
    if status == "finished:completed":
        print(f"run {run_id}: {status}", file=out)
        return 0
    print(f"error: run {run_id} ended as {status or 'unknown (flwr ls failed)'}; see the log above or "
          f"`flwr log {run_id} {connection} --show`", file=sys.stderr)
    return 1
