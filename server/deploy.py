"""Deployment Engine, server side: development certificates, the SuperLink, the run.

Flower-free helpers (Flower's own command-line programs are started as subprocesses):

- :func:`init_certs`: a development CA, a TLS server certificate with the SANs operators
  connect to, and per node an ECDSA P-384 key pair in OpenSSH format (what
  ``ssh-keygen -t ecdsa -b 384`` writes) for SuperNode authentication;
- :class:`ServerConfig`: the ``fedrank server start --config FILE`` TOML;
- :class:`Deployment`: start ``flower-superlink`` (TLS, SuperNode auth, no runtime dependency
  installation, a state database), write ``$FLWR_HOME/config.toml``, register node keys,
  submit the ServerApp run with ``flwr run ... --stream``, stop everything it started.

Every process started here gets ``FEDRANK_DEPLOY_TAG`` in its environment; Flower's own
children (SuperExec, ServerApp/ClientApp processes) inherit it, so :func:`stop_tagged`
finds and stops exactly the processes one deployment started, even those Flower detaches
into their own sessions.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROGRESS = "[fedrank]"
TAG_ENV = "FEDRANK_DEPLOY_TAG"
CONNECTION = "fedrank"

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"


# --------------------------------------------------------------------------------------
# Certificates and node keys
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertBundle:
    """Paths written (or kept) by :func:`init_certs`."""

    root: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: dict[str, tuple[Path, Path]]  # name -> (private key, public key)
    sans: tuple[str, ...] = ()  # the SANs of the server certificate on disk
    ca_key: Path | None = None  # where the CA key was written/read (None: not touched)
    kept_server_cert: bool = False  # an existing server certificate was kept
    requested_sans: tuple[str, ...] = ()

    def public_key_line(self, name: str) -> str:
        return self.node_keys[name][1].read_text().strip()

    @property
    def missing_sans(self) -> tuple[str, ...]:
        """Requested SANs the (kept) server certificate does not carry."""
        return tuple(s for s in self.requested_sans if s not in self.sans)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """A new file created ``O_CREAT|O_EXCL`` with ``mode`` (private keys: 0600) in a folder
    created 0700; never overwrites."""
    from shared_model.release import write_private_file

    write_private_file(path, data, mode)


def _check_private(path: Path) -> Path:
    """A private key that is reused must be ours and 0600 (no group/world bits)."""
    from shared_model.release import check_private_file

    return check_private_file(path)


def _san_entries(sans: Iterable[str]) -> list[Any]:
    from cryptography import x509

    out: list[Any] = []
    for san in sans:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            out.append(x509.DNSName(san))
    return out


def cert_sans(cert_path: Path) -> tuple[str, ...]:
    """The SANs (IP addresses and DNS names) of a PEM certificate."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    ips = [str(ip) for ip in ext.get_values_for_type(x509.IPAddress)]
    return tuple(ips + list(ext.get_values_for_type(x509.DNSName)))


LOOPBACK_SAN = "127.0.0.1"


