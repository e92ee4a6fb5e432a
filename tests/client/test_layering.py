"""The node side never imports the server side (a node machine need not carry server/)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_client_package_does_not_import_server() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in _imported_modules(path)
                                            if m == "server" or m.startswith("server."))
        for path in sorted((ROOT / "client").rglob("*.py"))
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_process_helpers_are_flower_free_and_shared() -> None:
    import server.deploy as deploy
    import shared_model.processes as processes

    assert not any(m.startswith("flwr") for m in _imported_modules(Path(processes.__file__)))
    # server.deploy keeps exporting the helpers its callers import from it.
    for name in ("kill_tree", "deploy_env", "new_tag", "stop_tagged", "tagged_pids"):
        assert getattr(deploy, name) is getattr(processes, name)
