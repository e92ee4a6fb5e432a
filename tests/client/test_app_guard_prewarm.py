"""The app guard's pre-warmed ClientApp runner: one warm process takes the next task's token."""

from __future__ import annotations

import io
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest

from client import app_guard

HASH = "a" * 64


class _Proc:
    def __init__(self, cmd: list[str], **kw: Any) -> None:
        self.cmd = cmd
        self.stdin = io.BytesIO() if kw.get("stdin") == subprocess.PIPE else None
        self.written = b""

    def poll(self) -> None:
        return None

    def wait(self) -> int:
        return 0


def _plugin(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[_Proc], Any]:
    from flwr.supercore.constant import TaskType

    started: list[_Proc] = []

    def popen(cmd: list[str], **kw: Any) -> _Proc:
        proc = _Proc(cmd, **kw)
        if proc.stdin is not None:  # keep what was written after close()
            stdin = proc.stdin
            stdin.close = lambda: setattr(proc, "written", stdin.getvalue())  # type: ignore[method-assign]
        started.append(proc)
        return proc

    monkeypatch.setattr(app_guard.subprocess, "Popen", popen)
    cls = app_guard.pinned_plugin(frozenset({HASH}))
    plugin = cls.__new__(cls)
    plugin.runtime_api_address, plugin.insecure = "127.0.0.1:9999", True
    plugin.root_certificates_path = None
    plugin.warm = None
    return plugin, started, TaskType


def test_first_task_runs_cold_then_each_task_takes_the_warm_runner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(app_guard.PREWARM_ENV, raising=False)
    plugin, started, task_type = _plugin(monkeypatch)
    task = SimpleNamespace(type=task_type.CLIENT_APP)
    plugin.launch_task("tok-1", task)
    _settle(started, 2)
    assert [p.cmd[3] for p in started] == ["clientapp", "warm"]
    assert "--token" in started[0].cmd and "tok-1" in started[0].cmd
    assert "--token" not in started[1].cmd  # a warm runner holds no token
    plugin.launch_task("tok-2", task)
    _settle(started, 3)
    assert started[1].written == b"tok-2\n"  # the warm runner became task 2's ClientApp
    assert [p.cmd[3] for p in started] == ["clientapp", "warm", "warm"]
    assert all("--trusted-app-hash" in p.cmd and HASH in p.cmd for p in started)


def _settle(started: list[_Proc], count: int) -> None:
    """The next warm runner is started by a thread once the task's process has exited."""
    import time

    deadline = time.monotonic() + 5
    while len(started) < count and time.monotonic() < deadline:
        time.sleep(0.01)


def test_prewarm_off_starts_a_cold_process_per_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(app_guard.PREWARM_ENV, "0")
    plugin, started, task_type = _plugin(monkeypatch)
    plugin.launch_task("tok-1", SimpleNamespace(type=task_type.CLIENT_APP))
    plugin.launch_task("tok-2", SimpleNamespace(type=task_type.CLIENT_APP))
    assert [p.cmd[3] for p in started] == ["clientapp", "clientapp"]


def test_warm_runner_without_a_token_exits_quietly() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['torch']=None; "
         "import client.app_guard as g; g.WARM_MODULES=(); "
         f"g.main(['warm', '--trusted-app-hash', '{HASH}', '--'])"],
        input="", capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
