"""Drive Flower's Simulation Engine for a scenario: prepare node data, `flwr run`, clean up.

Everything a run touches lives in its run directory: node click logs (``data/``), node state
and ledgers, each simulated node's own settings (``nodes/node-<pid>/node-settings.json``),
checkpoints, ``metrics.json``, Flower's own home (``.flwr_home``, so connection
settings never leak into the user's ``~/.flwr``) and ``flower.log``. Every process Flower
starts (the detached SuperLink and SuperExec outlive ``flwr run``) is stopped at the end,
also on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared_model.catalog import cached_feature_builder
from shared_model.clicks import click_through_by_rank
from shared_model.data import DEFAULT_WANDS_DIR, catalog_hash
from shared_model.encoder import default_cache_dir
from shared_model.evaluation import query_folds
from shared_model.partition import partition_device, partition_regional, write_partitions
from shared_model.settings import NodePrivacy, RunSettings, simulated_node_settings_path
from shared_model.world import simulate_click_log
from simulations.compare import final_with_zero_shot, mean_views
from simulations.scenarios import Scenario

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROGRESS = "[fedrank]"


@dataclass(frozen=True)
class SimulationResult:
    """Where the run went and what it measured."""

    run_dir: Path
    metrics: dict[str, Any]
    wall_seconds: float
    returncode: int


def prepare_run(
    scenario: Scenario,
    *,
    run_dir: Path,
    rounds: int,
    epsilon: float,
    eval_fold: int = 0,
    overrides: dict[str, Any] | None = None,
    dropout: float = 0.0,
) -> RunSettings:
    """Write node click logs (held-out queries removed) and each simulated node's settings
    (:func:`write_node_settings`; ``dropout``: each simulated device vanishes mid-round with
    this probability, ``client.device_mods``); return the run's settings."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = dict(scenario.run_config)
    config.update(
        {
            "scenario": scenario.name,
            "num-server-rounds": rounds,
            "epsilon": epsilon,
            "run-dir": str(run_dir.resolve()),
            "data-dir": str((run_dir / "data").resolve()),
            "eval-fold": eval_fold,
            "seed": scenario.world.seed,
            "catalog-dir": str(DEFAULT_WANDS_DIR.resolve()),
            "cache-dir": str(default_cache_dir().resolve()),
        }
    )
    config.update(overrides or {})
    if not config.get("catalog-hash"):  # the run directory records the data's content hash
        config["catalog-hash"] = catalog_hash(Path(config["catalog-dir"]))
    settings = RunSettings.from_config(config)
    write_node_settings(scenario, settings, dropout=dropout)
    builder = cached_feature_builder(settings.catalog_dir, settings.cache_dir)  # warms the cache
    data = builder.data
    test = set(query_folds(data.query_ids, num_folds=settings.num_folds, seed=settings.seed)[
        settings.eval_fold
    ])
    train_queries = [q for q in data.query_ids if q not in test]
    marker = run_dir / "data" / "prepared.json"
    if not marker.exists():
        log = simulate_click_log(data, scenario.world, query_ids=train_queries)
        parts = (
            partition_regional(log) if scenario.partition == "regional" else partition_device(log)
        )
        # Flower numbers simulated nodes 0..N-1: renumber partitions densely in id order.
        dense = {i: parts[k] for i, k in enumerate(sorted(parts))}
        write_partitions(dense, run_dir / "data", prefix="node")
        ctr = click_through_by_rank(log)
        marker.write_text(
            json.dumps(
                {
                    "scenario": scenario.name,
                    "rows": log.num_rows,
                    "nodes": len(dense),
                    "train_queries": len(train_queries),
                    "held_out_queries": sorted(test),
                    "ctr_at_rank": {str(k): v for k, v in ctr.items()},
                },
                indent=2,
            )
        )
    return settings