def init_certs(
    root: Path,
    *,
    sans: Iterable[str] = ("127.0.0.1", "localhost"),
    nodes: int = 3,
    node_prefix: str = "node",
    days: int = 365,
    ca_key_path: Path | None = None,
) -> CertBundle:
    """Write a development CA, a server certificate and ``nodes`` node key pairs.

    Existing files are kept (re-running adds missing node keys only), so registered keys
    stay valid; the returned :attr:`CertBundle.sans` are those of the certificate on disk
    (:attr:`CertBundle.missing_sans`: requested but not in a kept certificate). Private keys
    are created ``O_CREAT|O_EXCL`` mode 0600 in 0700 folders; a reused private key that
    group/others can read is refused. ``127.0.0.1`` is always a SAN: the operator's own
    tools reach the SuperLink's Control API on loopback only.

    ``ca_key_path`` (default ``root/ca.key``) is where the CA key is written or read: point
    it at removable media to keep the CA key offline; it is only needed again to issue a
    new server certificate.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from shared_model.release import ensure_private_dir

    root = ensure_private_dir(Path(root))
    requested = list(dict.fromkeys(sans)) or ["127.0.0.1", "localhost"]
    san_list = list(dict.fromkeys([*requested, LOOPBACK_SAN]))
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    nocrypt = serialization.NoEncryption()

    ca_cert_path = root / CA_CERT
    ca_key_path = Path(ca_key_path) if ca_key_path is not None else root / CA_KEY
    server_cert_path, server_key_path = root / SERVER_CERT, root / SERVER_KEY
    need_server = not (server_cert_path.exists() and server_key_path.exists())
    ca_key: Any = None
    if ca_cert_path.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        if need_server:
            if not ca_key_path.exists():
                raise FileNotFoundError(
                    f"{ca_key_path}: the CA key is needed to issue a server certificate "
                    "(pass --ca-key PATH where you keep it offline)"
                )
            ca_key = serialization.load_pem_private_key(
                _check_private(ca_key_path).read_bytes(), None
            )
    else:
        if ca_key_path.exists():
            raise FileExistsError(f"{ca_key_path} exists but {ca_cert_path} does not")
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedrank development CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA384())
        )
        _write(ca_key_path, ca_key.private_bytes(pem, pkcs8, nocrypt), 0o600)
        _write(ca_cert_path, ca_cert.public_bytes(pem))

    if need_server:
        if server_cert_path.exists() or server_key_path.exists():
            raise FileExistsError(
                f"only one of {server_cert_path} / {server_key_path} exists: remove it to "
                "issue a new server certificate"
            )
        key = ec.generate_private_key(ec.SECP384R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, san_list[0])]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(_san_entries(san_list)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA384())
        )
        _write(server_key_path, key.private_bytes(pem, pkcs8, nocrypt), 0o600)
        _write(server_cert_path, cert.public_bytes(pem))
    else:
        _check_private(server_key_path)

    node_keys: dict[str, tuple[Path, Path]] = {}
    for i in range(nodes):
        name = f"{node_prefix}-{i}"
        node_keys[name] = make_node_key(root / name)
    return CertBundle(
        root, ca_cert_path, server_cert_path, server_key_path, node_keys,
        sans=cert_sans(server_cert_path), ca_key=ca_key_path if ca_key_path.exists() else None,
        kept_server_cert=not need_server, requested_sans=tuple(requested),
    )


def make_node_key(private_path: Path) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format: ``PATH`` (0600) and ``PATH.pub``.

    An existing pair is kept (its private half must be 0600 and ours)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private_path = Path(private_path)
    public_path = private_path.with_name(private_path.name + ".pub")
    if private_path.exists() and public_path.exists():
        _check_private(private_path)
        return private_path, public_path
    if private_path.exists() or public_path.exists():
        raise FileExistsError(
            f"only one of {private_path} / {public_path} exists: remove it to make a new pair"
        )
    key = ec.generate_private_key(ec.SECP384R1())
    _write(
        private_path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
        0o600,
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(public_path, public + f" fedrank-{private_path.name}\n".encode())
    return private_path, public_path


# --------------------------------------------------------------------------------------
# Server configuration (TOML)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    """``fedrank server start --config FILE``.

    ``[superlink]`` host, port: the node address (the gateway, Fleet API only); control_port
    (default port + 1): the SuperLink itself (Fleet, Control and Runtime APIs on one HTTPS
    port in flwr 1.42), always on 127.0.0.1 (control_host may only name a loopback address:
    the Control API has no authentication); database; ``[certs]`` dir (CA, server cert/key
    from ``fedrank certs init``); ``[keys]`` dir (the release signing key, outside the run
    directory; default ``RUN_DIR.keys``); ``[nodes]`` public_keys (OpenSSH ``.pub`` files to
    register); ``[run]`` run_dir plus ``run_config`` (kebab-case run settings, see
    ``shared_model.settings``); ``data``: the judged-search directory (``fedrank data
    import``; its path and content hash go into the run config, nodes with another catalog
    refuse); optional ``scenario`` + ``prepare = true`` writes node data
    for a simulated scenario first (development only).
    """

    host: str = "127.0.0.1"
    port: int = 9400
    control_port: int | None = None
    control_host: str = "127.0.0.1"
    key_dir: Path | None = None
    database: Path = Path("superlink-state.db")
    certs_dir: Path = Path("certs")
    public_keys: tuple[Path, ...] = ()
    run_dir: Path = Path("runs/deploy")
    run_config: dict[str, Any] = field(default_factory=dict)
    data: Path | None = None
    scenario: str = ""
    prepare: bool = False
    rounds: int = 3
    epsilon: float = 1.0
    flwr_home: Path | None = None
    task_poll_interval: float = 0.1
    submit: bool = True

    @property
    def address(self) -> str:
        """The node address: the gateway (Fleet API only)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def superlink_port(self) -> int:
        return self.control_port if self.control_port is not None else self.port + 1

    @property
    def control_address(self) -> str:
        """The SuperLink itself (Control, Runtime and Fleet APIs): loopback only."""
        return f"{self.control_host}:{self.superlink_port}"

    def check(self) -> None:
        """Refuse a configuration that would expose the Control API without authentication
        (flwr 1.42 ships no account authentication) or break the loopback Control path."""
        from server.gateway import is_loopback

        if not is_loopback(self.control_host):
            raise ValueError(
                f"[superlink] control_host = {self.control_host!r} would expose Flower's Control "
                "API (register node keys, start runs) without authentication; it must be a "
                "loopback address (nodes use host:port, the Fleet-only gateway)"
            )
        if self.superlink_port == self.port:
            raise ValueError("[superlink] control_port must differ from port")
        for port in (self.port, self.superlink_port):
            if not 0 < port < 65536:
                raise ValueError(f"[superlink] port {port} out of range")
        cert = self.certs_dir / SERVER_CERT
        if cert.exists() and self.control_host not in cert_sans(cert):
            raise ValueError(
                f"{cert} has no SAN {self.control_host}: the operator's tools and the ServerApp "
                "reach the SuperLink on loopback; re-issue it (`fedrank certs init` adds "
                "127.0.0.1)"
            )

    @property
    def home(self) -> Path:
        return self.flwr_home or (self.run_dir / ".flwr_home")

    @classmethod
    def load(cls, path: Path) -> ServerConfig:
        data = tomllib.loads(Path(path).read_text())
        base = Path(path).resolve().parent

        def p(value: Any) -> Path:
            q = Path(str(value)).expanduser()
            return q if q.is_absolute() else (base / q).resolve()

        sl = data.get("superlink", {})
        run = data.get("run", {})
        nodes = data.get("nodes", {})
        unknown = set(data) - {"superlink", "certs", "keys", "nodes", "run"}
        if unknown:
            raise ValueError(f"{path}: unknown table(s) {sorted(unknown)}")
        run_dir = p(run.get("run_dir", "runs/deploy"))
        keys = data.get("keys", {})
        return cls(
            host=str(sl.get("host", "127.0.0.1")),
            port=int(sl.get("port", 9400)),
            control_port=int(sl["control_port"]) if "control_port" in sl else None,
            control_host=str(sl.get("control_host", "127.0.0.1")),
            key_dir=p(keys["dir"]) if "dir" in keys else None,
            database=p(sl.get("database", run_dir / "superlink-state.db")),
            certs_dir=p(data.get("certs", {}).get("dir", "certs")),
            public_keys=tuple(p(k) for k in nodes.get("public_keys", [])),
            run_dir=run_dir,
            run_config=dict(run.get("run_config", {})),
            data=p(run["data"]) if "data" in run else None,
            scenario=str(run.get("scenario", "")),
            prepare=bool(run.get("prepare", False)),
            rounds=int(run.get("rounds", 3)),
            epsilon=float(run.get("epsilon", 1.0)),
            flwr_home=p(sl["flwr_home"]) if "flwr_home" in sl else None,
            task_poll_interval=float(sl.get("task_poll_interval", 0.1)),
            submit=bool(run.get("submit", True)),
        )


