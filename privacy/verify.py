"""Independent verification of a run's privacy ledgers (``fedrank audit verify RUN_DIR``).

:func:`verify_run` checks, for every ``RUN_DIR/ledger/*.jsonl``:

1. **The hash chain** (:func:`privacy.ledger.verify_chain`): edited, deleted, inserted or
   reordered lines.
2. **The signatures** (:func:`privacy.ledger.verify_signatures`): every line must be signed by
   its writer's Ed25519 key (``require_signatures``, default on: an unsigned line fails, since
   anyone can rebuild a hash chain). The writer of ``ledger/W.jsonl`` is ``W``; its key is
   ``TRUSTED_KEYS/W.pub`` when the auditor pins keys (``--trusted-keys DIR``), else the one
   published beside the ledger (``ledger/keys/W.pub``), which only proves that the lines were
   written by whoever holds that key (the report says which was used).
3. **Each line against what the run was configured and planned to do** (``config.json`` and,
   per node, ``RUN_DIR/nodes/<node>/privacy_plan.json``):

   ``dp-sgd`` lines (regional shape, user-level): the run's privacy shape is ``regional``; the
   unit is ``user``; the line's node is its ledger's writer; σ equals the plan's noise
   multiplier; the clip norm equals ``config.json``'s ``clip-norm`` (and the plan's, if it
   states one); δ equals the config's and the plan's; q = 1/k for a whole number k of batches
   per epoch (Opacus' rate ``1/ceil(n/B)``) and ``steps = local-epochs × k`` (so
   ``steps × q = local-epochs``); the claimed and the recomputed ε stay within the budget
   ``min(config ε, plan budget)``; rounds never go back and stay within ``num-server-rounds``.
   The plan itself must match the config (batch size, planned rounds, budget no larger than the
   config's, δ) and its σ must meet its budget over the planned rounds at the first round's q
   and steps (recomputed).
   ``refusal`` lines: no steps, and ε equal to what the node had already spent.
   ``client-level-gaussian`` lines (device shape, client-level): the run's shape is
   ``device``; the unit is ``client``; the line states ``sampling`` and ``neighbouring``; one
   release per line (``steps = 1``); ``sampled/population`` in ``detail`` equals q; ε within
   the config's budget.
4. **Every claimed ε recomputed** with Google's ``dp_accounting`` (not the accountant that
   produced it):

   ``dp-sgd`` (Opacus' RDP at the nodes): per node,
   ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))`` composed ``steps`` times per line, RDP
   accountant, add/remove-one. ``dp_accounting``'s RDP code is independent of Opacus'; its
   default orders are a superset of Opacus', so an honest claim agrees to well under 1 %. The
   tighter PLD ε of each node's history is reported as a reference.

   ``client-level-gaussian``: from the relation the line states, recomputed here (not with the
   server's accounting code):
   ``sampling="without-replacement"``, ``neighbouring="replace-one"``: fixed-size sampling of
   K of N clients, ``SampledWithoutReplacementDpEvent(N, K, GaussianDpEvent(z/2))`` under
   ``REPLACE_ONE``. Replacing one client moves the clipped sum by up to 2C while the noise is
   zC, so the Gaussian's multiplier *per unit of sensitivity* is z/2 (``dp_accounting``'s
   Gaussian event assumes sensitivity 1 in the relation it is composed under).
   ``sampling="poisson"``, ``neighbouring="add-remove"``:
   ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` under ``ADD_OR_REMOVE_ONE`` (sensitivity C).
   Other combinations have no RDP analysis in ``dp_accounting`` and fail. A line that does not
   state its relation fails too, and is recomputed conservatively (replace-one with 2C for an
   ``rdp-wor`` accountant, Poisson add/remove-one otherwise): this is what exposes the older
   device-shape ledgers, which accounted ``GaussianDpEvent(z)`` under replace-one (ε about
   2.7× too low at ε ≈ 1).

A claimed ε lower than the recomputation by more than :data:`TOLERANCE` (relative) is a failure
(the ledger over-claims privacy); a higher claim is fine (conservative). Every problem names
``file:line`` and the values involved (line 0: the file or run as a whole).

What cannot be seen from the files alone: a ledger whose *tail* was cut off (keep each
ledger's head hash elsewhere; see :mod:`privacy.ledger`), and a node that signs lines it
did not honour (the signature binds lines to the node's key, the cross-checks bind them to its
plan and the run's configuration; the noise itself is trusted to the node's code).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from privacy.accounting import epsilon_dp_accounting, validate_event
from privacy.ledger import (
    MECHANISMS,
    ChainProblem,
    LedgerKeyError,
    encode_nonfinite,
    key_fingerprint,
    load_public_key,
    published_key_path,
    verify_chain,
    verify_signatures,
)

__all__ = [
    "PLAN_FILE",
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

PLAN_FILE = "privacy_plan.json"
"""A node's plan, in ``RUN_DIR/nodes/<node>/`` (written by ``client.node``)."""

