"""Independent verification of a run's privacy ledgers (``fedrank audit verify RUN_DIR``).

:func:`verify_run` re-walks every ``RUN_DIR/ledger/*.jsonl`` hash chain
(:func:`privacy.ledger.verify_chain`), then recomputes every claimed ``epsilon_after`` from the
parameters on the ledger lines with an accountant *other* than the one that produced it:

``dp-sgd`` events (nodes, user-level, written from Opacus' RDP accountant)
    Per node, the node's events up to and including each event are composed as
    ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`` self-composed ``steps`` times, and the
    epsilon is computed by Google's ``dp_accounting`` RDP accountant (add-or-remove-one), the
    same construction as :func:`privacy.accounting.epsilon_dp_accounting` with
    ``method="rdp"`` (done incrementally, one accountant per node, so a long run costs O(events)
    rather than O(events^2)). ``dp_accounting``'s RDP code is independent of Opacus'; its
    default orders are a superset of Opacus' orders, so for an honest ledger the recomputation
    agrees with the claim to well under 1 %. The tighter PLD epsilon of each node's whole
    history is reported too (a reference; RDP claims are always above it).

``client-level-gaussian`` events with accountant ``"rdp-wor"`` (server, device shape)
    Flower's ``RdpAccountant`` with sampling without replacement and the replace-one
    neighbouring relation. We rebuild, from the ledger line alone, exactly the event Flower
    composes each round: ``SampledWithoutReplacementDpEvent(population, sample_size,
    GaussianDpEvent(z))``, with ``sample_size`` and ``population`` from the line's ``detail``
    (``"sampled=K population=N"``, checked against ``sample_rate``) or, failing that, recovered
    from ``sample_rate`` as a fraction (``dp_accounting``'s analysis uses only their ratio),
    under an ``RdpAccountant(neighboring_relation=REPLACE_ONE)`` with its default orders (as
    Flower builds it), one per node, composed round by round. This is independent of the
    server's accountant *state* and of Flower's wrapper, but not of ``dp_accounting``'s WOR
    math (the only implementation of that analysis available here; Opacus has none). We match
    the exact construction rather than use Poisson RDP at ``q`` because the two bound
    different neighbouring relations (replace-one vs add/remove-one) and are not ordered, so
    Poisson RDP would neither confirm nor refute the claim. Client-level events with any other
    accountant are recomputed as Poisson add/remove-one RDP at ``q = sample_rate``.

A claimed epsilon lower than the recomputation by more than :data:`TOLERANCE` (relative) is a
failure: the ledger over-claims privacy. A claim above the recomputation is fine (conservative).
``refusal`` lines are checked for their chain only. Also flagged: a node's epsilon decreasing
along its ledger, a ``dp-sgd``/client-level event with ``steps <= 0``, ``delta`` changing within a
ledger or differing from ``config.json``'s ``delta``, unreadable lines and a private run without
ledgers.

What cannot be seen from the files alone: a ledger whose *tail* was cut off (keep each
ledger's head hash elsewhere; see :mod:`privacy.ledger`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from privacy.accounting import epsilon_dp_accounting, validate_event
from privacy.ledger import MECHANISMS, ChainProblem, encode_nonfinite, verify_chain

__all__ = [
    "TOLERANCE",
    "EventRow",
    "config_budget",
    "VerifyReport",
    "iter_ledger_lines",
    "ledger_files",
    "load_json",
    "to_jsonable",
    "verify_run",
]

TOLERANCE = 0.01
"""A claimed epsilon may be at most this fraction below the recomputed one."""

_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
_FLOAT_FIELDS = ("noise_multiplier", "sample_rate", "clip_norm", "delta", "epsilon_after")
_WOR_ACCOUNTANT = "rdp-wor"
_PLD_INTERVAL = 1e-3
_MAX_POPULATION = 10**9

METHOD_POISSON_RDP = "dp_accounting RDP, Poisson sampling, add/remove-one"
METHOD_WOR_RDP = "dp_accounting RDP, sampling without replacement, replace-one"
METHOD_PLD = "dp_accounting PLD, Poisson sampling, add/remove-one (reference)"


# --------------------------------------------------------------------------------------------
# report types
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EventRow:
    """One ledger line, with its recomputed epsilon.

    ``recomputed_epsilon`` is ``None`` for refusals and for lines that could not be recomputed.
    ``status`` is ``"ok"``, ``"over-claim"``, ``"chain-only"`` (refusal) or ``"error"``.
    """

    file: str
    line: int
    node: str
    round: int
    mechanism: str
    unit_of_privacy: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    delta: float
    accountant: str
    claimed_epsilon: float
    recomputed_epsilon: float | None
    method: str | None
    status: str
    detail: str | None = None


@dataclass(frozen=True)
class VerifyReport:
    """Result of :func:`verify_run`.

    Attributes
    ----------
    run_dir : str
        The run directory.
    files : tuple of str
        The ledger files checked.
    problems : tuple of ChainProblem
        Everything wrong, as ``file:line: problem`` (line 0: the file or run as a whole).
    rows : tuple of EventRow
        One row per readable ledger line, in file then line order.
    reference_epsilon : dict
        Per node, the PLD epsilon of the node's whole ``dp-sgd`` history (tighter than RDP).
    """

    run_dir: str
    files: tuple[str, ...]
    problems: tuple[ChainProblem, ...]
    rows: tuple[EventRow, ...]
    reference_epsilon: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether nothing is wrong."""
        return not self.problems

    def summary(self) -> str:
        """One line: PASS/FAIL, counts."""
        checked = sum(1 for r in self.rows if r.recomputed_epsilon is not None)
        refusals = sum(1 for r in self.rows if r.mechanism == "refusal")
        verdict = "PASS" if self.ok else "FAIL"
        return (
            f"{verdict}: {len(self.files)} ledger file(s), {len(self.rows)} line(s), "
            f"{checked} epsilon value(s) recomputed, {refusals} refusal(s), "
            f"{len(self.problems)} problem(s)"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (non-finite floats as ``"inf"``/``"-inf"``/``"nan"``)."""
        return to_jsonable(
            {
                "run_dir": self.run_dir,
                "ok": self.ok,
                "summary": self.summary(),
                "tolerance": TOLERANCE,
                "files": list(self.files),
                "problems": [
                    {"file": p.file, "line": p.line, "problem": p.problem, "text": str(p)}
                    for p in self.problems
                ],
                "rows": [asdict(r) for r in self.rows],
                "reference_epsilon": dict(self.reference_epsilon),
            }
        )


# --------------------------------------------------------------------------------------------
# helpers shared with the audit report
# --------------------------------------------------------------------------------------------
# Strict-JSON form of ε values (non-finite floats as strings), shared with the ledger.
to_jsonable = encode_nonfinite


def load_json(path: Path) -> Any:
    """Read a JSON file (``None`` when missing); ``Infinity``/``NaN`` literals are accepted."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def config_budget(config: Any) -> float | None:
    """``config["epsilon"]`` as a float (``"inf"`` strings accepted); ``None`` if absent."""
    if not isinstance(config, dict):
        return None
    value = config.get("epsilon")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def ledger_files(run_dir: Path) -> list[Path]:
    """``RUN_DIR/ledger/*.jsonl``, sorted by name."""
    return sorted((Path(run_dir) / "ledger").glob("*.jsonl"))


def iter_ledger_lines(path: Path) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """``(line_number, record)`` for each line; ``record`` is ``None`` if unparseable.

    Float fields written as ``"inf"``/``"-inf"``/``"nan"`` are decoded.
    """
    raw = Path(path).read_bytes()
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            yield number, None
            continue
        if not isinstance(record, dict):
            yield number, None
            continue
        for key in _FLOAT_FIELDS:
            value = record.get(key)
            if isinstance(value, str) and value in _NONFINITE:
                record[key] = _NONFINITE[value]
        yield number, record


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """dp_accounting warns (via absl) for every order it drops; keep the CLI output readable."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# --------------------------------------------------------------------------------------------
# recomputation
# --------------------------------------------------------------------------------------------
class _NodeAccountant:
    """Incremental ``dp_accounting`` RDP accounting for one node and one kind of event.

    ``dp_accounting``'s ``RdpAccountant.compose(event, count)`` adds ``count`` times the
    event's RDP curve to its total. Here the curve of each distinct ``(sigma, q)`` is computed
    once by a fresh ``RdpAccountant`` (shared ``cache``; every round of a run usually has the
    same parameters) and added ``steps`` times; epsilon is ``dp_accounting``'s own
    ``compute_epsilon`` of the total. The result equals composing the whole history in one
    ``RdpAccountant`` (what :func:`privacy.accounting.epsilon_dp_accounting` does).
    """

    def __init__(self, *, without_replacement: bool, cache: dict[Any, Any]) -> None:
        self.without_replacement = without_replacement
        self._cache = cache
        self._rdp: Any = None
        self.history: list[tuple[float, float, int]] = []
        self.infinite = False
        self.delta = 1e-5

    @property
    def method(self) -> str:
        return METHOD_WOR_RDP if self.without_replacement else METHOD_POISSON_RDP

    def _unit(self, sigma: float, q: float, sizes: tuple[int, int] | None) -> tuple[Any, Any]:
        """``(orders, rdp)`` of one application of the sampled Gaussian."""
        key = (self.without_replacement, sigma, q, sizes)
        if key not in self._cache:
            import dp_accounting

            gaussian = dp_accounting.GaussianDpEvent(sigma)
            if self.without_replacement:
                # Flower's construction; the analysis only uses sample_size / population.
                if sizes is None:
                    ratio = Fraction(q).limit_denominator(_MAX_POPULATION)
                    sizes = (ratio.numerator, ratio.denominator)
                event: Any = dp_accounting.SampledWithoutReplacementDpEvent(
                    sizes[1], sizes[0], gaussian
                )
                relation = dp_accounting.NeighboringRelation.REPLACE_ONE
            else:
                event = dp_accounting.PoissonSampledDpEvent(q, gaussian)
                relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
            acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
            acc.compose(event, 1)
            self._cache[key] = (acc.orders, acc.rdp)
        return self._cache[key]

    def compose(
        self,
        sigma: float,
        q: float,
        steps: int,
        *,
        delta: float,
        sizes: tuple[int, int] | None = None,
    ) -> float:
        """Compose one event; return the epsilon of the node's history so far at ``delta``.

        ``sizes`` is ``(sample_size, population)`` for sampling without replacement (else
        recovered from ``q``).
        """
        from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

        self.delta = delta
        sigma, q, steps = validate_event(noise_multiplier=sigma, sample_rate=q, steps=steps)
        self.history.append((sigma, q, steps))
        if sigma == 0.0:
            self.infinite = True
        if self.infinite:
            return math.inf
        orders, unit = self._unit(sigma, q, sizes)
        self._rdp = steps * unit if self._rdp is None else self._rdp + steps * unit
        eps = float(compute_epsilon(orders, self._rdp, delta)[0])
        return math.inf if math.isnan(eps) else eps


_UNIT_CACHE: dict[Any, Any] = {}
"""RDP curve of one sampled-Gaussian application per ``(wor, sigma, q, sizes)``, kept across
runs in a process (pure function of its key)."""
_UNIT_CACHE_MAX = 4096


@functools.lru_cache(maxsize=256)
def _pld_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """PLD epsilon of a (merged) history; cached, as it is a pure and slow function."""
    return epsilon_dp_accounting(
        history=history, delta=delta, method="pld", value_discretization_interval=_PLD_INTERVAL
    )


def _merge_runs(history: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Merge consecutive events with the same ``(sigma, q)`` (the same composition; PLD
    self-composes a merged event far faster than it composes its pieces one by one)."""
    merged: list[tuple[float, float, int]] = []
    for sigma, q, steps in history:
        if merged and merged[-1][:2] == (sigma, q):
            merged[-1] = (sigma, q, merged[-1][2] + steps)
        else:
            merged.append((sigma, q, steps))
    return merged


def _problem(file: str, line: int, text: str) -> ChainProblem:
    return ChainProblem(file, line, text)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"


def verify_run(run_dir: Path | str, *, pld_reference: bool = True) -> VerifyReport:
    """Verify every ledger of a run: hash chains, then every claimed epsilon recomputed.

    Parameters
    ----------
    run_dir : path
        The run directory (holding ``ledger/*.jsonl`` and ``config.json``).
    pld_reference : bool
        Also compute each node's final PLD epsilon (slower; reference only, never a failure).

    Returns
    -------
    VerifyReport
        ``report.ok`` is ``True`` when no problem was found.
    """
    run_path = Path(run_dir)
    problems: list[ChainProblem] = []
    rows: list[EventRow] = []
    files = ledger_files(run_path)

    config = None
    config_path = run_path / "config.json"
    try:
        config = load_json(config_path)
    except (OSError, ValueError) as exc:
        problems.append(_problem(str(config_path), 0, f"config.json is unreadable: {exc}"))
    config_delta = config.get("delta") if isinstance(config, dict) else None
    budget = config_budget(config)
    private = budget is None or math.isfinite(budget)

    if not run_path.is_dir():
        problems.append(_problem(str(run_path), 0, "run directory not found"))
    elif not files and private:
        problems.append(
            _problem(str(run_path / "ledger"), 0, "no ledger files (*.jsonl) in a private run")
        )

    accountants: dict[tuple[str, bool], _NodeAccountant] = {}
    cache = _UNIT_CACHE
    if len(cache) > _UNIT_CACHE_MAX:
        cache.clear()
    last_eps: dict[tuple[str, str], tuple[float, int]] = {}
    ledger_delta: dict[str, tuple[float, int]] = {}

    with _quiet_absl():
        for path in files:
            file = str(path)
            problems.extend(verify_chain(path))
            for number, record in iter_ledger_lines(path):
                if record is None:
                    continue  # verify_chain already reported it
                row, row_problems = _check_line(
                    file, number, record, accountants, cache, last_eps, ledger_delta, config_delta
                )
                problems.extend(row_problems)
                if row is not None:
                    rows.append(row)

        reference: dict[str, float] = {}
        if pld_reference:
            for (node, wor), acc in sorted(accountants.items()):
                if wor or not acc.history:
                    continue
                try:
                    reference[node] = _pld_epsilon(tuple(_merge_runs(acc.history)), acc.delta)
                except ValueError:
                    continue

    problems.sort(key=lambda p: (p.file, p.line))
    return VerifyReport(
        run_dir=str(run_path),
        files=tuple(str(p) for p in files),
        problems=tuple(problems),
        rows=tuple(rows),
        reference_epsilon=reference,
    )


_REQUIRED = (
    "node",
    "round",
    "mechanism",
    "unit_of_privacy",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "delta",
    "accountant",
    "epsilon_after",
)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_line(
    file: str,
    number: int,
    record: dict[str, Any],
    accountants: dict[tuple[str, bool], _NodeAccountant],
    cache: dict[Any, Any],
    last_eps: dict[tuple[str, str], tuple[float, int]],
    ledger_delta: dict[str, tuple[float, int]],
    config_delta: Any,
) -> tuple[EventRow | None, list[ChainProblem]]:
    problems: list[ChainProblem] = []
    missing = [k for k in _REQUIRED if k not in record]
    if missing:
        return None, [_problem(file, number, f"event is missing field(s) {missing}")]
    bad = [
        k
        for k in ("noise_multiplier", "sample_rate", "delta", "epsilon_after", "round", "steps")
        if not _number(record[k])
    ]
    if bad:
        return None, [_problem(file, number, f"non-numeric field(s) {bad}")]

    node = str(record["node"])
    mechanism = str(record["mechanism"])
    if mechanism not in MECHANISMS:
        return None, [_problem(file, number, f"unknown mechanism {mechanism!r}")]
    claimed = float(record["epsilon_after"])
    delta = float(record["delta"])
    steps = record["steps"]

    # delta: constant within a ledger, and the run's delta
    if file in ledger_delta:
        first_delta, first_line = ledger_delta[file]
        if delta != first_delta:
            problems.append(
                _problem(
                    file,
                    number,
                    f"delta changed: {delta!r} here, {first_delta!r} at line {first_line}",
                )
            )
    else:
        ledger_delta[file] = (delta, number)
    if _number(config_delta) and delta != float(config_delta):
        problems.append(
            _problem(
                file, number, f"delta {delta!r} differs from config.json delta {config_delta!r}"
            )
        )

    # epsilon never decreases along one node's entries of one ledger
    key = (file, node)
    if not math.isnan(claimed):
        if key in last_eps and claimed < last_eps[key][0]:
            previous, previous_line = last_eps[key]
            problems.append(
                _problem(
                    file,
                    number,
                    f"epsilon decreased for node {node!r}: {claimed:.6g} here, "
                    f"{previous:.6g} at line {previous_line}",
                )
            )
        else:
            last_eps[key] = (claimed, number)
    else:
        problems.append(_problem(file, number, "epsilon_after is NaN"))

    recomputed: float | None = None
    method: str | None = None
    status = "chain-only"
    if mechanism != "refusal":
        if not isinstance(steps, int) or steps <= 0:
            problems.append(
                _problem(file, number, f"{mechanism} event with steps={steps!r} (must be >= 1)")
            )
            status = "error"
        else:
            wor = mechanism == "client-level-gaussian" and record["accountant"] == _WOR_ACCOUNTANT
            acc = accountants.get((node, wor))
            if acc is None:
                acc = accountants[(node, wor)] = _NodeAccountant(
                    without_replacement=wor, cache=cache
                )
            method = acc.method
            sizes = _sizes_from_detail(record.get("detail")) if wor else None
            q = float(record["sample_rate"])
            if sizes is not None and not math.isclose(sizes[0] / sizes[1], q, rel_tol=1e-9):
                problems.append(
                    _problem(
                        file,
                        number,
                        f"detail says sampled={sizes[0]} population={sizes[1]} but "
                        f"sample_rate={q!r}",
                    )
                )
                sizes = None
            try:
                recomputed = acc.compose(
                    float(record["noise_multiplier"]), q, steps, delta=delta, sizes=sizes
                )
            except (ValueError, AssertionError) as exc:
                problems.append(_problem(file, number, f"cannot recompute epsilon: {exc}"))
                status = "error"
            else:
                status = "ok"
                if _over_claims(claimed, recomputed):
                    status = "over-claim"
                    problems.append(
                        _problem(
                            file,
                            number,
                            f"epsilon over-claimed for node {node!r} round {record['round']}: "
                            f"ledger says {_fmt(claimed)}, recomputed {_fmt(recomputed)} "
                            f"({method}); the claim is more than {TOLERANCE:.0%} too low",
                        )
                    )

    row = EventRow(
        file=file,
        line=number,
        node=node,
        round=int(record["round"]),
        mechanism=mechanism,
        unit_of_privacy=str(record["unit_of_privacy"]),
        noise_multiplier=float(record["noise_multiplier"]),
        sample_rate=float(record["sample_rate"]),
        steps=int(steps),
        clip_norm=float(record["clip_norm"]) if _number(record.get("clip_norm")) else math.nan,
        delta=delta,
        accountant=str(record["accountant"]),
        claimed_epsilon=claimed,
        recomputed_epsilon=recomputed,
        method=method,
        status=status,
        detail=record.get("detail") if isinstance(record.get("detail"), str) else None,
    )
    return row, problems


_SIZES = re.compile(r"sampled\s*=\s*(\d+)\D+population\s*=\s*(\d+)")


def _sizes_from_detail(detail: Any) -> tuple[int, int] | None:
    """``(sample_size, population)`` from a server line's ``detail`` ("sampled=K population=N")."""
    if not isinstance(detail, str):
        return None
    match = _SIZES.search(detail)
    if not match:
        return None
    sample_size, population = int(match.group(1)), int(match.group(2))
    if not 0 < sample_size <= population:
        return None
    return sample_size, population


def _over_claims(claimed: float, recomputed: float) -> bool:
    """Whether ``claimed`` is more than TOLERANCE below ``recomputed`` (privacy over-claimed)."""
    if math.isinf(recomputed):
        return not math.isinf(claimed)
    if math.isnan(claimed):
        return True
    return claimed < recomputed * (1.0 - TOLERANCE)
