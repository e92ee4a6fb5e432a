"""Tests for server.device: the device shape's DP wrapper, its accounting and its ledger.

No Flower processes: the wrapper is driven directly with FitRes results around the real
legacy FedAvg (as the SecAgg+ workflow calls it: one result per surviving device).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.common import (
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.strategy import FedAvg

from privacy.accounting import combined_noise_multiplier
from privacy.ledger import Ledger, read_ledger, verify_chain
from server.device import (
    AccountedAdaptiveClipping,
    CsprngClientManager,
    device_delta,
    plan_device_noise,
)

N, M = 500, 50
DELTA = 2e-4


class _Proxy:
    def __init__(self, cid: str) -> None:
        self.cid = cid


def _results(k: int, *, dim: int, clipped: bool) -> list[Any]:
    """k devices replying the same all-zero parameters (so the aggregate is pure noise)."""
    params = ndarrays_to_parameters([np.zeros(dim, dtype=np.float32)])
    return [
        (
            _Proxy(str(i)),
            FitRes(Status(Code.OK, ""), params, num_examples=1, metrics={"norm_bit": clipped}),
        )
        for i in range(k)
    ]


def _seeded(seed: int = 0) -> Any:
    state = {"n": seed}

    def factory() -> np.random.Generator:
        state["n"] += 1
        return np.random.default_rng(state["n"])

    return factory


def _wrapper(tmp_path: Path, **kw: Any) -> AccountedAdaptiveClipping:
    args: dict[str, Any] = {
        "update_noise_multiplier": 3.0,
        "clipped_count_stddev": 6.0,
        "num_sampled_clients": M,
        "population": N,
        "delta": DELTA,
        "ledger": Ledger(tmp_path / "ledger" / "server.jsonl"),
        "initial_clipping_norm": 1.0,
        "rng_factory": _seeded(),
    }
    args.update(kw)
    return AccountedAdaptiveClipping(FedAvg(), **args)


def _direct_epsilon(*, z_u: float, sigma_b: float, rounds: int, delta: float = DELTA) -> float:
    """Independent dp_accounting RDP: replace-one, w/o replacement, sum (2C) + count (1)."""
    import dp_accounting

    inner = dp_accounting.ComposedDpEvent(
        [dp_accounting.GaussianDpEvent(z_u / 2.0), dp_accounting.GaussianDpEvent(sigma_b)]
    )
    acc = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(N, M, inner), rounds)
    return float(acc.get_epsilon(delta))


def _aggregate(strategy: AccountedAdaptiveClipping, rnd: int, results: list[Any]) -> np.ndarray:
    strategy.clip_by_round[rnd] = strategy.clipping_norm  # what configure_fit records
    params, _ = strategy.aggregate_fit(rnd, results, [])
    assert params is not None
    return parameters_to_ndarrays(params)[0]


# ------------------------------------------------------------------ finding 5
def test_noise_uses_the_clip_norm_the_devices_clipped_to(tmp_path: Path) -> None:
    # Regression (issue 15 finding 5): Flower 1.42 updates the clip norm first and noises the
    # aggregate with the *next* round's norm.
    strategy = _wrapper(tmp_path, clipped_count_stddev=0.5)
    k, dim = M, 200_000

    noise = _aggregate(strategy, 1, _results(k, dim=dim, clipped=True))

    clip_used = 1.0
    sum_std = float(np.std(noise.astype(np.float64))) * k
    assert strategy.clipping_norm != pytest.approx(clip_used, rel=0.05)  # the norm did move
    assert sum_std == pytest.approx(3.0 * clip_used, rel=0.01)
    line = read_ledger(tmp_path / "ledger" / "server.jsonl")[-1]
    assert line["clip_norm"] == clip_used


def test_configure_fit_records_the_norm_sent_to_devices(tmp_path: Path) -> None:
    strategy = _wrapper(tmp_path, initial_clipping_norm=0.7)
    manager = CsprngClientManager()
    for i in range(M):
        manager.register(_Proxy(str(i)))  # type: ignore[arg-type]
    params = ndarrays_to_parameters([np.zeros(3, dtype=np.float32)])

    fit = strategy.configure_fit(4, params, manager)

    assert len(fit) == M
    assert {ins.config["clipping_norm"] for _, ins in fit} == {0.7}
    assert strategy.clip_by_round == {4: 0.7}


def test_clip_norm_moves_towards_the_target_quantile(tmp_path: Path) -> None:
    # Flower's sign makes the norm run away (its bit means "was clipped").
    up = _wrapper(tmp_path / "a", clipped_count_stddev=0.5)
    down = _wrapper(tmp_path / "b", clipped_count_stddev=0.5)

    _aggregate(up, 1, _results(M, dim=4, clipped=True))
    _aggregate(down, 1, _results(M, dim=4, clipped=False))

    assert up.clipping_norm == pytest.approx(math.exp(0.2 * 0.5), rel=0.01)
    assert down.clipping_norm == pytest.approx(math.exp(-0.2 * 0.5), rel=0.01)


def test_clipped_count_is_noised_as_accounted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The count's noise is recovered from the clip-norm updates it drives.
    strategy = _wrapper(tmp_path, clipped_count_stddev=6.0)
    monkeypatch.setattr(strategy, "_account", lambda *_: None)  # accounting: tested below
    gaps = []
    for rnd in range(1, 301):
        before = strategy.clipping_norm
        _aggregate(strategy, rnd, _results(M, dim=1, clipped=True))
        fraction = 0.5 + math.log(strategy.clipping_norm / before) / 0.2
        gaps.append(fraction * M - M)
    assert float(np.std(gaps)) == pytest.approx(6.0, rel=0.12)
    assert abs(float(np.mean(gaps))) < 1.5


def test_fewer_results_than_sampled_keep_the_sum_noise(tmp_path: Path) -> None:
    strategy = _wrapper(tmp_path)
    k = 20
    noise = _aggregate(strategy, 1, _results(k, dim=100_000, clipped=True))
    assert float(np.std(noise.astype(np.float64))) * k == pytest.approx(3.0, rel=0.01)


# ------------------------------------------------------------------ finding 4 + ledger
def test_ledger_states_the_relation_and_an_epsilon_that_covers_both_queries(
    tmp_path: Path,
) -> None:
    # Regression (issue 15 finding 4): main accounted GaussianDpEvent(z) with replace-one,
    # ignoring the 2C sensitivity and the clipped-count query.
    strategy = _wrapper(tmp_path)
    for rnd in (1, 2, 3):
        _aggregate(strategy, rnd, _results(M, dim=8, clipped=rnd % 2 == 0))

    lines = read_ledger(tmp_path / "ledger" / "server.jsonl")
    assert verify_chain(tmp_path / "ledger" / "server.jsonl") == []
    assert [ln["round"] for ln in lines] == [1, 2, 3]
    last = lines[-1]
    assert last["sampling"] == "without-replacement"
    assert last["neighbouring"] == "replace-one"
    assert last["accountant"] == "rdp-wor"
    assert last["delta"] == DELTA
    assert last["sample_rate"] == M / N
    assert f"sampled={M} population={N}" in last["detail"]
    assert last["noise_multiplier"] == pytest.approx(
        combined_noise_multiplier(
            update_noise_multiplier=3.0, clipped_count_stddev=6.0, neighbouring="replace-one"
        )
    )
    independent = _direct_epsilon(z_u=3.0, sigma_b=6.0, rounds=3)
    assert last["epsilon_after"] >= 0.99 * independent
    assert last["epsilon_after"] == pytest.approx(independent, rel=1e-6)


def test_planned_device_run_meets_its_budget_by_independent_recomputation(
    tmp_path: Path,
) -> None:
    # The bar in unit form: device-500, ε=1, 3 rounds, δ capped at 1/(10n).
    delta = device_delta(configured=1e-3, population=N)
    plan = plan_device_noise(target_epsilon=1.0, delta=delta, population=N, sample_size=M, rounds=3)
    strategy = _wrapper(
        tmp_path,
        update_noise_multiplier=plan.update_noise_multiplier,
        clipped_count_stddev=plan.clipped_count_stddev,
        delta=delta,
        max_epsilon=1.0,
    )
    for rnd in (1, 2, 3):
        _aggregate(strategy, rnd, _results(M, dim=8, clipped=False))

    claimed = read_ledger(tmp_path / "ledger" / "server.jsonl")[-1]["epsilon_after"]
    independent = _direct_epsilon(
        z_u=plan.update_noise_multiplier,
        sigma_b=plan.clipped_count_stddev,
        rounds=3,
        delta=delta,
    )
    assert plan.clipped_count_stddev >= max(M / 20, 4 * plan.effective)
    assert claimed >= 0.99 * independent
    assert claimed == pytest.approx(independent, rel=1e-9)
    assert claimed <= 1.0


def test_release_over_budget_is_withheld_and_logged(tmp_path: Path) -> None:
    strategy = _wrapper(tmp_path, max_epsilon=0.01)

    params, metrics = strategy.aggregate_fit(1, _results(M, dim=4, clipped=True), [])

    assert params is None and metrics == {}
    lines = read_ledger(tmp_path / "ledger" / "server.jsonl")
    assert [(ln["mechanism"], ln["steps"], ln["epsilon_after"]) for ln in lines] == [
        ("refusal", 0, 0.0)
    ]
    assert strategy.clipping_norm == 1.0  # the count was not released either


def test_no_results_release_nothing(tmp_path: Path) -> None:
    strategy = _wrapper(tmp_path)
    params, _ = strategy.aggregate_fit(1, [], [RuntimeError("x")])
    assert params is None
    assert not (tmp_path / "ledger" / "server.jsonl").exists() or not read_ledger(
        tmp_path / "ledger" / "server.jsonl"
    )


def test_dropped_devices_still_release_the_survivors_sum_with_full_noise(
    tmp_path: Path,
) -> None:
    # Devices that vanished mid-round (SecAgg+ failures) leave the survivors' sum: released
    # with sum noise z_u * C (mean noise z_u * C / k) and accounted like any round.
    strategy = _wrapper(tmp_path)
    k = M - 7
    strategy.clip_by_round[1] = strategy.clipping_norm
    params, _ = strategy.aggregate_fit(
        1, _results(k, dim=100_000, clipped=True), [RuntimeError("dropped")] * 7
    )
    assert params is not None
    noise = parameters_to_ndarrays(params)[0]
    assert noise.dtype == np.float32
    assert float(np.std(noise.astype(np.float64))) * k == pytest.approx(3.0, rel=0.01)
    assert len(read_ledger(tmp_path / "ledger" / "server.jsonl")) == 1


def test_noise_generator_is_fresh_each_round_by_default(tmp_path: Path) -> None:
    a = _wrapper(tmp_path / "a", rng_factory=None)
    b = _wrapper(tmp_path / "b", rng_factory=None)
    np.random.seed(0)
    first = _aggregate(a, 1, _results(M, dim=16, clipped=True))
    np.random.seed(0)
    second = _aggregate(b, 1, _results(M, dim=16, clipped=True))
    assert not np.array_equal(first, second)


# ------------------------------------------------------------------ δ and sampling
def test_delta_is_capped_at_a_tenth_of_one_over_the_population() -> None:
    assert device_delta(configured=1e-3, population=500) == pytest.approx(2e-4)
    assert device_delta(configured=1e-5, population=500) == 1e-5
    with pytest.raises(ValueError):
        device_delta(configured=1e-5, population=0)


def test_client_manager_samples_distinct_clients_from_the_os_csprng() -> None:
    manager = CsprngClientManager()
    for i in range(100):
        manager.register(_Proxy(str(i)))  # type: ignore[arg-type]

    random.seed(0)
    first = [p.cid for p in manager.sample(10)]
    random.seed(0)
    second = [p.cid for p in manager.sample(10)]

    assert len(set(first)) == 10 and len(set(second)) == 10
    assert first != second  # not the `random` module's (seedable) generator
    assert manager.sample(101, min_num_clients=100) == []
