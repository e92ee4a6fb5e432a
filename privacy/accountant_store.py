"""A privacy accountant whose history survives process restarts.

:class:`PersistentAccountant` keeps the full history of privacy events
``(noise_multiplier, sample_rate, steps)`` of one node (or of the server) and writes it to a JSON
file atomically after every change, so epsilon keeps accumulating across rounds, fresh
``PrivacyEngine`` objects and restarts. It refuses (``BudgetExhaustedError``) to record an event
that would take epsilon over the budget.

Using it with Opacus
--------------------
Attach the accountant **before** ``make_private`` (Opacus binds the optimizer's step hook to the
engine's accountant object at that call)::

    store = PersistentAccountant(run_dir / "accountant.json", delta=1e-5, budget_epsilon=1.0)
    if store.would_exceed(noise_multiplier=sigma, sample_rate=q, steps=planned_steps):
        ...  # refuse the round
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant = store.to_opacus()       # carries the whole history
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=sigma, max_grad_norm=clip_norm, poisson_sampling=True,
    )
    ...  # train: each optimizer step appends to engine.accountant.history
    store.sync_from_opacus(engine.accountant)   # persist the steps actually taken
    engine.get_epsilon(delta) == store.epsilon()  # same history, same number

Do not use ``make_private_with_epsilon`` with a non-empty history: its calibration ignores the
epsilon already spent. Use :func:`plan_noise_multiplier` for the whole run instead.

The state file
--------------
``{"format": "fedrank-privacy-accountant", "version": 1, "mechanism": "rdp", "delta": 1e-05,
"budget_epsilon": 1.0, "history": [[sigma, q, steps], ...]}``. An infinite budget is written as
the string ``"inf"`` so the file stays strict JSON. The history is kept in Opacus' canonical form:
a new event with the same ``(noise_multiplier, sample_rate)`` as the last one is merged into it
(composition of identical events is self-composition, so epsilon is unchanged).
A file that cannot be read or validated raises :class:`AccountantStateError` naming the path;
the accountant never silently starts fresh (that would under-report epsilon).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from opacus.accountants import IAccountant, create_accountant

from privacy.accounting import (
    ACCOUNTANTS,
    PrivacyEvent,
    calibrate_noise_multiplier,
    epsilon_from_history,
    validate_delta,
    validate_event,
)
from privacy.ledger import fsync_dir

__all__ = [
    "AccountantStateError",
    "BudgetExhaustedError",
    "PersistentAccountant",
    "plan_noise_multiplier",
]

_FORMAT = "fedrank-privacy-accountant"
_VERSION = 1


class BudgetExhaustedError(RuntimeError):
    """Recording an event would take (or took) epsilon over the budget.

    Attributes
    ----------
    spent_epsilon : float
        Epsilon spent before the event.
    planned_epsilon : float
        Epsilon after the event.
    budget_epsilon : float
        The budget.
    """

    def __init__(
        self, *, spent_epsilon: float, planned_epsilon: float, budget_epsilon: float, note: str = ""
    ) -> None:
        self.spent_epsilon = spent_epsilon
        self.planned_epsilon = planned_epsilon
        self.budget_epsilon = budget_epsilon
        message = (
            f"privacy budget exhausted: spent epsilon={spent_epsilon:.6g}, "
            f"planned epsilon={planned_epsilon:.6g} > budget epsilon={budget_epsilon:.6g}"
        )
        super().__init__(f"{message}; {note}" if note else message)


class AccountantStateError(ValueError):
    """The persisted accountant state is unreadable, invalid or inconsistent."""


def _merge(history: list[PrivacyEvent], event: PrivacyEvent) -> None:
    """Append ``event`` to ``history`` in place, merging like Opacus' ``step``."""
    if history and history[-1][0] == event[0] and history[-1][1] == event[1]:
        sigma, q, steps = history[-1]
        history[-1] = (sigma, q, steps + event[2])
    else:
        history.append(event)


def _budget_to_json(budget: float) -> float | str:
    return "inf" if math.isinf(budget) else budget


def _budget_from_json(value: Any) -> float:
    if value == "inf":
        return math.inf
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"budget_epsilon must be a number or 'inf', got {value!r}")


