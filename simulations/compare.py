"""Compare run directories with each other and with the baselines (same held-out fold).

Besides a row per baseline and run (NDCG@10, MRR, AUC on unseen queries, ``seen`` beside
it), :func:`compare_runs` returns ``privacy_utility``: the runs' final NDCG@10 on **seen**
and **unseen** queries by scenario (population) and ε budget, with zero-shot MiniLM on the
same queries, and plots it (NDCG@10 against ε, one line per scenario and view).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

METRICS = ("ndcg@10", "mrr", "auc")
BASELINES = ("bm25", "minilm_zero_shot", "central_head")


def load_run(run_dir: Path) -> dict[str, Any]:
    """A run's config and metrics; ``FileNotFoundError`` names the missing file.

    A multi-fold run (``summary.json``, one ``fold-K`` run per fold) reads as its mean, with
    the rounds of every fold kept for the plot.
    """
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        folds = sorted(run_dir.glob("fold-*"))
        first = load_run(folds[0])
        return {
            "config": {**first["config"], "eval-fold": "mean"},
            "metrics": {
                "final": summary["mean"],
                "rounds": _mean_rounds([load_run(f)["metrics"]["rounds"] for f in folds]),
                "wall_seconds": summary.get("wall_seconds"),
            },
        }
    metrics_path = run_dir / "metrics.json"
    config_path = run_dir / "config.json"
    for path in (metrics_path, config_path):
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: is {run_dir} a fedrank run directory?")
    metrics = json.loads(metrics_path.read_text())
    if not metrics.get("rounds"):
        raise ValueError(f"{metrics_path} has no rounds yet")
    return {"config": json.loads(config_path.read_text()), "metrics": metrics}


def _mean_rounds(per_fold: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    n = min(len(r) for r in per_fold)
    return [
        {"round": per_fold[0][i]["round"],
         "ndcg@10": sum(r[i]["ndcg@10"] for r in per_fold) / len(per_fold),
         **(
             {"seen": {"ndcg@10": sum(r[i]["seen"]["ndcg@10"] for r in per_fold) / len(per_fold)}}
             if all("seen" in r[i] for r in per_fold) else {}
         )}
        for i in range(n)
    ]


def _seen_view(final: dict[str, Any]) -> dict[str, float] | None:
    """The final row's seen-query metrics (runs from before the two views have none)."""
    seen = final.get("seen")
    return {m: float(seen[m]) for m in METRICS} if isinstance(seen, dict) else None


def _eps(value: Any) -> float:
    return math.inf if value == "inf" else float(value)


def baseline_results(config: dict[str, Any]) -> dict[str, Any]:
    """Run the baselines with the same world and folds as a run (no cached JSON given)."""
    from shared_model.baseline import run_baselines
    from shared_model.catalog import cached_feature_builder
    from shared_model.data import DEFAULT_WANDS_DIR
    from shared_model.world import simulate_click_log
    from simulations.scenarios import get_scenario

    scenario = get_scenario(config["scenario"])
    builder = cached_feature_builder(
        config.get("catalog-dir") or str(DEFAULT_WANDS_DIR), config.get("cache-dir", "")
    )
    clicks = simulate_click_log(builder.data, scenario.world)
    return run_baselines(
        builder, clicks, num_folds=int(config["num-folds"]), seed=int(config["seed"]),
        include_naive=False,
    )


