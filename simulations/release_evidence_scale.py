"""Size and speed of a release's memorised evidence at shop scale (synthetic shapes).

``python -m simulations.release_evidence_scale --queries 100000 --pairs-per-query 50
--products 1000000`` packs seeded made-up counts (the values do not matter: size and time
depend only on the shape) as ``evidence.npz`` and reports, per storage dtype: file bytes,
the time to parse it (what a device does once per release), resident bytes of the parsed
arrays, and the p50/p99 time of one seen query's lookup + shrink over 100 candidates.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from shared_model.evidence import DEFAULT_PRIOR
from shared_model.release_evidence import COUNT_DTYPES, ReleaseEvidence


def measure(
    *, queries: int, pairs_per_query: int, products: int, dtype: str, repeats: int, seed: int
) -> dict[str, float | int | str]:
    """One dtype's numbers (see the module docstring)."""
    for name, value in (("queries", queries), ("pairs_per_query", pairs_per_query),
                        ("products", products), ("repeats", repeats)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value!r}")
    rng = np.random.default_rng(seed)
    n = queries * pairs_per_query
    width = len(str(queries))
    keys = [f"synthetic query {i:0{width}d}" for i in range(queries)]
    exam = rng.uniform(0.0, 100.0, n)
    evidence = ReleaseEvidence(
        keys=keys,
        pair_offsets=np.arange(queries + 1, dtype=np.int64) * pairs_per_query,
        product_rows=rng.integers(0, products, n).astype(np.int32),
        clicks=exam * rng.uniform(0.0, 0.5, n), exam=exam,
        prior=DEFAULT_PRIOR, noise_var=4.0, catalog="0" * 64, num_products=products,
        dtype=dtype,
    )
    data = evidence.to_bytes()
    t0 = time.perf_counter()
    parsed = ReleaseEvidence.from_bytes(data)
    parse_s = time.perf_counter() - t0
    resident = sum(a.nbytes for a in (parsed.pair_offsets, parsed.product_rows, parsed.clicks,
                                      parsed.exam))
    times = []
    for _ in range(repeats):
        key = keys[int(rng.integers(queries))]
        entry = parsed.lookup(key)
        assert entry is not None
        # 100 candidates: half of them memorised, half not.
        cands = np.concatenate([entry.product_rows[: min(50, pairs_per_query)],
                                rng.integers(0, products, 50)])
        head = rng.normal(size=len(cands))
        t = time.perf_counter()
        entry = parsed.lookup(key)
        assert entry is not None
        parsed.apply(entry, cands, head)
        times.append(time.perf_counter() - t)
    ms = np.asarray(times) * 1000
    return {
        "dtype": dtype, "queries": queries, "pairs": n, "products": products,
        "file_bytes": len(data), "bytes_per_pair": round(len(data) / n, 2),
        "parse_s": round(parse_s, 3), "resident_bytes": int(resident),
        "lookup_apply_p50_ms": round(float(np.percentile(ms, 50)), 4),
        "lookup_apply_p99_ms": round(float(np.percentile(ms, 99)), 4),
    }


def main() -> None:
    """CLI: one JSON line per storage dtype."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument("--pairs-per-query", type=int, default=50)
    parser.add_argument("--products", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for dtype in COUNT_DTYPES:
        print(json.dumps(measure(queries=args.queries, pairs_per_query=args.pairs_per_query,
                                 products=args.products, dtype=dtype, repeats=args.repeats,
                                 seed=args.seed)))


if __name__ == "__main__":
    main()