def _validate_budget(budget_epsilon: float) -> float:
    if (
        not isinstance(budget_epsilon, (int, float))
        or isinstance(budget_epsilon, bool)
        or math.isnan(budget_epsilon)
        or budget_epsilon <= 0
    ):
        raise ValueError(
            f"budget_epsilon must be > 0 (math.inf allowed), got budget_epsilon={budget_epsilon!r}"
        )
    return float(budget_epsilon)


def _parse_history(raw: Any) -> list[PrivacyEvent]:
    if not isinstance(raw, list):
        raise ValueError(f"history must be a list, got {type(raw).__name__}")
    history: list[PrivacyEvent] = []
    for index, entry in enumerate(raw):
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise ValueError(
                f"history[{index}] must be [noise_multiplier, sample_rate, steps], got {entry!r}"
            )
        try:
            history.append(
                validate_event(noise_multiplier=entry[0], sample_rate=entry[1], steps=entry[2])
            )
        except ValueError as exc:
            raise ValueError(f"history[{index}] is invalid: {exc}") from exc
    return history


class PersistentAccountant:
    """Privacy accountant with a budget, persisted atomically to a JSON file.

    Parameters
    ----------
    path : pathlib.Path
        State file. Loaded if it exists; written (tmp file + ``os.replace``) after every change.
    delta : float
        Target delta, in (0, 1). Must match the delta stored in an existing file.
    budget_epsilon : float
        Total epsilon budget, ``> 0``; ``math.inf`` means no limit (still accounted).
    accountant : {"rdp", "prv"}
        Opacus accountant used to compute epsilon. Must match an existing file.

    Raises
    ------
    ValueError
        On an invalid ``delta``, ``budget_epsilon`` or ``accountant`` (naming it).
    AccountantStateError
        If the file at ``path`` is unreadable, corrupt, or was written with another delta or
        accountant; the message names the path.
    """

    def __init__(
        self, path: Path, *, delta: float, budget_epsilon: float, accountant: str = "rdp"
    ) -> None:
        self._path = Path(path)
        self._delta = validate_delta(delta)
        self._budget = _validate_budget(budget_epsilon)
        if accountant not in ACCOUNTANTS:
            raise ValueError(
                f"accountant must be one of {ACCOUNTANTS}, got accountant={accountant!r}"
            )
        self._accountant = accountant
        self._history: list[PrivacyEvent] = []
        self._eps_cache: tuple[tuple[PrivacyEvent, ...], float] | None = None
        if self._path.exists():
            self._load_file()

    # ---------------------------------------------------------------- properties
    @property
    def path(self) -> Path:
        """The state file."""
        return self._path

    @property
    def delta(self) -> float:
        """Target delta."""
        return self._delta

    @property
    def budget_epsilon(self) -> float:
        """Total epsilon budget (``math.inf`` for none)."""
        return self._budget

    @property
    def accountant(self) -> str:
        """Opacus accountant name, ``"rdp"`` or ``"prv"``."""
        return self._accountant

    @property
    def history(self) -> list[PrivacyEvent]:
        """A copy of the history, ``[(noise_multiplier, sample_rate, steps), ...]``."""
        return list(self._history)

    @property
    def total_steps(self) -> int:
        """Number of noisy steps recorded."""
        return sum(steps for _, _, steps in self._history)

    def __len__(self) -> int:
        return self.total_steps

    def __repr__(self) -> str:
        return (
            f"PersistentAccountant(path={str(self._path)!r}, delta={self._delta!r}, "
            f"budget_epsilon={self._budget!r}, accountant={self._accountant!r}, "
            f"steps={self.total_steps})"
        )

    # ---------------------------------------------------------------- accounting
    def _epsilon_of(self, history: Sequence[PrivacyEvent]) -> float:
        key = tuple(history)
        if self._eps_cache is not None and self._eps_cache[0] == key:
            return self._eps_cache[1]
        eps = epsilon_from_history(history=key, delta=self._delta, accountant=self._accountant)
        self._eps_cache = (key, eps)
        return eps

    def epsilon(self) -> float:
        """Epsilon spent over the whole history (``0.0`` when empty).

        Returns
        -------
        float
            The epsilon at this accountant's delta.
        """
        return self._epsilon_of(self._history)

    def _planned(self, event: PrivacyEvent) -> list[PrivacyEvent]:
        planned = list(self._history)
        _merge(planned, event)
        return planned

    def epsilon_after(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon the history would have after a planned event (nothing is recorded).

        Parameters
        ----------
        noise_multiplier, sample_rate, steps
            The planned event (see :func:`privacy.accounting.validate_event`).

        Returns
        -------
        float
            The epsilon after the event.
        """
        event = validate_event(
            noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps
        )
        return epsilon_from_history(
            history=self._planned(event), delta=self._delta, accountant=self._accountant
        )

    def would_exceed(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> bool:
        """Whether recording a planned event would take epsilon over the budget.

        Parameters
        ----------
        noise_multiplier, sample_rate, steps
            The planned event.

        Returns
        -------
        bool
            ``True`` if the epsilon after the event is ``> budget_epsilon``.
        """
        planned = self.epsilon_after(
            noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps
        )
        return planned > self._budget

    def record(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Record an event and persist the history; refuse it if it would exceed the budget.

        Parameters
        ----------
        noise_multiplier, sample_rate, steps
            The event.

        Returns
        -------
        float
            Epsilon after the event.

        Raises
        ------
        BudgetExhaustedError
            If the epsilon after the event would exceed the budget; nothing is recorded and the
            state file is untouched.
        ValueError
            On an invalid event.
        """
        event = validate_event(
            noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps
        )
        planned = self._planned(event)
        planned_eps = self._epsilon_of(planned)
        if planned_eps > self._budget:
            raise BudgetExhaustedError(
                spent_epsilon=self.epsilon(),
                planned_epsilon=planned_eps,
                budget_epsilon=self._budget,
            )
        self._commit(planned)
        return planned_eps

    # ---------------------------------------------------------------- opacus bridge
    def to_opacus(self) -> IAccountant:
        """An Opacus accountant carrying this history (to attach to a ``PrivacyEngine``).

        Returns
        -------
        opacus.accountants.IAccountant
            ``RDPAccountant`` (or ``PRVAccountant`` for ``accountant="prv"``) whose ``.history``
            equals this history (a copy: Opacus mutates it on every step). Set it as
            ``engine.accountant`` **before** ``engine.make_private(...)`` and call
            :meth:`sync_from_opacus` after training.
        """
        opacus_accountant = create_accountant(mechanism=self._accountant)
        opacus_accountant.history = list(self._history)
        return opacus_accountant

    def sync_from_opacus(self, accountant: IAccountant) -> float:
        """Record the steps an Opacus accountant took since :meth:`to_opacus` / the last sync.

        The Opacus history must extend this history (same prefix; the last entry may have more
        steps, as Opacus merges repeated steps into it). The steps were already taken, so they
        are recorded and persisted even when they overrun the budget; the overrun is then raised.

        Parameters
        ----------
        accountant : opacus.accountants.IAccountant
            The accountant of the ``PrivacyEngine`` that trained.

        Returns
        -------
        float
            Epsilon after the sync.

        Raises
        ------
        ValueError
            If the Opacus history does not extend this history (e.g. a fresh ``PrivacyEngine``
            that was not given :meth:`to_opacus`).
        BudgetExhaustedError
            If the recorded steps took epsilon over the budget (the state is saved first).
        """
        theirs = [
            validate_event(noise_multiplier=s, sample_rate=q, steps=n)
            for s, q, n in accountant.history
        ]
        ours = self._history
        diverged = ValueError(
            f"the opacus accountant's history does not extend the history in {self._path}: "
            f"ours={ours!r}, theirs={theirs!r}; attach store.to_opacus() to the PrivacyEngine "
            "before make_private()"
        )
        if len(theirs) < len(ours):
            raise diverged
        if ours:
            if theirs[: len(ours) - 1] != ours[:-1]:
                raise diverged
            last_ours, last_theirs = ours[-1], theirs[len(ours) - 1]
            if last_theirs[:2] != last_ours[:2] or last_theirs[2] < last_ours[2]:
                raise diverged
        if theirs == ours:
            return self.epsilon()
        spent = self.epsilon()
        new_history = list(theirs)
        new_eps = self._epsilon_of(new_history)
        self._commit(new_history)
        if new_eps > self._budget:
            raise BudgetExhaustedError(
                spent_epsilon=spent,
                planned_epsilon=new_eps,
                budget_epsilon=self._budget,
                note=f"the steps were already taken and are recorded in {self._path}",
            )
        return new_eps

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The state as a JSON-serialisable dict (the same content as the state file).

        Returns
        -------
        dict
            Keys ``format``, ``version``, ``mechanism``, ``delta``, ``budget_epsilon`` (``"inf"``
            when infinite) and ``history`` (list of ``[noise_multiplier, sample_rate, steps]``).
        """
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "mechanism": self._accountant,
            "delta": self._delta,
            "budget_epsilon": _budget_to_json(self._budget),
            "history": [list(event) for event in self._history],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Replace the history with that of ``state_dict`` and persist it.

        The ``mechanism`` and ``delta`` must match this accountant; the budget stays the one
        given to the constructor. Loading a shorter history than the current one lowers the
        reported epsilon: only do it to restore a known-good state.

        Parameters
        ----------
        state_dict : mapping
            As returned by :meth:`state_dict`.

        Raises
        ------
        ValueError
            If the dict is malformed or its mechanism/delta do not match.
        """
        self._commit(self._history_from_state(state_dict))

    def _history_from_state(self, state: Mapping[str, Any]) -> list[PrivacyEvent]:
        if not isinstance(state, Mapping):
            raise ValueError(f"state must be a mapping, got {type(state).__name__}")
        for key in ("mechanism", "delta", "history"):
            if key not in state:
                raise ValueError(f"state has no key {key!r}")
        if state.get("format", _FORMAT) != _FORMAT:
            raise ValueError(f"state format is {state['format']!r}, expected {_FORMAT!r}")
        if state.get("version", _VERSION) != _VERSION:
            raise ValueError(f"state version is {state['version']!r}, expected {_VERSION}")
        if state["mechanism"] != self._accountant:
            raise ValueError(
                f"state mechanism={state['mechanism']!r} does not match "
                f"accountant={self._accountant!r}"
            )
        if state["delta"] != self._delta:
            raise ValueError(f"state delta={state['delta']!r} does not match delta={self._delta!r}")
        if "budget_epsilon" in state:
            _budget_from_json(state["budget_epsilon"])
        return _parse_history(state["history"])

    def _load_file(self) -> None:
        try:
            text = self._path.read_text(encoding="utf-8")
        except OSError as exc:
            raise AccountantStateError(
                f"cannot read privacy accountant state {self._path}: {exc}"
            ) from exc
        try:
            state = json.loads(text)
            self._history = self._history_from_state(state)
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            raise AccountantStateError(
                f"corrupt privacy accountant state {self._path}: {exc}. Refusing to start "
                "fresh (that would under-report epsilon); restore the file or move it away."
            ) from exc

    def _commit(self, history: list[PrivacyEvent]) -> None:
        """Persist ``history`` atomically, then adopt it (memory changes only if the write did)."""
        old = self._history
        self._history = list(history)
        try:
            payload = json.dumps(self.state_dict(), indent=1, allow_nan=False) + "\n"
            self._path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(
                dir=self._path.parent, prefix=f".{self._path.name}.", suffix=".tmp"
            )
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    handle.write(payload)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp_name, self._path)
            except BaseException:
                Path(tmp_name).unlink(missing_ok=True)
                raise
            fsync_dir(self._path.parent)
        except BaseException:
            self._history = old
            raise


