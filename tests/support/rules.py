"""Calling any registered rule: the per-call inputs a rule declares, made for the inputs.

A rule may declare inputs it needs on every call besides the gradients
(``contract.call_inputs``: FLTrust's server reference). The tests that loop
over every rule call it through :func:`call`, so such a rule is exercised on
the same inputs as the others, with what a server would give it.
"""

from __future__ import annotations

from typing import Any

import flagagg
from flagagg._array import as_stack

__all__ = ["aggregate", "call", "call_inputs", "reference_like"]


def reference_like(gradients: Any, honest: Any = None) -> Any:
    """A trusted reference shaped like one input of ``gradients`` (library, dtype, device).

    The coordinate-wise median of ``honest`` (default: ``gradients``), as a
    server's clean gradient would point; where no input is finite (a test of
    all-NaN inputs), a vector of ones, so the rule itself meets the inputs.
    """
    try:
        return flagagg.get_rule("median")(gradients if honest is None else honest)
    except ValueError:
        stack = as_stack(gradients)
        xp = stack.xp
        ones = [xp.ones((leaf.size,), dtype=getattr(xp, leaf.dtype_name), device=stack.device)
                for leaf in stack.leaves]
        return stack._finish(ones)


def call_inputs(rule: Any, gradients: Any, honest: Any = None) -> dict[str, Any]:
    """The per-call inputs ``rule`` needs (``rule.missing_inputs()``), made for ``gradients``."""
    out = {}
    for name in getattr(rule, "missing_inputs", tuple)():
        if name != "reference":
            raise AssertionError(f"tests/support/rules.py cannot make the per-call input "
                                 f"{name!r} of {rule.name}: teach call_inputs about it")
        out[name] = reference_like(gradients, honest)
    return out


def call(rule: Any, gradients: Any, *, honest: Any = None, **kwargs: Any) -> Any:
    """``rule(gradients, **kwargs)`` with the per-call inputs the rule declares."""
    return rule(gradients, **call_inputs(rule, gradients, honest), **kwargs)


def aggregate(gradients: Any, rule: str, *, pre: Any = None, backend: str | None = None,
              return_result: bool = False, honest: Any = None, **params: Any) -> Any:
    """:func:`flagagg.aggregate`, with the per-call inputs the rule declares."""
    built = flagagg.get_rule(rule, pre=pre, **params)
    return call(built, gradients, honest=honest, backend=backend, return_result=return_result)