# --------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------


def flower_bin(name: str) -> str:
    """A Flower console script next to this interpreter (the venv's)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def deploy_env(*, flwr_home: Path | None, tag: str, poll_interval: float = 0.1) -> dict[str, str]:
    """Environment for every Flower process one deployment starts."""
    env = dict(os.environ)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    env[TAG_ENV] = tag
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(poll_interval)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # Flower's child processes import the app from the project; keep it importable.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    return env


def new_tag() -> str:
    return uuid.uuid4().hex[:16]


def tagged_pids(tag: str) -> list[int]:
    """PIDs of live processes whose environment carries ``FEDRANK_DEPLOY_TAG=tag``."""
    needle = f"{TAG_ENV}={tag}".encode()
    me = os.getpid()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0") and _alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (via /proc parent links)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def kill_pids(pids: Iterable[int], *, sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
    """Signal ``pids``; SIGKILL whatever is still alive after ``grace`` seconds."""
    pids = [p for p in set(pids) if p != os.getpid()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def kill_tree(proc: subprocess.Popen[Any] | int, *, sig: int = signal.SIGTERM,
              grace: float = 5.0) -> None:
    """Stop a process and every descendant (collected before signalling)."""
    pid = proc if isinstance(proc, int) else proc.pid
    kill_pids([pid, *descendants(pid)], sig=sig, grace=grace)
    if not isinstance(proc, int):
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1)


def stop_tagged(tag: str, *, grace: float = 5.0) -> list[int]:
    """Stop every process carrying this deployment's tag; returns the PIDs signalled."""
    pids = tagged_pids(tag)
    kill_pids(pids, grace=grace)
    return pids