def plan_noise_multiplier(
    *,
    budget_epsilon: float,
    delta: float,
    sample_rate: float,
    steps_per_round: int,
    rounds: int,
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """Noise multiplier so that the whole planned run (all rounds) meets the budget.

    Parameters
    ----------
    budget_epsilon : float
        Budget for the whole run, ``> 0`` (``math.inf`` gives ``0.0``).
    delta : float
        Target delta, in (0, 1).
    sample_rate : float
        Poisson sampling rate, in (0, 1].
    steps_per_round : int
        Noisy steps per round, ``>= 1``.
    rounds : int
        Number of rounds, ``>= 1``.
    accountant : {"rdp", "prv"}
        Opacus accountant.
    epsilon_tolerance : float
        See :func:`privacy.accounting.calibrate_noise_multiplier`.

    Returns
    -------
    float
        The smallest noise multiplier (to the tolerance) whose epsilon over
        ``steps_per_round * rounds`` steps is ``<= budget_epsilon``.

    Raises
    ------
    ValueError
        On an invalid argument, naming it.
    """
    for name, value in (("steps_per_round", steps_per_round), ("rounds", rounds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {name}={value!r}")
    return calibrate_noise_multiplier(
        target_epsilon=budget_epsilon,
        delta=delta,
        sample_rate=sample_rate,
        steps=steps_per_round * rounds,
        accountant=accountant,
        epsilon_tolerance=epsilon_tolerance,
    )
