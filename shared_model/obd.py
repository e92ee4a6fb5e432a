"""Position bias measured on real clicks: the Open Bandit Dataset (OBD) random campaigns.

Under OBD's uniform-random logging policy the item in a slot does not depend on the slot, so
click-through rate per ``position`` (1..3) estimates the examination curve up to a constant.
``fit_eta`` fits ``ctr ∝ rank ** -eta`` to it, to compare with the click model's ``eta``
(``shared_model.clicks``). See data/obd/NOTE.md. No Flower, no torch here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from shared_model.schema import DataError

DEFAULT_OBD_DIR = Path(__file__).resolve().parents[1] / "data" / "obd" / "random"


def _log_files(directory: Path) -> list[Path]:
    """Every logged-bandit CSV under ``directory`` (``item_context.csv`` files excluded)."""
    return sorted(p for p in directory.rglob("*.csv") if p.name != "item_context.csv")


def obd_ctr_by_position(
    directory: str | Path = DEFAULT_OBD_DIR,
) -> dict[int, tuple[float, int, int]]:
    """CTR per position over every OBD log CSV under ``directory``.

    Returns ``{position: (ctr, clicks, impressions)}`` sorted by position. Raises
    ``DataError`` when no log is found, a column is missing or a value is invalid.
    """
    root = Path(directory)
    files = _log_files(root) if root.is_dir() else []
    if not files:
        raise DataError(root, None, "no OBD log CSV found (expected */<campaign>.csv)")
    clicks: dict[int, int] = {}
    shown: dict[int, int] = {}
    for path in files:
        try:
            table = pacsv.read_csv(
                path,
                convert_options=pacsv.ConvertOptions(
                    include_columns=["position", "click"],
                    column_types={"position": pa.int64(), "click": pa.int64()},
                ),
            )
        except (pa.ArrowInvalid, KeyError) as exc:
            raise DataError(path, None, f"cannot read position/click columns ({exc})") from exc
        for name in ("position", "click"):
            if table.column(name).null_count:
                raise DataError(path, None, f"column {name} has empty values")
        pos = table.column("position").to_numpy()
        clk = table.column("click").to_numpy()
        bad = np.nonzero((pos < 1) | ((clk != 0) & (clk != 1)))[0]
        if len(bad):
            i = int(bad[0])
            raise DataError(
                path, i + 2, f"position {int(pos[i])} / click {int(clk[i])} out of range"
            )
        for p in np.unique(pos):
            sel = pos == p
            shown[int(p)] = shown.get(int(p), 0) + int(sel.sum())
            clicks[int(p)] = clicks.get(int(p), 0) + int(clk[sel].sum())
    return {p: (clicks[p] / shown[p], clicks[p], shown[p]) for p in sorted(shown)}


def fit_eta(ctr_by_rank: Mapping[int, float]) -> float:
    """Least-squares ``eta`` in ``log ctr = c - eta * log rank`` (ranks with ctr 0 dropped).

    Raises ``ValueError`` with fewer than two usable ranks.
    """
    points = [
        (math.log(r), math.log(c))
        for r, c in sorted(ctr_by_rank.items())
        if r >= 1 and c > 0 and math.isfinite(c)
    ]
    if len({x for x, _ in points}) < 2:
        raise ValueError(f"need CTR > 0 at two or more ranks to fit eta, got {dict(ctr_by_rank)}")
    x = np.array([p[0] for p in points])
    y = np.array([p[1] for p in points])
    slope = np.polyfit(x, y, 1)[0]
    return float(-slope)


def fit_eta_interval(
    ctr_by_position: Mapping[int, tuple[float, int, int]],
    *,
    level: float = 0.95,
    draws: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Parametric-bootstrap interval for ``fit_eta`` (clicks ~ Binomial(impressions, ctr)).

    Draws where some rank gets no click are skipped (eta is undefined there).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    ranks = sorted(ctr_by_position)
    shown = np.array([ctr_by_position[r][2] for r in ranks])
    ctr = np.array([ctr_by_position[r][0] for r in ranks])
    rng = np.random.default_rng(seed)
    sims = rng.binomial(shown[None, :], ctr[None, :], size=(draws, len(ranks)))
    etas = [
        fit_eta({r: k / n for r, k, n in zip(ranks, row, shown, strict=True)})
        for row in sims
        if np.all(row > 0)
    ]
    if not etas:
        raise ValueError("no bootstrap draw had clicks at every rank")
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(etas, [tail, 100 - tail])
    return float(lo), float(hi)