def write_node_settings(
    scenario: Scenario, settings: RunSettings, *, privacy: NodePrivacy | None = None,
    dropout: float = 0.0,
) -> list[Path]:
    """Write each simulated node's own settings before launch (the runner is their operator).

    A simulated SuperNode's node_config holds only ``partition-id``, so node ``pid`` reads
    ``RUN_DIR/nodes/node-<pid>/node-settings.json`` (``client.node.NodeSettings``): its
    paths (data, state, ledger, catalog, cache, release drop and pinned release key) and
    its pinned privacy. By default the privacy is exactly what this run asks for
    (``NodePrivacy.of_run``); pass ``privacy`` to pin something else (a test of refusals).
    A deployed node never reads this file: its settings are its own node_config.
    """
    from client.node import NodeSettings
    from server.releases import public_key_path

    run_dir = Path(settings.run_dir)
    pinned = privacy if privacy is not None else NodePrivacy.of_run(settings)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    written = []
    for pid in range(scenario.num_nodes):
        name = f"node-{pid}"
        node = NodeSettings(
            name=name,
            data_path=Path(settings.data_dir) / name,
            state_dir=run_dir / "nodes" / name,
            ledger_dir=run_dir / "ledger",
            catalog_dir=settings.catalog_path(),
            cache_dir=settings.cache_path(),
            release_dir=run_dir / "releases",
            release_key=public_key_path(run_dir),
            privacy=pinned,
        )
        path = simulated_node_settings_path(run_dir, pid)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        # `dropout`: a simulation-only fault (client.device_mods), never a deployed node's.
        values = {**node.to_config(), **({"dropout": dropout} if dropout else {})}
        tmp.write_text(json.dumps(values, indent=1))
        os.replace(tmp, path)
        written.append(path)
    return written


def _run_config_arg(settings: RunSettings) -> str:
    parts = []
    for key, value in settings.to_config().items():
        if isinstance(value, bool):
            parts.append(f"{key}={str(value).lower()}")
        elif isinstance(value, int | float):
            parts.append(f"{key}={value!r}")
        else:
            parts.append(f"{key}={json.dumps(str(value))}")
    return " ".join(parts)


def _flower_env(run_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_HOME"] = str((run_dir / ".flwr_home").resolve())
    # The app's deps are this venv's; `uv sync` would pull a CUDA torch.
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    # Ray's socket paths must stay short: a per-run folder under /tmp.
    digest = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:10]
    env["RAY_TMPDIR"] = f"/tmp/fedrank-ray-{digest}"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _flower_processes(flwr_home: Path) -> list[int]:
    """PIDs of Flower/Ray processes started for this run (matched by FLWR_HOME / RAY_TMPDIR)."""
    pids = []
    needle = str(flwr_home)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env = (entry / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if ("flower" in cmd or "flwr" in cmd or "ray" in cmd) and needle in (cmd + env):
            pids.append(int(entry.name))
    return pids


def stop_flower(run_dir: Path, *, grace: float = 5.0) -> list[int]:
    """Stop every process this run's Flower started; returns the PIDs signalled."""
    flwr_home = (run_dir / ".flwr_home").resolve()
    pids = _flower_processes(flwr_home)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    # Processes started while we were signalling (SuperExec spawns children): sweep again.
    pids += [p for p in _flower_processes(flwr_home) if p not in pids]
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat")
    try:
        return state.read_text().split()[2] != "Z"
    except OSError:
        return False


def local_superlink_ports() -> tuple[int, int]:
    """Ports of Flower's local simulation SuperLink (flwr 1.42 defaults 39091/39093; Flower
    reads the same two environment variables, so setting them moves a run elsewhere)."""
    return (
        int(os.environ.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "39091")),
        int(os.environ.get("FLWR_LOCAL_CONTROL_API_PORT", "39093")),
    )


