"""privacy/ must stay free of flwr (it is shared by nodes, server and the auditor)."""

from __future__ import annotations

import ast
from pathlib import Path

PRIVACY_DIR = Path(__file__).resolve().parents[2] / "privacy"


def test_privacy_package_never_imports_flwr() -> None:
    # Prepare
    sources = sorted(PRIVACY_DIR.glob("*.py"))

    # Execute
    offenders = []
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [
                f"{source.name}:{node.lineno}" for n in names if n.split(".")[0] == "flwr"
            ]

    # Assert
    assert sources
    assert offenders == []
