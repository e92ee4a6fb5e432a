"""Progress bars for long commands (rich, which typer already depends on).

A bar shows only on an interactive terminal: it is quiet when stdout is not a terminal
(pipes, CI, log files) and when the command prints JSON (``quiet=True``). While a bar is
shown, lines go through :meth:`Bar.echo` so they print above it instead of through it.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any

__all__ = ["Bar", "progress", "round_echo"]


class Bar:
    """A progress bar with an ETA, or nothing at all when disabled."""

    def __init__(self, total: float | None, description: str, *, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                transient=True,
            )  # fmt: skip
            self._task = self._progress.add_task(description, total=total)

    def __enter__(self) -> Bar:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(
        self, *, completed: float | None = None, advance: float | None = None,
        total: float | None = None, description: str | None = None,
    ) -> None:
        """Move the bar (no-op when disabled)."""
        if self._progress is None:
            return
        kwargs: dict[str, Any] = {}
        if completed is not None:
            kwargs["completed"] = completed
        if advance is not None:
            kwargs["advance"] = advance
        if total is not None:
            kwargs["total"] = total
        if description is not None:
            kwargs["description"] = description
        self._progress.update(self._task, **kwargs)

    def echo(self, line: str, *, err: bool = False) -> None:
        """Print a line (above the bar while it is shown)."""
        if self._progress is not None:
            self._progress.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=sys.stderr if err else sys.stdout, flush=True)


def progress(total: float | None, description: str, *, quiet: bool = False) -> Bar:
    """A bar over ``total`` steps, shown only on an interactive stdout and unless ``quiet``."""
    enabled = not quiet and sys.stdout.isatty()
    return Bar(total, description, enabled=enabled)


_ROUND = re.compile(r"\[fedrank\] round (\d+)/(\d+)")
_FOLD = re.compile(r"\[fedrank\] preparing .* fold (\d+) in ")


def round_echo(bar: Bar, rounds_per_fold: int) -> Callable[[str], None]:
    """An ``echo`` for the simulation runner that also moves ``bar`` on its
    ``[fedrank] round N/M`` lines (folds one after another)."""
    folds_seen: list[str] = []

    def echo(line: str) -> None:
        fold = _FOLD.search(line)
        if fold:
            folds_seen.append(fold.group(1))
        bar.echo(line)
        match = _ROUND.search(line)
        if match:
            done = max(len(folds_seen) - 1, 0) * rounds_per_fold + int(match.group(1))
            bar.update(completed=done)

    return echo