def compare_runs(
    run_dirs: list[Path],
    *,
    baseline_json: Path | None,
    plot_path: Path,
    privacy_plot_path: Path | None = None,
) -> dict[str, Any]:
    """Rows for each baseline and run on the runs' held-out fold, an NDCG@10-per-round plot,
    and the privacy–utility table with its plot.

    Parameters
    ----------
    run_dirs
        Run directories evaluated on one fold (``ValueError`` otherwise).
    baseline_json
        ``fedrank baseline --json`` output, or ``None`` to compute the baselines.
    plot_path
        PNG of NDCG@10 per round.
    privacy_plot_path
        PNG of NDCG@10 against ε (default: ``plot_path`` with ``-privacy`` added to its stem).

    Returns
    -------
    dict
        ``fold``, ``rows``, ``plot``, ``baselines`` (the first run's ``metrics.json``
        baselines, when present) and ``privacy_utility``: ``{"rows": [...], "plot": path}``,
        one row per run: ``name``, ``scenario``, ``epsilon_budget`` (``inf`` as a float),
        ``epsilon`` (spent, max over nodes), ``seen`` / ``unseen`` (NDCG@10; ``None`` for a
        run without that view), ``zero_shot_seen`` / ``zero_shot_unseen`` (NDCG@10 on the
        same queries, from the run's ``metrics.json``; ``None`` when absent), sorted by
        scenario then ε (``inf`` last).
    """
    runs = [(d, load_run(d)) for d in run_dirs]
    folds = {str(r["config"]["eval-fold"]) for _, r in runs}
    if len(folds) != 1:
        raise ValueError(f"runs were evaluated on different folds {sorted(folds)}")
    fold = folds.pop()
    if baseline_json is not None:
        baselines = json.loads(baseline_json.read_text())
    else:
        baselines = baseline_results(runs[0][1]["config"])
    rows: list[dict[str, Any]] = []
    for name in BASELINES:
        b = baselines[name]
        if fold == "mean":
            rows.append({"name": name, **{m: b[m] for m in METRICS}})
        else:
            rows.append({"name": name, **{m: b[f"{m}_per_fold"][int(fold)] for m in METRICS}})
    central = rows[-1]["ndcg@10"]
    zero_shot = rows[1]["ndcg@10"]
    # Seen queries (the fold's training queries): zero-shot and BM25 from the run itself.
    run_baselines = runs[0][1]["metrics"].get("baselines") or {}
    for row in rows:
        key = {"bm25": "bm25", "minilm_zero_shot": "zero_shot"}.get(row["name"])
        if key and "seen" in run_baselines.get(key, {}):
            row["seen"] = run_baselines[key]["seen"]
    zero_shot_seen = run_baselines.get("zero_shot", {}).get("seen", {}).get("ndcg@10")
    for run_dir, run in runs:
        final = run["metrics"]["final"]
        seen = _seen_view(final)
        rows.append(
            {
                "name": run_dir.name,
                **{m: float(final[m]) for m in METRICS},
                **({"seen": seen} if seen else {}),
                **(
                    {"lift_over_zero_shot_seen": seen["ndcg@10"] - float(zero_shot_seen)}
                    if seen and zero_shot_seen is not None
                    else {}
                ),
                "epsilon_budget": _eps(run["config"]["epsilon"]),
                "epsilon": _eps(final["epsilon_max"]),
                "rounds": int(final["round"]),
                "fraction_of_central": float(final["ndcg@10"]) / central,
                "lift_over_zero_shot": float(final["ndcg@10"]) - zero_shot,
                "wall_seconds": run["metrics"].get("wall_seconds"),
            }
        )
    _plot(runs, central=central, zero_shot=zero_shot, path=plot_path)
    if privacy_plot_path is None:
        privacy_plot_path = plot_path.with_name(f"{plot_path.stem}-privacy{plot_path.suffix}")
    table = privacy_utility(runs)
    plot_privacy_utility(table, privacy_plot_path)
    return {
        "fold": fold, "rows": rows, "plot": str(plot_path),
        **({"baselines": run_baselines} if run_baselines else {}),
        "privacy_utility": {"rows": table, "plot": str(privacy_plot_path)},
    }


def _ndcg(view: Any) -> float | None:
    return float(view["ndcg@10"]) if isinstance(view, dict) and "ndcg@10" in view else None


