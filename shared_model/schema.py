"""The judged-search schema every fedrank component speaks.

A data set is queries, products and graded judgments. Grades are mapped to a relevance in
[0, 1] by the adapter that read them (WANDS: Exact=1.0, Partial=0.5, Irrelevant=0.0).
No Flower, no torch here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


class DataError(ValueError):
    """Bad input data, with the file, line and problem named.

    Parameters
    ----------
    path
        File that holds the bad input.
    line
        1-based line number in that file (the header is line 1), or ``None`` for whole-file
        problems such as an empty file or a missing column.
    problem
        What is wrong, naming the bad value.
    """

    def __init__(self, path: str | Path, line: int | None, problem: str) -> None:
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class Query:
    """A search query: ``query_id`` is unique within a data set."""

    query_id: str
    text: str


@dataclass(frozen=True)
class Product:
    """A product; ``text()`` is what the encoder sees."""

    product_id: str
    title: str
    product_class: str = ""
    category_path: str = ""
    description: str = ""

    def text(self) -> str:
        """Title, class and category path (and description when present), in that order."""
        parts = [self.title, self.product_class, self.category_path, self.description]
        return " | ".join(p for p in parts if p)

    @property
    def top_category(self) -> str:
        """First level of the category path (``"Furniture"``), or ``""`` when unknown."""
        return self.category_path.split(" / ")[0].strip() if self.category_path else ""


@dataclass(frozen=True)
class Judgment:
    """A human relevance judgment, ``relevance`` in [0, 1]."""

    query_id: str
    product_id: str
    relevance: float


@dataclass(frozen=True)
class JudgedSearchData:
    """Queries, products and judgments, with every judgment's ids resolvable.

    Duplicate (query, product) judgments are resolved by the adapter before this is built
    (WANDS: the maximum grade is kept), so ``judgments`` has one entry per pair.
    """

    queries: Mapping[str, Query]
    products: Mapping[str, Product]
    judgments: tuple[Judgment, ...]
    source: str = ""
    _by_query: dict[str, tuple[Judgment, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        by_query: dict[str, list[Judgment]] = {}
        for j in self.judgments:
            if j.query_id not in self.queries:
                raise ValueError(f"judgment names unknown query_id {j.query_id!r}")
            if j.product_id not in self.products:
                raise ValueError(f"judgment names unknown product_id {j.product_id!r}")
            if not 0.0 <= j.relevance <= 1.0:
                raise ValueError(f"relevance {j.relevance!r} is outside [0, 1]")
            by_query.setdefault(j.query_id, []).append(j)
        self._by_query.update({q: tuple(js) for q, js in by_query.items()})

    @property
    def query_ids(self) -> list[str]:
        """Query ids that have at least one judgment, sorted for reproducibility."""
        return sorted(self._by_query)

    def judged(self, query_id: str) -> tuple[Judgment, ...]:
        """All judgments of one query (its candidate pool), in file order."""
        return self._by_query.get(query_id, ())

    def relevance(self, query_id: str, product_id: str) -> float | None:
        """The judged relevance of a pair, or ``None`` when the pair was not judged."""
        for j in self._by_query.get(query_id, ()):
            if j.product_id == product_id:
                return j.relevance
        return None
