"""Peak resident memory (RSS) of the server and of a node while a scenario runs.

Runs ``fedrank simulate SCENARIO --rounds N --epsilon 1 --run-dir DIR`` (the Simulation
Engine, as ``make run`` does) and, every 0.2 s, reads ``VmHWM`` (the kernel's own peak-RSS
mark, so short spikes between polls are not missed) of every process that belongs to the run:
descendants of the command, and Flower's detached SuperLink/SuperExec and Ray's processes
(found by the run's ``FLWR_HOME`` / ``RAY_TMPDIR`` in their environment or command line).
Processes are grouped by role:

- ``serverapp``: the process that runs fedrank's ServerApp (``flwr-simulation``: the ServerApp
  plus the Ray driver; central evaluation, aggregation, accounting, releases);
- ``clientapp``: a Ray worker that runs ClientApps (one node's message at a time; the figure
  is the largest worker: the peak of one node's training, plus the worker's own overhead);
- ``superlink``, ``superexec``, ``ray`` (raylet, GCS, other Ray helpers), ``cli`` (``fedrank
  simulate`` itself, which prepares the data before Flower starts);

and the whole run's peak of the sum over live processes (``total``).

Run (under the Flower lock): ``flock /tmp/fedrank-flower.lock .venv/bin/python
tests/e2e/measure_rss.py regional-5 --rounds 2``. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROLES = (
    ("serverapp", ("flwr-simulation", "flwr-serverapp")),
    ("clientapp", ("ray::ClientAppActor", "ray::", "default_worker.py")),
    ("superlink", ("flower-superlink",)),
    ("superexec", ("flower-superexec",)),
    ("ray", ("raylet", "gcs_server", "ray/", "ray.", "dashboard", "log_monitor")),
    ("cli", ("fedrank.cli", "bin/fedrank")),
    ("flwr", ("bin/flwr",)),
)


def role_of(cmd: str) -> str:
    for role, needles in ROLES:
        if any(n in cmd for n in needles):
            return role
    return "other"


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _vm(pid: int) -> tuple[int, int]:
    """(VmHWM, VmRSS) in KiB; (0, 0) if gone."""
    hwm = rss = 0
    for line in _read(Path(f"/proc/{pid}/status")).decode(errors="replace").splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
        elif line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return hwm, rss


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _read(entry / "stat").decode(errors="replace")
        if not stat:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def run_pids(root: int, needle: str) -> set[int]:
    """``root``'s descendants, plus processes whose command line or environment names the
    run dir (Flower's detached SuperLink/SuperExec, Ray's daemons)."""
    tree = _children()
    found, stack = set(), [root]
    while stack:
        pid = stack.pop()
        if pid in found:
            continue
        found.add(pid)
        stack.extend(tree.get(pid, []))
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in found or int(entry.name) == me:
            continue
        blob = _read(entry / "cmdline") + _read(entry / "environ")
        if needle.encode() in blob:
            found.add(int(entry.name))
    return found


def measure(scenario: str, rounds: int, run_dir: Path, extra: list[str]) -> dict[str, object]:
    cmd = [str(Path(sys.executable).parent / "fedrank"), "simulate", scenario,
           "--rounds", str(rounds), "--epsilon", "1", "--run-dir", str(run_dir), *extra]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak: dict[int, tuple[str, int]] = {}  # pid -> (role, VmHWM KiB)
    total_peak = 0
    needle = str(run_dir.resolve())
    out_lines: list[str] = []
    reader = threading.Thread(
        target=lambda: out_lines.extend(proc.stdout or []), daemon=True  # type: ignore[arg-type]
    )
    reader.start()
    while True:
        live = 0
        for pid in run_pids(proc.pid, needle):
            hwm, rss = _vm(pid)
            if not hwm:
                continue
            cmdline = _read(Path(f"/proc/{pid}/cmdline")).replace(b"\0", b" ").decode(
                errors="replace")
            role = role_of(cmdline)
            if pid not in peak or hwm > peak[pid][1]:
                peak[pid] = (role, hwm)
            live += rss
        total_peak = max(total_peak, live)
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    reader.join(timeout=10)
    by_role: dict[str, dict[str, float]] = {}
    for role, hwm in peak.values():
        row = by_role.setdefault(role, {"processes": 0, "max_mib": 0.0})
        row["processes"] += 1
        row["max_mib"] = max(row["max_mib"], round(hwm / 1024, 1))
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    return {
        "scenario": scenario, "rounds": rounds, "returncode": proc.returncode,
        "rounds_done": len(metrics.get("rounds", [])),
        "wall_s": round(time.monotonic() - started, 1),
        "peak_mib": by_role, "total_peak_mib": round(total_peak / 1024, 1),
        "tail": [ln.rstrip() for ln in out_lines[-3:]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scenario")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--run-dir", type=Path)
    args, extra = parser.parse_known_args()
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix=f"rss-{args.scenario}-")) / "run"
    print(json.dumps(measure(args.scenario, args.rounds, run_dir, extra)), flush=True)


if __name__ == "__main__":
    main()
