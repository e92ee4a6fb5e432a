"""Deployment Engine, server side: the SuperLink, its node gateway and the run.

Flower-free (Flower's own command-line programs are started as subprocesses):

- :class:`ServerConfig`: the ``fedrank server start --config FILE`` TOML;
- :class:`Deployment`: start ``flower-superlink`` (TLS, SuperNode auth, no runtime dependency
  installation, a state database) and the node gateway, write ``$FLWR_HOME/config.toml``,
  register node keys, submit the ServerApp run with ``flwr run ... --stream``, stop
  everything it started.

By concern: certificates and node keys live in :mod:`server.certs`, process helpers (tagged
environments, stopping process trees) in :mod:`shared_model.processes` (the node side,
``client.deploy``, uses them too). Their names are re-exported here for existing callers.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.certs import (
    CA_CERT,
    CA_KEY,
    LOOPBACK_SAN,
    SERVER_CERT,
    SERVER_KEY,
    CertBundle,
    cert_sans,
    init_certs,
    make_node_key,
)
from shared_model.processes import (
    PROJECT_ROOT,
    TAG_ENV,
    deploy_env,
    descendants,
    flower_bin,
    kill_pids,
    kill_tree,
    new_tag,
    stop_tagged,
    tagged_pids,
    wait_for_port,
)

__all__ = [
    "CA_CERT", "CA_KEY", "CONNECTION", "LOOPBACK_SAN", "PROGRESS", "PROJECT_ROOT", "SERVER_CERT",
    "SERVER_KEY", "TAG_ENV", "CertBundle", "Deployment", "ServerConfig", "cert_sans",
    "deploy_env", "descendants", "flower_bin", "gateway_command", "init_certs", "kill_pids",
    "kill_tree", "make_node_key", "new_tag", "run_config_arg", "serve", "settings_for",
    "stop_tagged", "superlink_command", "tagged_pids", "wait_for_port", "write_connection",
]

PROGRESS = "[fedrank]"
CONNECTION = "fedrank"


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