def wait_for_port(host: str, port: int, *, timeout: float = 60.0,
                  proc: subprocess.Popen[Any] | None = None) -> None:
    """Block until ``host:port`` accepts TCP connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before {port} opened")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{host}:{port} did not open within {timeout:.0f}s")


def superlink_command(cfg: ServerConfig) -> list[str]:
    certs = cfg.certs_dir
    return [
        flower_bin("flower-superlink"),
        "--ssl-ca-certfile", str(certs / CA_CERT),
        "--ssl-certfile", str(certs / SERVER_CERT),
        "--ssl-keyfile", str(certs / SERVER_KEY),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host", cfg.control_host,
        "--port", str(cfg.superlink_port),
        "--database", str(cfg.database),
    ]


def gateway_command(cfg: ServerConfig) -> list[str]:
    """The node gateway on ``host:port``: TLS, Fleet API only, to the loopback SuperLink."""
    certs = cfg.certs_dir
    return [
        sys.executable, "-m", "server.gateway",
        "--listen", cfg.address,
        "--upstream", cfg.control_address,
        "--certfile", str(certs / SERVER_CERT),
        "--keyfile", str(certs / SERVER_KEY),
        "--ca", str(certs / CA_CERT),
    ]


def write_connection(flwr_home: Path, *, address: str, root_certificates: Path,
                     name: str = CONNECTION) -> Path:
    """``$FLWR_HOME/config.toml`` with one connection (the default)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(
        "[superlink]\n"
        f'default = "{name}"\n\n'
        f"[superlink.{name}]\n"
        f'address = "{address}"\n'
        f'root-certificates = "{Path(root_certificates).resolve()}"\n'
    )
    return path


def run_config_arg(config: Mapping[str, Any]) -> str:
    """``--run-config`` text: TOML values, space separated."""
    parts = []
    for key, value in config.items():
        if isinstance(value, bool):
            parts.append(f"{key}={str(value).lower()}")
        elif isinstance(value, int):
            parts.append(f"{key}={value}")
        elif isinstance(value, float) and math.isfinite(value):
            parts.append(f"{key}={value!r}")
        else:
            parts.append(f"{key}={json.dumps(str(value))}")
    return " ".join(parts)