def _port_busy(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_for_local_superlink_ports(timeout: float = 120.0) -> None:
    """Flower's local SuperLink has fixed ports: a SuperLink still running (another run, or
    one shutting down) would silently receive this run. Wait for the ports, then refuse."""
    deadline = time.monotonic() + timeout
    ports = local_superlink_ports()
    while any(_port_busy(p) for p in ports):
        if time.monotonic() > deadline:
            holders = [
                pid for pid in _all_flower_pids() if _alive(pid)
            ]
            raise RuntimeError(
                f"ports {ports} are in use (another Flower simulation is "
                f"running; Flower processes: {holders or 'unknown'}); wait for it or stop it"
            )
        time.sleep(0.5)


def _all_flower_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "flower-superlink" in cmd:
                pids.append(int(entry.name))
    return pids


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_simulation(
    scenario: Scenario,
    settings: RunSettings,
    *,
    echo: Callable[[str], None] = print,
    timeout: float | None = None,
) -> SimulationResult:
    """Run the prepared scenario on Flower's Simulation Engine; stream progress lines."""
    run_dir = Path(settings.run_dir)
    env = _flower_env(run_dir)
    cmd = [
        str(Path(sys.executable).parent / "flwr"),
        "run",
        str(PROJECT_ROOT),
        "local",
        "--stream",
        "--run-config",
        _run_config_arg(settings),
        "--federation-config",
        f"num-supernodes={scenario.num_nodes} client-resources-num-cpus=1",
    ]
    wait_for_local_superlink_ports()
    started = time.perf_counter()
    returncode = -1
    log_path = run_dir / "flower.log"
    # SIGTERM must run the clean-up below, as Ctrl-C does.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    proc: subprocess.Popen[str] | None = None
    try:
        with log_path.open("a") as log_file:
            proc = subprocess.Popen(
                cmd, env=env, cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, bufsize=1,
            )
            assert proc.stdout is not None  # Popen with PIPE always sets it
            for line in proc.stdout:
                log_file.write(line)
                if PROGRESS in line:
                    echo(line[line.index(PROGRESS) :].rstrip())
                if timeout is not None and time.perf_counter() - started > timeout:
                    proc.kill()
                    echo(f"{PROGRESS} timed out after {timeout:.0f}s")
                    break
            returncode = proc.wait()
    except KeyboardInterrupt:
        if proc is not None:
            proc.kill()
        raise
    finally:
        stop_flower(run_dir)
        signal.signal(signal.SIGTERM, previous)
    # The next run must find the fixed ports free, not a SuperLink still shutting down.
    deadline = time.monotonic() + 60
    while any(_port_busy(p) for p in local_superlink_ports()) and time.monotonic() < deadline:
        time.sleep(0.5)
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    wall = time.perf_counter() - started
    if metrics:
        metrics["wall_seconds"] = round(wall, 1)
        metrics_path.write_text(json.dumps(metrics, indent=2))
    return SimulationResult(run_dir, metrics, wall, returncode)


def parse_epsilon(text: str) -> float:
    """``"inf"`` or a positive number."""
    value = float(text)
    if not (value > 0 or math.isinf(value)):
        raise ValueError(f"epsilon must be > 0 or inf, got {text!r}")
    return value


def run_folds(
    scenario: Scenario,
    *,
    run_dir: Path,
    rounds: int,
    epsilon: float,
    folds: list[int] | None,
    overrides: dict[str, Any] | None = None,
    echo: Callable[[str], None] = print,
    dropout: float = 0.0,
) -> dict[str, Any]:
    """One run per held-out fold (``folds=None``: all of them, into ``run_dir/fold-K``).

    A single fold runs straight into ``run_dir``. With several, ``run_dir/summary.json``
    holds each fold's final metrics and their mean (what ``fedrank compare`` reads).
    """
    num_folds = int((overrides or {}).get("num-folds", RunSettings.num_folds))
    chosen = folds if folds is not None else list(range(num_folds))
    rows: list[tuple[str, dict[str, Any]]] = []
    started = time.perf_counter()
    for fold in chosen:
        target = run_dir if folds is not None and len(chosen) == 1 else run_dir / f"fold-{fold}"
        echo(f"{PROGRESS} preparing {scenario.name} fold {fold} in {target} ...")
        settings = prepare_run(
            scenario, run_dir=target, rounds=rounds, epsilon=epsilon, eval_fold=fold,
            overrides=overrides, dropout=dropout,
        )
        result = run_simulation(scenario, settings, echo=echo)
        if dropout and result.metrics:
            result.metrics["dropout"] = dropout
            (target / "metrics.json").write_text(json.dumps(result.metrics, indent=2))
        final = final_with_zero_shot(result.metrics)
        if not final:
            raise RuntimeError(
                f"fold {fold} produced no metrics (flwr exit {result.returncode}); "
                f"see {target / 'flower.log'}"
            )
        rows.append((target.name if len(chosen) > 1 else run_dir.name, final))
    wall = time.perf_counter() - started
    if len(chosen) > 1:
        mean: dict[str, Any] = {
            m: sum(float(f[m]) for _, f in rows) / len(rows) for m in ("ndcg@10", "mrr", "auc")
        }
        mean.update(mean_views([f for _, f in rows]))
        eps_values = [f["epsilon_max"] for _, f in rows]
        mean["epsilon_max"] = "inf" if "inf" in eps_values else max(map(float, eps_values))
        mean["round"] = rounds
        rows.append(("mean over folds", mean))
        summary_json = {
            "scenario": scenario.name,
            "epsilon": "inf" if math.isinf(epsilon) else epsilon,
            "folds": {str(f): final for f, (_, final) in zip(chosen, rows, strict=False)},
            "mean": mean,
            "wall_seconds": round(wall, 1),
        }
        (run_dir / "summary.json").write_text(json.dumps(summary_json, indent=2))
    return {"rows": rows, "wall_seconds": wall}
