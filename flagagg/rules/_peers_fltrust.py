"""FLTrust (Cao, Fang, Liu and Gong, NDSS 2021): trust from a server-held reference gradient.

The server computes a reference gradient ``g0`` on a small clean root dataset
it holds; every input gets the trust score ``ReLU(cos(g_i, g0))``, is rescaled
to the reference's norm, and the output is the trust-weighted average. Only
inner products are needed: the Gram matrix of ``[g_1, ..., g_p, g0]`` (one
pass) and one combination pass.

The reference is given on each call, ``rule(G, reference=g0)`` (or once to
the constructor, ``get_rule("fltrust", reference=g0)``); it must be shaped
like one input, in the inputs' library, dtype and device.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._array import Stack, as_stack
from .._validation import Anything
from ..backends import Backend
from ._base import NothingLeftError, Rule, append_input
from ._contract import F_OPTIONAL, Bound, Contract, Outcome, Reference, Solution

__all__ = ["FLTrust", "check_reference"]

def check_reference(stack: Stack, reference: Any, owner: str) -> None:
    """Raise unless ``reference`` is like one input of ``stack``: shape, library, dtype, device.

    Raises
    ------
    TypeError
        Missing reference, another array library, another dtype.
    ValueError
        Another shape or another device.
    """
    if reference is None:
        raise TypeError(
            f"{owner} needs the server's reference gradient g0 (computed on its clean root "
            f"dataset): call rule(gradients, reference=g0), or build the rule with "
            f"get_rule({owner!r}, reference=g0)"
        )
    try:
        one = as_stack([reference])
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{owner}: the reference must be shaped like one input: {exc}") from None
    if one.library != stack.library:
        raise TypeError(f"{owner}: the reference is a {one.library} array but the inputs are "
                        f"{stack.library}; nothing is converted silently")
    shapes = [leaf.shape for leaf in one.leaves]
    if shapes != [leaf.shape for leaf in stack.leaves]:
        raise ValueError(f"{owner}: the reference must be shaped like one input: got leaves of "
                         f"shapes {shapes}, inputs have {[leaf.shape for leaf in stack.leaves]}")
    dtypes = [leaf.dtype_name for leaf in one.leaves]
    if dtypes != [leaf.dtype_name for leaf in stack.leaves]:
        raise TypeError(f"{owner}: the reference has dtype {', '.join(dtypes)} but the inputs "
                        f"have {', '.join(leaf.dtype_name for leaf in stack.leaves)}; nothing "
                        "is converted silently")
    if str(one.device) != str(stack.device):
        raise ValueError(f"{owner}: the reference is on device {one.device} but the inputs are "
                         f"on {stack.device}")


class FLTrust(Rule):
    r"""FLTrust: the inputs weighted by their cosine with a trusted reference, rescaled to it.

    Parameters
    ----------
    reference : array or pytree, optional
        A reference gradient used when a call gives none. The usual form is
        per call, ``rule(gradients, reference=g0)``, with ``g0`` computed by
        the server on its root dataset this round.
    f : int, optional
        Byzantine inputs tolerated; the rule does not use it (the trust
        comes from the server, not from a majority) and, when given, only
        checks ``p >= f + 1``.

    Notes
    -----
    Cao, Fang, Liu and Gong, "FLTrust: Byzantine-robust Federated Learning
    via Trust Bootstrapping", NDSS 2021:

    .. math::

        \mathrm{TS}_i = \max(0, \cos(g_i, g_0)), \qquad
        \mathrm{out} = \frac{1}{\sum_j \mathrm{TS}_j}
        \sum_i \mathrm{TS}_i \frac{\|g_0\|}{\|g_i\|} g_i .

    The output is a combination of the inputs; cosines and norms come from
    the Gram matrix of the inputs and ``g0`` (one pass over the data, exact
    for inputs of any magnitude), then one combination pass. When no input
    has a positive trust the output is zero (no client is trusted this
    round), as in the paper. Zero inputs have trust 0.

    NaN policy: inputs holding NaN or Inf have trust 0 and are listed in
    ``result.excluded``; a reference holding NaN or Inf, or a zero
    reference, is a ValueError.

    Examples
    --------
    >>> import numpy as np, flagagg
    >>> G = np.array([[1.0, 0.0], [0.0, 2.0], [-5.0, 0.0]])
    >>> rule = flagagg.get_rule("fltrust")
    >>> rule(G, reference=np.array([1.0, 1.0]), backend="numpy")
    array([0.70710678, 0.70710678])
    """

    name = "fltrust"
    contract = Contract(
        params={"reference": Anything("the server's reference gradient: an array or pytree "
                                      "shaped like one input, or None (then given per call)"),
                "f": F_OPTIONAL},
        bound=Bound(1, 1),
        nan_policy="inputs holding NaN or Inf get trust 0 (result.excluded); a reference "
        "holding NaN or Inf, or a zero reference, is a ValueError",
        cost="one pass for the Gram matrix of the inputs and the reference (O(p² n)), one "
        "combination pass",
        reference=Reference(("Cao", "Fang", "Liu", "Gong"), "FLTrust: Byzantine-robust "
                            "Federated Learning via Trust Bootstrapping", "NDSS", 2021),
        # Inner products with a vector that is not one of the inputs: not the inputs'
        # Gram alone.
        space="vector",
        # Read by generic callers (the Flower strategy, the simulated cluster's root
        # gradient, the tests that loop over every rule) to supply it.
        call_inputs={"reference": "the server's reference gradient g0 (computed on its "
                                  "clean root dataset at the round's parameters)"},
    )

    def __init__(self, reference: Any = None, f: int | None = None) -> None:
        self._store(reference=reference, f=f)

    def __repr__(self) -> str:
        # A gradient-sized reference would fill the repr: say whether there is one.
        ref = "None" if self.reference is None else "<array>"
        return f"{type(self).__name__}(reference={ref}, f={self.f!r})"

    def _solve_stack(self, stack: Stack, backend: Backend) -> Outcome:
        g0 = self.call_input("reference")
        check_reference(stack, g0, self.name)
        p = stack.p
        KA = append_input(stack, g0, self.name).gram(backend)
        if not KA.usable[p]:
            raise ValueError(f"{self.name}: the reference gradient holds NaN or Inf values")
        excluded = tuple((i, why) for i, why in KA.excluded if i < p)
        if not KA.usable[:p].any():
            # As every rule: nothing to aggregate is an error, not a zero output.
            raise NothingLeftError(self.name, p, excluded)
        idx = np.append(np.flatnonzero(KA.usable[:p]), p)
        # Lengths 2^t n and cosines at each vector's own scale: exact at any magnitude.
        n, t, U = KA.relative_unit(idx, None)
        if n[-1] == 0.0:
            raise ValueError(f"{self.name}: the reference gradient is zero; its direction "
                             "cannot give a trust score")
        trust = np.zeros(p)
        trust[idx[:-1]] = np.maximum(U[:-1, -1], 0.0)
        coef = np.zeros(p)
        total = trust.sum()
        if total > 0:
            pos = trust[idx[:-1]] > 0
            k = idx[:-1][pos]
            # ||g0|| / ||g_i|| without forming either norm.
            with np.errstate(over="ignore", under="ignore"):
                ratio = np.ldexp(n[-1] / n[:-1][pos], t[-1] - t[:-1][pos])
            coef[k] = trust[k] * ratio / total
        out = stack.combine(backend, coef)
        sol = Solution(coefficients=coef, excluded=excluded,
                       selected=tuple(int(i) for i in np.flatnonzero(coef)), scores=trust,
                       details={"reference_norm": float(np.ldexp(n[-1], t[-1]))})
        # Each input against the output from the augmented Gram, when a result is asked
        # for: no further pass.
        return Outcome(out, sol, gram=KA)