def privacy_utility(runs: list[tuple[Path, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per run: final NDCG@10 on seen and unseen queries beside zero-shot MiniLM on
    the same queries, by scenario and ε budget (keys: :func:`compare_runs`)."""
    out = []
    for run_dir, run in runs:
        final = run["metrics"]["final"]
        zero = (run["metrics"].get("baselines") or {}).get("zero_shot") or {}
        out.append({
            "name": run_dir.name,
            "scenario": str(run["config"].get("scenario", "?")),
            "epsilon_budget": _eps(run["config"]["epsilon"]),
            "epsilon": _eps(final["epsilon_max"]),
            "seen": _ndcg(final.get("seen")),
            "unseen": _ndcg(final.get("unseen")) if "unseen" in final
            else float(final["ndcg@10"]),
            "zero_shot_seen": _ndcg(zero.get("seen")),
            "zero_shot_unseen": _ndcg(zero.get("unseen")),
        })
    out.sort(key=lambda r: (r["scenario"], r["epsilon_budget"]))
    return out


def _eps_label(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def plot_privacy_utility(table: list[dict[str, Any]], path: Path) -> None:
    """NDCG@10 against ε (categorical axis, ``inf`` last): a solid line per scenario on seen
    queries, dashed on unseen; zero-shot MiniLM on the same queries as grey lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = sorted({r["epsilon_budget"] for r in table})
    x = {e: i for i, e in enumerate(eps)}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for scenario in sorted({r["scenario"] for r in table}):
        rows = [r for r in table if r["scenario"] == scenario]
        color = None
        for view, style in (("seen", "-"), ("unseen", "--")):
            pts = [(x[r["epsilon_budget"]], r[view]) for r in rows if r[view] is not None]
            if not pts:
                continue
            line = ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle=style,
                           marker="o", color=color, label=f"{scenario} ({view})")
            color = line[0].get_color()
    for view, style in (("seen", "-"), ("unseen", "--")):
        values = [r[f"zero_shot_{view}"] for r in table if r[f"zero_shot_{view}"] is not None]
        if values:
            ax.axhline(sum(values) / len(values), color="grey", linestyle=style, linewidth=1,
                       label=f"zero-shot MiniLM ({view})")
    ax.set_xticks(range(len(eps)), [_eps_label(e) for e in eps])
    ax.set_xlabel("ε budget per node (inf = no DP)")
    ax.set_ylabel("final NDCG@10")
    ax.set_title("Privacy–utility: seen (solid) and unseen (dashed) queries", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot(
    runs: list[tuple[Path, dict[str, Any]]], *, central: float, zero_shot: float, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run_dir, run in runs:
        rounds = run["metrics"]["rounds"]
        line = ax.plot(
            [r["round"] for r in rounds], [r["ndcg@10"] for r in rounds],
            label=f"{run_dir.name} (unseen)",
        )
        if all("seen" in r for r in rounds):
            ax.plot(
                [r["round"] for r in rounds], [r["seen"]["ndcg@10"] for r in rounds],
                linestyle="--", color=line[0].get_color(), label=f"{run_dir.name} (seen)",
            )
    ax.axhline(central, color="black", linestyle="--", label="central head (no DP)")
    ax.axhline(zero_shot, color="grey", linestyle=":", label="zero-shot MiniLM")
    ax.set_xlabel("round")
    ax.set_ylabel("NDCG@10 (unseen: held-out queries; seen: dashed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def final_with_zero_shot(metrics: dict[str, Any]) -> dict[str, Any]:
    """A run's final row with ``zero_shot: {"seen": ndcg, "unseen": ndcg}`` beside it (the
    same queries; from metrics.json's ``baselines``), for the final table."""
    final = dict(metrics.get("final") or {})
    zero_shot = (metrics.get("baselines") or {}).get("zero_shot") or {}
    views = {v: float(zero_shot[v]["ndcg@10"]) for v in ("seen", "unseen") if v in zero_shot}
    if final and views:
        final["zero_shot"] = views
    return final


def mean_views(finals: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over folds of the seen view and of zero-shot (keys present in every fold)."""
    out: dict[str, Any] = {}
    if finals and all(isinstance(f.get("seen"), dict) for f in finals):
        out["seen"] = {m: sum(float(f["seen"][m]) for f in finals) / len(finals) for m in METRICS}
    if finals and all("zero_shot" in f for f in finals):
        out["zero_shot"] = {
            v: sum(float(f["zero_shot"][v]) for f in finals) / len(finals)
            for v in finals[0]["zero_shot"]
            if all(v in f["zero_shot"] for f in finals)
        }
    return out
