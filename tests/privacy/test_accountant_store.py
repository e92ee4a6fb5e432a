"""Tests for privacy.accountant_store: persistence, budget, Opacus bridge."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant

from privacy.accountant_store import (
    AccountantStateError,
    BudgetExhaustedError,
    PersistentAccountant,
    plan_noise_multiplier,
)
from privacy.accounting import epsilon_dp_accounting, epsilon_from_history, epsilon_rdp

DELTA = 1e-5
ROUNDS = [(1.0, 0.01, 100), (1.0, 0.01, 100), (1.3, 0.02, 50), (0.9, 0.01, 80)]


def _store(path: Path, budget: float = 10.0, **kwargs: object) -> PersistentAccountant:
    return PersistentAccountant(path, delta=DELTA, budget_epsilon=budget, **kwargs)  # type: ignore[arg-type]


def _record_all(store: PersistentAccountant) -> float:
    eps = 0.0
    for sigma, q, steps in ROUNDS:
        eps = store.record(noise_multiplier=sigma, sample_rate=q, steps=steps)
    return eps


def test_epsilon_persists_across_restart(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "acct.json"
    first = _store(path)
    eps_before = _record_all(first)

    # Execute
    second = _store(path)

    # Assert
    assert second.epsilon() == eps_before
    assert second.history == first.history
    assert second.total_steps == sum(s for _, _, s in ROUNDS)
    # consecutive identical (sigma, q) events are merged, as Opacus does
    assert second.history[0] == (1.0, 0.01, 200)


def test_recorded_epsilon_matches_independent_recomputation(tmp_path: Path) -> None:
    # Prepare
    store = _store(tmp_path / "acct.json")

    # Execute
    eps = _record_all(store)
    google_rdp = epsilon_dp_accounting(history=ROUNDS, delta=DELTA, method="rdp")
    opacus = RDPAccountant()
    opacus.history = list(ROUNDS)

    # Assert
    assert eps == pytest.approx(google_rdp, rel=0.01)
    assert eps == pytest.approx(opacus.get_epsilon(delta=DELTA), rel=1e-12)
    assert store.epsilon() == eps


def test_budget_exhaustion_raises_and_leaves_state_unchanged(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "acct.json"
    store = _store(path, budget=2.0)
    spent = store.record(noise_multiplier=1.0, sample_rate=0.01, steps=100)
    before = path.read_bytes()
    history_before = store.history

    # Execute
    assert store.would_exceed(noise_multiplier=1.0, sample_rate=0.01, steps=1000)
    with pytest.raises(BudgetExhaustedError) as info:
        store.record(noise_multiplier=1.0, sample_rate=0.01, steps=1000)

    # Assert
    assert isinstance(info.value, RuntimeError)
    message = str(info.value)
    assert f"spent epsilon={spent:.6g}" in message
    assert "budget epsilon=2" in message
    assert f"planned epsilon={info.value.planned_epsilon:.6g}" in message
    assert info.value.planned_epsilon > 2.0
    assert path.read_bytes() == before
    assert store.history == history_before
    assert _store(path, budget=2.0).epsilon() == spent


def test_would_exceed_false_within_budget(tmp_path: Path) -> None:
    # Prepare
    store = _store(tmp_path / "acct.json", budget=3.0)

    # Execute / Assert
    assert not store.would_exceed(noise_multiplier=1.0, sample_rate=0.01, steps=1000)
    assert not (tmp_path / "acct.json").exists()  # planning writes nothing


def test_infinite_budget_accepts_non_private_event(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "acct.json"
    store = _store(path, budget=math.inf)

    # Execute
    eps = store.record(noise_multiplier=0.0, sample_rate=1.0, steps=5)

    # Assert
    assert math.isinf(eps)
    assert json.loads(path.read_text())["budget_epsilon"] == "inf"
    assert math.isinf(_store(path, budget=math.inf).epsilon())


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"",
        b'{"mechanism": "rdp", "delta": 1e-05}',
        b'{"mechanism": "rdp", "delta": 1e-05, "history": [[1.0, 2.0, 3]]}',
    ],
)
def test_corrupt_file_raises_naming_path(tmp_path: Path, content: bytes) -> None:
    # Prepare
    path = tmp_path / "acct.json"
    path.write_bytes(content)

    # Execute / Assert
    with pytest.raises(AccountantStateError, match=str(path)):
        _store(path)
    assert path.read_bytes() == content  # never overwritten


def test_mismatched_delta_or_mechanism_raises(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "acct.json"
    _store(path).record(noise_multiplier=1.0, sample_rate=0.01, steps=10)

    # Execute / Assert
    with pytest.raises(AccountantStateError, match="delta"):
        PersistentAccountant(path, delta=1e-6, budget_epsilon=10.0)
    with pytest.raises(AccountantStateError, match="mechanism"):
        PersistentAccountant(path, delta=DELTA, budget_epsilon=10.0, accountant="prv")


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"delta": 0.0}, "delta=0.0"),
        ({"budget_epsilon": 0.0}, "budget_epsilon=0.0"),
        ({"budget_epsilon": -2.0}, "budget_epsilon=-2.0"),
        ({"accountant": "gdp"}, "accountant='gdp'"),
    ],
)
def test_constructor_validates(tmp_path: Path, kwargs: dict[str, object], bad: str) -> None:
    # Prepare
    args: dict[str, object] = {"delta": DELTA, "budget_epsilon": 1.0}
    args.update(kwargs)

    # Execute / Assert
    with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
        PersistentAccountant(tmp_path / "a.json", **args)  # type: ignore[arg-type]


def test_record_validates_event(tmp_path: Path) -> None:
    store = _store(tmp_path / "acct.json")
    with pytest.raises(ValueError, match="sample_rate=0"):
        store.record(noise_multiplier=1.0, sample_rate=0, steps=1)
    with pytest.raises(ValueError, match="steps=0"):
        store.would_exceed(noise_multiplier=1.0, sample_rate=0.1, steps=0)


def test_state_dict_round_trip(tmp_path: Path) -> None:
    # Prepare
    source = _store(tmp_path / "a.json")
    _record_all(source)
    target = _store(tmp_path / "b.json")

    # Execute
    target.load_state_dict(json.loads(json.dumps(source.state_dict())))

    # Assert
    assert target.history == source.history
    assert target.epsilon() == source.epsilon()
    assert _store(tmp_path / "b.json").epsilon() == source.epsilon()  # persisted


def test_opacus_bridge_with_privacy_engine(tmp_path: Path) -> None:
    # Prepare: one round already spent, then a real PrivacyEngine run attached to the store
    torch.manual_seed(0)
    store = _store(tmp_path / "acct.json")
    store.record(noise_multiplier=1.0, sample_rate=0.01, steps=100)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant = store.to_opacus()
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.2,
        max_grad_norm=1.0,
        poisson_sampling=True,
    )

    # Execute
    for x, y in loader:
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    eps = store.sync_from_opacus(engine.accountant)
    restarted = _store(tmp_path / "acct.json")

    # Assert
    assert isinstance(engine.accountant, RDPAccountant)
    assert restarted.history == [(1.0, 0.01, 100), (1.2, 0.25, len(loader))]
    assert eps == pytest.approx(engine.get_epsilon(DELTA), rel=1e-12)
    assert restarted.epsilon() == eps
    assert eps > epsilon_rdp(noise_multiplier=1.0, sample_rate=0.01, steps=100, delta=DELTA)


def test_sync_merges_repeated_syncs_and_rejects_diverged_history(tmp_path: Path) -> None:
    # Prepare
    store = _store(tmp_path / "acct.json")
    store.record(noise_multiplier=1.0, sample_rate=0.01, steps=10)
    attached = store.to_opacus()

    # Execute
    for _ in range(5):
        attached.step(noise_multiplier=1.0, sample_rate=0.01)
    eps_first = store.sync_from_opacus(attached)
    for _ in range(3):
        attached.step(noise_multiplier=1.0, sample_rate=0.01)
    eps_second = store.sync_from_opacus(attached)
    fresh = RDPAccountant()
    fresh.step(noise_multiplier=1.0, sample_rate=0.01)

    # Assert
    assert store.history == [(1.0, 0.01, 18)]
    assert eps_first < eps_second
    assert store.sync_from_opacus(attached) == eps_second  # nothing new
    with pytest.raises(ValueError, match="to_opacus"):
        store.sync_from_opacus(fresh)


def test_sync_over_budget_records_then_raises(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "acct.json"
    store = _store(path, budget=1.0)
    attached = store.to_opacus()
    attached.history = [(1.0, 0.01, 2000)]  # steps already taken by training

    # Execute / Assert
    with pytest.raises(BudgetExhaustedError, match="already taken"):
        store.sync_from_opacus(attached)
    assert _store(path, budget=1.0).history == [(1.0, 0.01, 2000)]  # not under-reported


def test_plan_noise_multiplier_meets_budget_over_whole_run() -> None:
    # Execute
    sigma = plan_noise_multiplier(
        budget_epsilon=2.0, delta=DELTA, sample_rate=0.02, steps_per_round=50, rounds=10
    )
    eps = epsilon_from_history(history=[(sigma, 0.02, 50)] * 10, delta=DELTA)

    # Assert
    assert 1.99 <= eps <= 2.0
    with pytest.raises(ValueError, match="rounds=0"):
        plan_noise_multiplier(
            budget_epsilon=2.0, delta=DELTA, sample_rate=0.02, steps_per_round=50, rounds=0
        )
    assert (
        plan_noise_multiplier(
            budget_epsilon=math.inf, delta=DELTA, sample_rate=0.02, steps_per_round=5, rounds=2
        )
        == 0.0
    )
