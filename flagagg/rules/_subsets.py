"""The exhaustive subset search that MDA and SMEA share: its cost limit, its batches.

Both rules look at every subset of ``p - f`` inputs and keep the best one; they
differ only in what "best" is. What they share is stated here once: when the
search is refused (more than ``max_subsets`` subsets), the order the subsets
come in (lexicographic, so ties go to the lowest indices), the refusal when no
subset is free of non-finite inputs, and the plain mean of the subset kept.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import NoReturn

import numpy as np

__all__ = ["check_subset_budget", "combination_batches", "mean_of_kept", "refuse_no_subset"]


def check_subset_budget(name: str, p: int, f: int, max_subsets: int, cost: str) -> int:
    """Refuse an exact search over more than ``max_subsets`` subsets; return ``C(p, f)``.

    Parameters
    ----------
    name : str
        The rule, for the message.
    p, f : int
        Inputs, and inputs left out.
    max_subsets : int
        The most subsets the rule searches.
    cost : str
        What one subset costs, for the message (how far to raise ``max_subsets``).

    Returns
    -------
    n : int
        ``C(p, f)``.

    Raises
    ------
    ValueError
        If ``C(p, f) > max_subsets``: the exact rule is refused, never approximated.
    """
    n = math.comb(p, f)
    if n > max_subsets:
        raise ValueError(
            f"{name} searches all C(p, f) subsets exactly: C({p}, {f}) = {n} exceeds "
            f"max_subsets={max_subsets}; raise max_subsets ({cost}) or use another rule"
        )
    return n


def combination_batches(p: int, k: int, batch: int) -> Iterator[np.ndarray]:
    """All ``k``-subsets of ``range(p)`` in lexicographic order, ``batch`` rows at a time.

    Yields
    ------
    subsets : ndarray of int64, shape (at most batch, k)
        One subset a row, indices ascending.
    """
    combos = itertools.combinations(range(p), k)
    while True:
        chunk = np.fromiter(itertools.chain.from_iterable(itertools.islice(combos, batch)),
                            dtype=np.int64)
        if chunk.size == 0:
            return
        yield chunk.reshape(-1, k)


def refuse_no_subset(name: str, f: int, p: int, bad: int, what: str) -> NoReturn:
    """Raise the error for ``bad > f`` inputs that no subset of ``p - f`` can leave out.

    ``what`` says what is wrong with them ("hold NaN or Inf", ...).
    """
    raise ValueError(
        f"{name}: more than f={f} inputs {what} ({bad} of p={p}); every subset of p - f "
        "inputs contains one"
    )


def mean_of_kept(kept: np.ndarray, p: int) -> np.ndarray:
    """The coefficients of the plain mean of the inputs ``kept`` (zero elsewhere)."""
    coef = np.zeros(p)
    coef[kept] = 1.0 / kept.size
    return coef