_EXACT = 1e-9
"""Relative tolerance for values that must be equal (floats read back from JSON)."""

_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
_FLOAT_FIELDS = ("noise_multiplier", "sample_rate", "clip_norm", "delta", "epsilon_after")
_WOR_ACCOUNTANT = "rdp-wor"
_PLD_INTERVAL = 1e-3
_MAX_POPULATION = 10**9

# Constructions the recomputation composes (keys of _NodeAccountant).
POISSON_ADD_REMOVE = "poisson/add-remove"
WOR_REPLACE_ONE = "without-replacement/replace-one"

METHOD_POISSON_RDP = "dp_accounting RDP, Poisson sampling, add/remove-one"
METHOD_WOR_RDP = (
    "dp_accounting RDP, fixed-size sampling without replacement, replace-one "
    "(sensitivity 2C: Gaussian z/2)"
)
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
    sampling: str | None = None
    neighbouring: str | None = None
    signed: bool = False


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
    keys : dict
        Per ledger file: ``{"writer", "key_id", "source"}`` (``source`` is ``"trusted"``,
        ``"published"`` or ``"none"``).
    notes : tuple of str
        What the verification relied on (not failures), e.g. keys that were not pinned.
    """

    run_dir: str
    files: tuple[str, ...]
    problems: tuple[ChainProblem, ...]
    rows: tuple[EventRow, ...]
    reference_epsilon: dict[str, float] = field(default_factory=dict)
    keys: dict[str, dict[str, str | None]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether nothing is wrong."""
        return not self.problems

    def summary(self) -> str:
        """One line: PASS/FAIL, counts."""
        checked = sum(1 for r in self.rows if r.recomputed_epsilon is not None)
        refusals = sum(1 for r in self.rows if r.mechanism == "refusal")
        signed = sum(1 for r in self.rows if r.signed)
        verdict = "PASS" if self.ok else "FAIL"
        return (
            f"{verdict}: {len(self.files)} ledger file(s), {len(self.rows)} line(s) "
            f"({signed} signed), {checked} epsilon value(s) recomputed, {refusals} refusal(s), "
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
                "keys": dict(self.keys),
                "notes": list(self.notes),
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


def _as_float(value: Any) -> float | None:
    """A number or numeric string as a float (``"inf"`` accepted); ``None`` otherwise."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _as_int(value: Any) -> int | None:
    number = _as_float(value)
    if number is None or not math.isfinite(number) or not number.is_integer():
        return None
    return int(number)


def config_budget(config: Any) -> float | None:
    """``config["epsilon"]`` as a float (``"inf"`` strings accepted); ``None`` if absent."""
    if not isinstance(config, dict):
        return None
    return _as_float(config.get("epsilon"))


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
    """Incremental ``dp_accounting`` RDP accounting for one node and one construction.

    ``dp_accounting``'s ``RdpAccountant.compose(event, count)`` adds ``count`` times the
    event's RDP curve to its total. Here the curve of each distinct ``(sigma, q)`` is computed
    once by a fresh ``RdpAccountant`` (shared ``cache``; every round of a run usually has the
    same parameters) and added ``steps`` times; epsilon is ``dp_accounting``'s own
    ``compute_epsilon`` of the total. The result equals composing the whole history in one
    ``RdpAccountant`` (what :func:`privacy.accounting.epsilon_dp_accounting` does).

    ``construction`` is :data:`POISSON_ADD_REMOVE` (``sigma`` is the Gaussian's multiplier per
    unit of sensitivity) or :data:`WOR_REPLACE_ONE` (the caller passes z/2 as ``sigma``).
    """

    def __init__(self, *, construction: str, cache: dict[Any, Any]) -> None:
        self.construction = construction
        self._cache = cache
        self._rdp: Any = None
        self.history: list[tuple[float, float, int]] = []
        self.infinite = False
        self.delta = 1e-5

    @property
    def method(self) -> str:
        return METHOD_WOR_RDP if self.construction == WOR_REPLACE_ONE else METHOD_POISSON_RDP

    def _unit(self, sigma: float, q: float, sizes: tuple[int, int] | None) -> tuple[Any, Any]:
        """``(orders, rdp)`` of one application of the sampled Gaussian."""
        key = (self.construction, sigma, q, sizes)
        if key not in self._cache:
            import dp_accounting

            gaussian = dp_accounting.GaussianDpEvent(sigma)
            if self.construction == WOR_REPLACE_ONE:
                # The analysis only uses sample_size / population.
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

    def epsilon_if(self, sigma: float, q: float, steps: int, *, delta: float) -> float:
        """Epsilon of ``steps`` applications alone (nothing composed; for plan checks)."""
        from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

        sigma, q, steps = validate_event(noise_multiplier=sigma, sample_rate=q, steps=steps)
        if sigma == 0.0:
            return math.inf
        orders, unit = self._unit(sigma, q, None)
        eps = float(compute_epsilon(orders, steps * unit, delta)[0])
        return math.inf if math.isnan(eps) else eps

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
"""RDP curve of one sampled-Gaussian application per ``(construction, sigma, q, sizes)``, kept
across runs in a process (pure function of its key)."""
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


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_EXACT, abs_tol=0.0) or a == b


# --------------------------------------------------------------------------------------------
# what the run was configured and planned to do
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Expected:
    """The run's configuration, as the checks need it (``None``: not stated)."""

    path: str
    shape: str | None
    budget: float | None
    delta: float | None
    clip_norm: float | None
    batch_size: int | None
    local_epochs: int | None
    rounds: int | None

    @classmethod
    def from_config(cls, config: Any, path: str) -> _Expected:
        config = config if isinstance(config, dict) else {}
        shape = config.get("privacy-shape")
        return cls(
            path=path,
            shape=shape if isinstance(shape, str) else None,
            budget=config_budget(config),
            delta=_as_float(config.get("delta")),
            clip_norm=_as_float(config.get("clip-norm")),
            batch_size=_as_int(config.get("batch-size")),
            local_epochs=_as_int(config.get("local-epochs")),
            rounds=_as_int(config.get("num-server-rounds")),
        )


@dataclass
class _Plan:
    """A node's ``privacy_plan.json`` (``None`` fields: not stated)."""

    path: str
    noise_multiplier: float | None
    batch_size: int | None
    planned_rounds: int | None
    budget: float | None
    delta: float | None
    clip_norm: float | None
    local_epochs: int | None
    checked: bool = False  # plan-level checks done (once per node)


_PLAN_FIELDS = ("noise_multiplier", "batch_size", "planned_rounds", "budget_epsilon", "delta")


class _Context:
    """State shared by the checks of one run."""

    def __init__(
        self,
        run_path: Path,
        expected: _Expected,
        plans_dir: Path,
        cache: dict[Any, Any],
    ) -> None:
        self.run_path = run_path
        self.expected = expected
        self.plans_dir = plans_dir
        self.cache = cache
        self.accountants: dict[tuple[str, str], _NodeAccountant] = {}
        self.last_eps: dict[tuple[str, str], tuple[float, int]] = {}
        self.last_spent: dict[tuple[str, str], float] = {}
        self.last_round: dict[tuple[str, str], tuple[int, int]] = {}
        self.ledger_delta: dict[str, tuple[float, int]] = {}
        self.plans: dict[str, _Plan | None] = {}
        self.plan_problems: list[ChainProblem] = []

    def accountant(self, node: str, construction: str) -> _NodeAccountant:
        key = (node, construction)
        if key not in self.accountants:
            self.accountants[key] = _NodeAccountant(construction=construction, cache=self.cache)
        return self.accountants[key]

    def plan(self, node: str) -> _Plan | None:
        """The node's plan; a missing or unreadable one is reported once (line 0)."""
        if node in self.plans:
            return self.plans[node]
        path = self.plans_dir / node / PLAN_FILE
        plan: _Plan | None = None
        try:
            data = load_json(path)
        except (OSError, ValueError) as exc:
            self.plan_problems.append(_problem(str(path), 0, f"privacy plan unreadable: {exc}"))
            data = None
        else:
            if data is None:
                self.plan_problems.append(
                    _problem(
                        str(path), 0,
                        f"no privacy plan for node {node!r}: its σ, batch size and budget "
                        "cannot be checked",
                    )
                )  # fmt: skip
            elif not isinstance(data, dict) or any(k not in data for k in _PLAN_FIELDS):
                self.plan_problems.append(
                    _problem(str(path), 0, f"privacy plan lacks field(s) of {_PLAN_FIELDS}")
                )
                data = None
        if isinstance(data, dict):
            plan = _Plan(
                path=str(path),
                noise_multiplier=_as_float(data.get("noise_multiplier")),
                batch_size=_as_int(data.get("batch_size")),
                planned_rounds=_as_int(data.get("planned_rounds")),
                budget=_as_float(data.get("budget_epsilon")),
                delta=_as_float(data.get("delta")),
                clip_norm=_as_float(data.get("clip_norm")),
                local_epochs=_as_int(data.get("local_epochs")),
            )
        self.plans[node] = plan
        return plan

    def budget_for(self, plan: _Plan | None) -> float | None:
        """min(config budget, plan budget), ignoring what is not stated."""
        values = [b for b in (self.expected.budget, plan.budget if plan else None) if b is not None]
        return min(values) if values else None


def _trusted_key(
    path: Path, trusted_keys: Path | None
) -> tuple[Any | None, str, list[ChainProblem]]:
    """``(public key, source, problems)`` for the writer of ``path``."""
    writer = path.stem
    published = published_key_path(path)
    problems: list[ChainProblem] = []
    if trusted_keys is not None:
        pinned_path = Path(trusted_keys) / f"{writer}.pub"
        try:
            pinned = load_public_key(pinned_path)
        except LedgerKeyError as exc:
            problems.append(_problem(str(path), 0, f"no trusted key for writer {writer!r}: {exc}"))
            return None, "none", problems
        if published.exists():
            try:
                same = key_fingerprint(load_public_key(published)) == key_fingerprint(pinned)
            except LedgerKeyError:
                same = False
            if not same:
                problems.append(
                    _problem(
                        str(path), 0,
                        f"the key published in the run ({published}) is not the trusted key "
                        f"{pinned_path}",
                    )
                )  # fmt: skip
        return pinned, "trusted", problems
    if published.exists():
        try:
            return load_public_key(published), "published", problems
        except LedgerKeyError as exc:
            problems.append(_problem(str(path), 0, f"published key unusable: {exc}"))
    return None, "none", problems


def verify_run(
    run_dir: Path | str,
    *,
    pld_reference: bool = True,
    trusted_keys: Path | str | None = None,
    require_signatures: bool = True,
    plans_dir: Path | str | None = None,
) -> VerifyReport:
    """Verify every ledger of a run: chains, signatures, cross-checks, every ε recomputed.

    Parameters
    ----------
    run_dir : path
        The run directory (holding ``ledger/*.jsonl``, ``config.json`` and ``nodes/``).
    pld_reference : bool
        Also compute each node's final PLD epsilon (slower; reference only, never a failure).
    trusted_keys : path, optional
        A folder of pinned writer keys, ``<writer>.pub`` (PEM) per ledger ``<writer>.jsonl``.
        Without it the keys published in ``RUN_DIR/ledger/keys/`` are used (and the report
        notes that they were not pinned).
    require_signatures : bool
        Whether an unsigned line is a failure (default: yes).
    plans_dir : path, optional
        Where the nodes' ``<node>/privacy_plan.json`` are (default ``RUN_DIR/nodes``).

    Returns
    -------
    VerifyReport
        ``report.ok`` is ``True`` when no problem was found.
    """
    run_path = Path(run_dir)
    problems: list[ChainProblem] = []
    rows: list[EventRow] = []
    notes: list[str] = []
    keys: dict[str, dict[str, str | None]] = {}
    files = ledger_files(run_path)

    config = None
    config_path = run_path / "config.json"
    try:
        config = load_json(config_path)
    except (OSError, ValueError) as exc:
        problems.append(_problem(str(config_path), 0, f"config.json is unreadable: {exc}"))
    expected = _Expected.from_config(config, str(config_path))
    private = expected.budget is None or math.isfinite(expected.budget)

    if not run_path.is_dir():
        problems.append(_problem(str(run_path), 0, "run directory not found"))
    elif not files and private:
        problems.append(
            _problem(str(run_path / "ledger"), 0, "no ledger files (*.jsonl) in a private run")
        )
    if run_path.is_dir() and config is None:
        problems.append(
            _problem(str(config_path), 0, "no config.json: ledger lines cannot be cross-checked")
        )

    cache = _UNIT_CACHE
    if len(cache) > _UNIT_CACHE_MAX:
        cache.clear()
    ctx = _Context(run_path, expected, Path(plans_dir) if plans_dir else run_path / "nodes", cache)

    with _quiet_absl():
        for path in files:
            file = str(path)
            problems.extend(verify_chain(path))
            public_key, source, key_problems = _trusted_key(
                path, Path(trusted_keys) if trusted_keys is not None else None
            )
            problems.extend(key_problems)
            problems.extend(
                verify_signatures(
                    path, public_key, require_signed=require_signatures,
                    key_source=f"{source} key" if public_key is not None else "",
                )
            )  # fmt: skip
            keys[file] = {
                "writer": path.stem,
                "key_id": key_fingerprint(public_key) if public_key is not None else None,
                "source": source,
            }
            for number, record in iter_ledger_lines(path):
                if record is None:
                    continue  # verify_chain already reported it
                row, row_problems = _check_line(file, number, record, ctx)
                problems.extend(row_problems)
                if row is not None:
                    rows.append(row)
        problems.extend(ctx.plan_problems)

        reference: dict[str, float] = {}
        if pld_reference:
            for (node, construction), acc in sorted(ctx.accountants.items()):
                if construction != POISSON_ADD_REMOVE or not acc.history:
                    continue
                try:
                    reference[node] = _pld_epsilon(tuple(_merge_runs(acc.history)), acc.delta)
                except ValueError:
                    continue

    sources = {k["source"] for k in keys.values()}
    if "published" in sources:
        notes.append(
            "Signatures were checked against the keys published in the run directory "
            "(ledger/keys/), not against pinned keys: they show each ledger has one writer, "
            "not who it is. Pin the nodes' keys with --trusted-keys DIR."
        )
    if not require_signatures:
        notes.append("Unsigned lines were allowed (--allow-unsigned).")
    problems.sort(key=lambda p: (p.file, p.line))
    return VerifyReport(
        run_dir=str(run_path),
        files=tuple(str(p) for p in files),
        problems=tuple(problems),
        rows=tuple(rows),
        reference_epsilon=reference,
        keys=keys,
        notes=tuple(notes),
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
    file: str, number: int, record: dict[str, Any], ctx: _Context
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

    def flag(text: str) -> None:
        problems.append(_problem(file, number, text))

    node = str(record["node"])
    mechanism = str(record["mechanism"])
    if mechanism not in MECHANISMS:
        return None, [_problem(file, number, f"unknown mechanism {mechanism!r}")]
    claimed = float(record["epsilon_after"])
    delta = float(record["delta"])
    steps = record["steps"]
    round_ = record["round"]
    expected = ctx.expected

    # delta: constant within a ledger, and the run's delta (refusals spend nothing: a node
    # refusing a run config weaker than its pinned settings may state either δ)
    if mechanism == "refusal":
        pass
    elif file in ctx.ledger_delta:
        first_delta, first_line = ctx.ledger_delta[file]
        if delta != first_delta:
            flag(f"delta changed: {delta!r} here, {first_delta!r} at line {first_line}")
    else:
        ctx.ledger_delta[file] = (delta, number)
    if mechanism != "refusal" and expected.delta is not None and delta != expected.delta:
        flag(f"delta {delta!r} differs from config.json delta {expected.delta!r}")

    # epsilon never decreases along one node's entries of one ledger
    key = (file, node)
    if not math.isnan(claimed):
        if key in ctx.last_eps and claimed < ctx.last_eps[key][0]:
            previous, previous_line = ctx.last_eps[key]
            flag(
                f"epsilon decreased for node {node!r}: {claimed:.6g} here, "
                f"{previous:.6g} at line {previous_line}"
            )
        else:
            ctx.last_eps[key] = (claimed, number)
    else:
        flag("epsilon_after is NaN")

    # rounds: never back, within the run
    if isinstance(round_, int):
        if key in ctx.last_round and round_ < ctx.last_round[key][0]:
            previous_round, previous_line = ctx.last_round[key]
            flag(
                f"round went back for node {node!r}: round {round_} here, round "
                f"{previous_round} at line {previous_line}"
            )
        else:
            ctx.last_round[key] = (round_, number)
        if expected.rounds is not None and not 1 <= round_ <= expected.rounds:
            flag(
                f"round {round_} outside the run's rounds 1..{expected.rounds} "
                f"(config.json num-server-rounds)"
            )

    sampling = record.get("sampling")
    neighbouring = record.get("neighbouring")
    recomputed: float | None = None
    method: str | None = None
    status = "chain-only"
    if mechanism == "refusal":
        if steps != 0:
            flag(f"refusal with steps={steps!r}: a refused round takes no steps")
        spent = ctx.last_spent.get(key)
        if spent is not None and not _same(claimed, spent):
            flag(
                f"refusal states ε {_fmt(claimed)} but node {node!r} had spent {_fmt(spent)} "
                "in this ledger"
            )
    elif not isinstance(steps, int) or steps <= 0:
        flag(f"{mechanism} event with steps={steps!r} (must be >= 1)")
        status = "error"
    else:
        if mechanism == "dp-sgd":
            construction, sigma_eff, sizes = _check_dp_sgd(file, record, ctx, flag, node=node)
        elif mechanism == "count-release":
            construction, sigma_eff, sizes = _check_count_release(file, record, flag, node=node)
        else:
            construction, sigma_eff, sizes = _check_client_level(record, ctx, flag)
        acc = ctx.accountant(node, construction)
        method = acc.method
        try:
            recomputed = acc.compose(
                sigma_eff, float(record["sample_rate"]), steps, delta=delta, sizes=sizes
            )
        except (ValueError, AssertionError) as exc:
            flag(f"cannot recompute epsilon: {exc}")
            status = "error"
        else:
            status = "ok"
            if _over_claims(claimed, recomputed):
                status = "over-claim"
                flag(
                    f"epsilon over-claimed for node {node!r} round {round_}: "
                    f"ledger says {_fmt(claimed)}, recomputed {_fmt(recomputed)} "
                    f"({method}); the claim is more than {TOLERANCE:.0%} too low"
                )
            node_level = mechanism in ("dp-sgd", "count-release")
            plan = ctx.plan(node) if node_level else None
            budget = ctx.budget_for(plan) if node_level else expected.budget
            if budget is not None and math.isfinite(budget):
                if claimed > budget * (1 + _EXACT):
                    flag(
                        f"epsilon {_fmt(claimed)} for node {node!r} round {round_} is over its "
                        f"budget {budget:g}"
                    )
                elif recomputed > budget * (1 + TOLERANCE):
                    flag(
                        f"recomputed epsilon {_fmt(recomputed)} for node {node!r} round "
                        f"{round_} is over its budget {budget:g} (claimed {_fmt(claimed)})"
                    )
        ctx.last_spent[key] = claimed

    row = EventRow(
        file=file,
        line=number,
        node=node,
        round=int(round_),
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
        sampling=sampling if isinstance(sampling, str) else None,
        neighbouring=neighbouring if isinstance(neighbouring, str) else None,
        signed=isinstance(record.get("signature"), str),
    )
    return row, problems


def _check_dp_sgd(
    file: str, record: Mapping[str, Any], ctx: _Context, flag: Any, *, node: str
) -> tuple[str, float, None]:
    """Cross-check a node's DP-SGD line; return the recomputation's construction and σ."""
    expected = ctx.expected
    sigma = float(record["noise_multiplier"])
    q = float(record["sample_rate"])
    steps = int(record["steps"])
    clip: Any = record.get("clip_norm")
    delta = float(record["delta"])

    if expected.shape is not None and expected.shape != "regional":
        flag(f"dp-sgd line in a run whose config.json says privacy-shape={expected.shape!r}")
    if record["unit_of_privacy"] != "user":
        flag(f"dp-sgd line with unit_of_privacy={record['unit_of_privacy']!r} (expected 'user')")
    writer = Path(file).stem
    if node != writer:
        flag(f"dp-sgd line for node {node!r} in the ledger of {writer!r}")
    if (
        record.get("sampling", "poisson") != "poisson"
        or record.get("neighbouring", "add-remove") != "add-remove"
    ):
        flag(
            f"dp-sgd line states sampling={record.get('sampling')!r}, "
            f"neighbouring={record.get('neighbouring')!r} (DP-SGD is Poisson, add/remove-one)"
        )

    # clip norm: the run's
    if not _number(clip) or not math.isfinite(float(clip)) or float(clip) <= 0:
        flag(f"clip_norm {clip!r} is not a positive number")
    elif expected.clip_norm is not None and not _same(float(clip), expected.clip_norm):
        flag(f"clip_norm {float(clip):g} differs from config.json clip-norm {expected.clip_norm:g}")

    # q = 1 / k batches per epoch, steps = local_epochs * k
    if not 0.0 < q <= 1.0:
        flag(f"sample_rate q={q!r} outside (0, 1]")
    else:
        batches = round(1.0 / q)
        if batches < 1 or not math.isclose(1.0 / q, batches, rel_tol=_EXACT):
            flag(
                f"sample_rate q={q!r} is not 1/k for a whole number k of batches per epoch "
                "(Opacus' Poisson rate 1/ceil(n/B))"
            )
        elif expected.local_epochs is not None and steps != expected.local_epochs * batches:
            flag(
                f"steps={steps} but q={q:.6g} (k={batches} batches per epoch) and config.json "
                f"local-epochs={expected.local_epochs} give {expected.local_epochs * batches} "
                f"(steps x q = {steps * q:.6g}, expected {expected.local_epochs})"
            )

    plan = ctx.plan(node)
    if plan is not None:
        if plan.noise_multiplier is not None and not _same(sigma, plan.noise_multiplier):
            flag(
                f"noise_multiplier σ={sigma:g} differs from node {node!r}'s plan "
                f"σ={plan.noise_multiplier:g} ({plan.path})"
            )
        if plan.delta is not None and not _same(delta, plan.delta):
            flag(f"delta {delta!r} differs from the plan's delta {plan.delta!r} ({plan.path})")
        if plan.clip_norm is not None and _number(clip) and not _same(float(clip), plan.clip_norm):
            flag(f"clip_norm {float(clip):g} differs from the plan's {plan.clip_norm:g}")
        if not plan.checked:
            plan.checked = True
            _check_plan(plan, ctx, node=node, q=q, steps=steps, delta=delta)
    return POISSON_ADD_REMOVE, sigma, None


def _check_count_release(
    file: str, record: Mapping[str, Any], flag: Any, *, node: str
) -> tuple[str, float, None]:
    """A node's one-shot Gaussian release of its clipped click counts (client.evidence_release):
    one event (σ, q=1, steps=1), user-level, add/remove-one, composed in the node's accountant
    with its DP-SGD steps."""
    if record["unit_of_privacy"] != "user":
        flag(f"count-release line with unit_of_privacy={record['unit_of_privacy']!r}")
    if Path(file).stem != node:
        flag(f"count-release line for node {node!r} in the ledger of {Path(file).stem!r}")
    if float(record["sample_rate"]) != 1.0 or int(record["steps"]) != 1:
        flag(
            f"count-release line with sample_rate={record['sample_rate']!r}, "
            f"steps={record['steps']!r} (a one-shot release is q=1, one step)"
        )
    if record.get("neighbouring", "add-remove") != "add-remove":
        flag(f"count-release line states neighbouring={record.get('neighbouring')!r}")
    clip: Any = record.get("clip_norm")
    if not _number(clip) or not math.isfinite(float(clip)) or float(clip) <= 0:
        flag(f"clip_norm {clip!r} is not a positive number")
    return POISSON_ADD_REMOVE, float(record["noise_multiplier"]), None


def _check_plan(
    plan: _Plan, ctx: _Context, *, node: str, q: float, steps: int, delta: float
) -> None:
    """The plan against the config, and its σ against its budget (at the first round's q)."""
    expected = ctx.expected

    def flag(text: str) -> None:
        ctx.plan_problems.append(_problem(plan.path, 0, text))

    if (
        expected.batch_size is not None
        and plan.batch_size is not None
        and plan.batch_size != expected.batch_size
    ):
        flag(f"plan batch_size {plan.batch_size} != config.json batch-size {expected.batch_size}")
    if (
        expected.rounds is not None
        and plan.planned_rounds is not None
        and plan.planned_rounds != expected.rounds
    ):
        flag(
            f"plan planned_rounds {plan.planned_rounds} != config.json num-server-rounds "
            f"{expected.rounds}"
        )
    if (
        expected.budget is not None
        and plan.budget is not None
        and plan.budget > expected.budget * (1 + _EXACT)
    ):
        flag(f"plan budget_epsilon {plan.budget:g} > config.json epsilon {expected.budget:g}")
    if expected.delta is not None and plan.delta is not None and plan.delta != expected.delta:
        flag(f"plan delta {plan.delta!r} != config.json delta {expected.delta!r}")
    if (
        expected.local_epochs is not None
        and plan.local_epochs is not None
        and plan.local_epochs != expected.local_epochs
    ):
        flag(
            f"plan local_epochs {plan.local_epochs} != config.json local-epochs "
            f"{expected.local_epochs}"
        )
    budget = ctx.budget_for(plan)
    if (
        plan.noise_multiplier is not None
        and plan.planned_rounds is not None
        and plan.planned_rounds >= 1
        and budget is not None
        and math.isfinite(budget)
    ):
        try:
            planned = ctx.accountant(node, POISSON_ADD_REMOVE).epsilon_if(
                plan.noise_multiplier, q, steps * plan.planned_rounds, delta=delta
            )
        except ValueError as exc:
            flag(f"cannot recompute the plan's ε: {exc}")
            return
        if planned > budget * (1 + TOLERANCE):
            flag(
                f"plan σ={plan.noise_multiplier:g} does not meet the budget {budget:g}: "
                f"{plan.planned_rounds} rounds of {steps} steps at q={q:.6g} give ε "
                f"{planned:.6g} (dp_accounting RDP)"
            )


def _check_client_level(
    record: Mapping[str, Any], ctx: _Context, flag: Any
) -> tuple[str, float, tuple[int, int] | None]:
    """Cross-check a client-level (device shape) line; return construction, σ_eff, sizes."""
    expected = ctx.expected
    z = float(record["noise_multiplier"])
    q = float(record["sample_rate"])
    steps = int(record["steps"])
    clip: Any = record.get("clip_norm")
    if expected.shape is not None and expected.shape != "device":
        flag(
            "client-level-gaussian line in a run whose config.json says "
            f"privacy-shape={expected.shape!r}"
        )
    if record["unit_of_privacy"] != "client":
        flag(
            "client-level-gaussian line with unit_of_privacy="
            f"{record['unit_of_privacy']!r} (expected 'client')"
        )
    if steps != 1:
        flag(f"client-level-gaussian line with steps={steps} (one release per round: 1)")
    if not _number(clip) or not math.isfinite(float(clip)) or float(clip) <= 0:
        flag(f"clip_norm {clip!r} is not a positive number")

    sampling, neighbouring = record.get("sampling"), record.get("neighbouring")
    if sampling is None or neighbouring is None:
        construction = (
            WOR_REPLACE_ONE if record["accountant"] == _WOR_ACCOUNTANT else POISSON_ADD_REMOVE
        )
        flag(
            "client-level-gaussian line does not state sampling and neighbouring; recomputed "
            f"as {construction}"
        )
    elif (sampling, neighbouring) == ("without-replacement", "replace-one"):
        construction = WOR_REPLACE_ONE
    elif (sampling, neighbouring) == ("poisson", "add-remove"):
        construction = POISSON_ADD_REMOVE
    else:
        construction = WOR_REPLACE_ONE if sampling == "without-replacement" else POISSON_ADD_REMOVE
        flag(
            f"sampling={sampling!r} with neighbouring={neighbouring!r} has no RDP analysis "
            f"here; recomputed as {construction}"
        )

    sizes: tuple[int, int] | None = None
    if construction == WOR_REPLACE_ONE:
        sizes = _sizes_from_detail(record.get("detail"))
        if sizes is not None and not math.isclose(sizes[0] / sizes[1], q, rel_tol=_EXACT):
            flag(f"detail says sampled={sizes[0]} population={sizes[1]} but sample_rate={q!r}")
            sizes = None
        parts = _noise_parts_from_detail(record.get("detail"))
        if parts is None:
            # replacing one client moves the clipped sum by up to 2C; the noise is zC
            return construction, z / 2.0, sizes
        # The line states both Gaussian queries of the round (the clipped sum, noise z_u·C,
        # sensitivity 2C; the clipped count, noise σ_b, sensitivity 1): recompute their
        # combined per-unit-sensitivity multiplier independently and hold the claim to it.
        z_u, sigma_b = parts
        combined = (4.0 / z_u**2 + 1.0 / sigma_b**2) ** -0.5
        if not math.isclose(z, combined, rel_tol=1e-6):
            flag(
                f"noise_multiplier {z!r} is not the combined multiplier {combined!r} of "
                f"update_noise_multiplier={z_u!r} and clipped_count_stddev={sigma_b!r}"
            )
        return construction, combined, sizes
    return construction, z, None


_NOISE_PARTS = re.compile(
    r"update_noise_multiplier\s*=\s*([0-9.eE+-]+)\D+clipped_count_stddev\s*=\s*([0-9.eE+-]+)"
)


def _noise_parts_from_detail(detail: Any) -> tuple[float, float] | None:
    """``(z_u, σ_b)`` from a device line's ``detail``, or None when it states neither."""
    if not isinstance(detail, str):
        return None
    match = _NOISE_PARTS.search(detail)
    if not match:
        return None
    try:
        z_u, sigma_b = float(match.group(1)), float(match.group(2))
    except ValueError:
        return None
    if not (z_u > 0 and sigma_b > 0 and math.isfinite(z_u) and math.isfinite(sigma_b)):
        return None
    return z_u, sigma_b


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