class Deployment:
    """One SuperLink plus its registered nodes and submitted run."""

    def __init__(self, cfg: ServerConfig, *, tag: str | None = None,
                 echo: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.tag = tag or new_tag()
        self.echo = echo
        self.env = deploy_env(
            flwr_home=cfg.home, tag=self.tag, poll_interval=cfg.task_poll_interval
        )
        if cfg.key_dir is not None:
            from shared_model.release import KEY_DIR_ENV

            self.env[KEY_DIR_ENV] = str(Path(cfg.key_dir).resolve())
        self.superlink: subprocess.Popen[Any] | None = None
        self.gateway: subprocess.Popen[Any] | None = None
        self.run_proc: subprocess.Popen[Any] | None = None
        self.log_dir = cfg.run_dir / "logs"

    # -- SuperLink ----------------------------------------------------------------------
    def start_superlink(self, *, timeout: float = 90.0) -> subprocess.Popen[Any]:
        """The SuperLink on the loopback control address, then the node gateway."""
        self.cfg.check()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.cfg.database.parent.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / "superlink.log").open("ab")
        self.superlink = subprocess.Popen(
            superlink_command(self.cfg), env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=self.cfg.run_dir,
        )
        wait_for_port(self.cfg.control_host, self.cfg.superlink_port, timeout=timeout,
                      proc=self.superlink)
        gw_log = (self.log_dir / "gateway.log").open("ab")
        self.gateway = subprocess.Popen(
            gateway_command(self.cfg), env=self.env, stdout=gw_log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=PROJECT_ROOT,
        )
        wait_for_port(_connect_host(self.cfg.host), self.cfg.port, timeout=timeout,
                      proc=self.gateway)
        write_connection(self.cfg.home, address=self.cfg.control_address,
                         root_certificates=self.cfg.certs_dir / CA_CERT)
        self.echo(f"{PROGRESS} SuperLink up on {self.cfg.control_address} (loopback only: "
                  f"Control API; TLS, node auth) pid {self.superlink.pid}; "
                  f"log {self.log_dir / 'superlink.log'}")
        self.echo(f"{PROGRESS} node gateway on {self.cfg.address} (TLS, Fleet API only) "
                  f"pid {self.gateway.pid}")
        return self.superlink

    # -- flwr CLI -----------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [flower_bin("flwr"), *args], env=self.env, capture_output=True, text=True,
            timeout=timeout, cwd=PROJECT_ROOT,
        )

    def register(self, public_key: Path, *, name: str | None = None) -> str:
        """Register one node key; an already-registered key is fine."""
        args = ["supernode", "register", str(public_key), CONNECTION]
        out = self.flwr(*args, timeout=120)
        text = (out.stdout + out.stderr).strip()
        if out.returncode != 0 and "already" not in text.lower():
            raise RuntimeError(f"flwr supernode register {public_key} failed: {text[-2000:]}")
        self.echo(f"{PROGRESS} registered {name or public_key.name}: {_last_line(text)}")
        return text

    def register_all(self) -> None:
        for key in self.cfg.public_keys:
            self.register(key)

    def submit(self, run_config: Mapping[str, Any], *, app: Path = PROJECT_ROOT
               ) -> subprocess.Popen[str]:
        """``flwr run APP CONNECTION --stream --run-config ...`` (a child process)."""
        cmd = [flower_bin("flwr"), "run", str(app), CONNECTION, "--stream"]
        if run_config:
            cmd += ["--run-config", run_config_arg(run_config)]
        self.run_proc = subprocess.Popen(
            cmd, env=self.env, cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
        )
        return self.run_proc

    def follow(self, proc: subprocess.Popen[str], *, log_path: Path,
               timeout: float | None = None) -> int:
        """Copy the run's stream to ``log_path``; echo ``[fedrank]`` progress lines."""
        started = time.monotonic()
        assert proc.stdout is not None
        with log_path.open("a") as fh:
            for line in proc.stdout:
                fh.write(line)
                fh.flush()
                if PROGRESS in line:
                    self.echo(line[line.index(PROGRESS):].rstrip())
                elif "rejected reply" in line or "sent no update" in line:
                    self.echo(line.rstrip())
                if timeout is not None and time.monotonic() - started > timeout:
                    self.echo(f"{PROGRESS} run timed out after {timeout:.0f}s")
                    kill_tree(proc)
                    break
        return proc.wait()

    def stop(self, *, grace: float = 10.0) -> list[int]:
        """SIGTERM the SuperLink (it stops its SuperExec), then anything left over."""
        if self.run_proc is not None and self.run_proc.poll() is None:
            kill_tree(self.run_proc, grace=grace)
        if self.gateway is not None and self.gateway.poll() is None:
            kill_tree(self.gateway, grace=grace)
        if self.superlink is not None and self.superlink.poll() is None:
            kill_tree(self.superlink, grace=grace)
        return stop_tagged(self.tag, grace=grace)


