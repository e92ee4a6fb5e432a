"""fedrank.progress: bars only on an interactive stdout and never under --json."""

from __future__ import annotations

import io

from fedrank.progress import Bar, progress, round_echo


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_quiet_when_stdout_is_not_a_terminal_or_json(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert not progress(3, "x").enabled
    monkeypatch.setattr("sys.stdout", FakeTTY())
    assert progress(3, "x").enabled
    assert not progress(3, "x", quiet=True).enabled


def test_disabled_bar_prints_lines_unchanged(capsys):
    with progress(2, "x") as bar:  # pytest's stdout is no terminal
        bar.echo("hello")
        bar.echo("to stderr", err=True)
        bar.update(advance=1)
    out = capsys.readouterr()
    assert out.out == "hello\n" and out.err == "to stderr\n"


class Recorder(Bar):
    def __init__(self) -> None:
        super().__init__(None, "", enabled=False)
        self.lines: list[str] = []
        self.completed: list[float] = []

    def echo(self, line: str, *, err: bool = False) -> None:
        self.lines.append(line)

    def update(self, *, completed=None, advance=None, total=None, description=None) -> None:
        self.completed.append(completed)


def test_round_echo_moves_the_bar_over_folds():
    bar = Recorder()
    echo = round_echo(bar, rounds_per_fold=3)
    echo("[fedrank] preparing regional-5 fold 0 in runs/x/fold-0 ...")
    echo("[fedrank] round 1/3: ndcg@10=0.5 eps_max=0.1 1.0s weights=abc")
    echo("[fedrank] round 3/3: ndcg@10=0.5 eps_max=0.1 1.0s weights=abc")
    echo("[fedrank] preparing regional-5 fold 1 in runs/x/fold-1 ...")
    echo("[fedrank] round 2/3: ndcg@10=0.5 eps_max=0.1 1.0s weights=abc")
    assert bar.completed == [1, 3, 5]
    assert len(bar.lines) == 5