def settings_for(cfg: ServerConfig) -> dict[str, Any]:
    """The run config to submit: the scenario's (optionally prepared) plus overrides."""
    from shared_model.data import catalog_hash, catalog_run_config
    from shared_model.settings import RunSettings

    overrides = dict(cfg.run_config)
    overrides.update(catalog_run_config(cfg.data))  # [run] data = DIR: path and content hash
    overrides.setdefault("catalog-hash", str(catalog_hash(
        RunSettings.from_config({"catalog-dir": overrides.get("catalog-dir", "")}).catalog_path()
    )))
    overrides.setdefault("run-dir", str(cfg.run_dir.resolve()))
    if cfg.scenario:
        from simulations.runner import prepare_run
        from simulations.scenarios import get_scenario

        scenario = get_scenario(cfg.scenario)
        if cfg.prepare:
            settings = prepare_run(
                scenario, run_dir=cfg.run_dir, rounds=cfg.rounds, epsilon=cfg.epsilon,
                overrides=overrides,
            )
            return settings.to_config()
        merged = dict(scenario.run_config)
        merged.update({"scenario": scenario.name, "num-server-rounds": cfg.rounds,
                       "epsilon": cfg.epsilon})
        merged.update(overrides)
        overrides = merged
    return RunSettings.from_config(overrides).to_config()


def serve(cfg: ServerConfig, *, echo: Callable[[str], None] = print,
          timeout: float | None = None) -> int:
    """``fedrank server start``: SuperLink up, keys registered, run submitted and followed.

    Stops the SuperLink (and everything it started) on SIGTERM/SIGINT or when the run ends.
    """
    echo(f"nodes connect to {cfg.address}")
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    deployment = Deployment(cfg, echo=echo)

    def _terminate(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(signum)

    previous = signal.signal(signal.SIGTERM, _terminate)
    rc = 1
    try:
        run_config = settings_for(cfg) if cfg.submit else {}
        deployment.start_superlink()
        from client.app_guard import app_hash

        echo(f"{PROGRESS} app hash {app_hash(PROJECT_ROOT)} (nodes pin it: fedrank node "
             "start --app-hash)")
        deployment.register_all()
        if not cfg.submit:
            echo(f"{PROGRESS} SuperLink ready; no run submitted (submit = false)")
            while deployment.superlink is not None and deployment.superlink.poll() is None:
                time.sleep(1)
            return deployment.superlink.returncode if deployment.superlink else 1
        echo(f"{PROGRESS} submitting run: {run_config.get('num-server-rounds')} rounds, "
             f"run dir {run_config.get('run-dir')}")
        proc = deployment.submit(run_config)
        rc = deployment.follow(proc, log_path=deployment.log_dir / "run.log", timeout=timeout)
        echo(f"{PROGRESS} flwr run exited with {rc}")
        return rc
    except KeyboardInterrupt:
        echo(f"{PROGRESS} stopping SuperLink (signal)")
        return 143
    finally:
        deployment.stop()
        signal.signal(signal.SIGTERM, previous)
        echo(f"{PROGRESS} SuperLink stopped")


def _connect_host(host: str) -> str:
    """Where to probe a listener bound to ``host`` (a wildcard bind is probed on loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host.strip("[]"))


def _last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""
