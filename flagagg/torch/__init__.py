"""PyTorch integration: aggregate per-worker gradients into ``.grad``, and a DDP hook.

Imported only on use (``import flagagg.torch``); ``import flagagg`` does not
import torch.

Three ways to use flagagg in a PyTorch training loop, each with its trust
model:

* in one process, call :func:`flagagg.aggregate` on a list of per-worker
  gradient pytrees (the caller is trusted, ``f`` inputs may be arbitrary);
* :func:`aggregate_grads` does that and writes the result into a model's
  ``.grad``, so any ``torch.optim`` optimizer steps on it;
* :func:`ddp_comm_hook` replaces DistributedDataParallel's gradient mean by
  a robust aggregate of all ranks' gradients (see its trust models).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ._ddp import DDPHookState, ddp_comm_hook

__all__ = ["DDPHookState", "aggregate_grads", "collect_grads", "ddp_comm_hook"]


def _named(params: Any) -> list[tuple[str, torch.Tensor]]:
    """``(name, parameter)`` pairs of a module, a name -> parameter mapping or an iterable."""
    if isinstance(params, torch.nn.Module):
        return [(n, q) for n, q in params.named_parameters() if q.requires_grad]
    if isinstance(params, Mapping):
        return list(params.items())
    if isinstance(params, Iterable):
        return [(str(i), q) for i, q in enumerate(params)]
    raise TypeError(
        "params must be a torch.nn.Module, a dict of name -> parameter or an iterable of "
        f"parameters; got {type(params).__name__}"
    )


def collect_grads(params: Any) -> dict[str, torch.Tensor | None]:
    """A detached copy of the current gradients, one entry per parameter.

    Parameters
    ----------
    params : torch.nn.Module, dict or iterable of parameters
        For a module, its parameters that require gradients, by name.

    Returns
    -------
    grads : dict of str to Tensor or None
        ``None`` where a parameter has no gradient (frozen or unused): the
        aggregation keeps ``None`` there when every worker has ``None``.
    """
    return {n: None if q.grad is None else q.grad.detach().clone() for n, q in _named(params)}


def aggregate_grads(params: Any, gradients: list, rule: str = "flag", *,
                    backend: str | None = None, **rule_params: Any) -> Any:
    """Aggregate per-worker gradients robustly and write the result into ``.grad``.

    Parameters
    ----------
    params : torch.nn.Module, dict or iterable of parameters
        The parameters whose ``.grad`` receives the aggregate.
    gradients : list of p gradient sets
        One per worker: a dict name -> tensor (or None) with the names of
        ``params`` (as :func:`collect_grads` returns, keys in any order), or a
        list in the order of ``params``.
    rule : str, default="flag"
        Rule name, see :func:`flagagg.available_rules`; ``rule_params`` are
        its parameters (``f``, ``r``, ``pre``...).
    backend : str, optional
        Backend for this call.

    Returns
    -------
    result : AggregationResult or FlagResult
        The full result; ``result.excluded`` names the workers left out,
        ``result.suspects`` the workers found suspect.

    Raises
    ------
    TypeError
        If a gradient set holds parameters (tensors that require grad)
        instead of gradients.
    ValueError
        If a gradient set does not match the parameters, or the rule's
        ``f`` is too large for ``p`` (every rule refuses ``2 f >= p``).

    Notes
    -----
    The aggregate keeps each gradient's dtype and device (CUDA tensors stay
    on the GPU: only the ``p x p`` Gram matrix and ``p`` coefficients cross
    to the host). A ``.grad`` of the right shape, dtype and device is
    overwritten in place; otherwise a new tensor is set. Parameters whose
    gradient is None for every worker keep ``.grad = None``.
    """
    import flagagg

    named = _named(params)
    names = [n for n, _ in named]
    trees = []
    for i, g in enumerate(gradients):
        if isinstance(g, Mapping):
            missing = [n for n in names if n not in g]
            if missing or len(g) != len(names):
                extra = [k for k in g if k not in set(names)]
                raise ValueError(
                    f"gradient set {i} does not match the parameters: missing {missing[:4]}, "
                    f"unknown {extra[:4]}"
                )
            trees.append({n: g[n] for n in names})
        else:
            g = list(g)
            if len(g) != len(names):
                raise ValueError(f"gradient set {i} has {len(g)} entries for {len(names)} "
                                 "parameters")
            trees.append(dict(zip(names, g, strict=True)))
    params_by_id = {id(q) for _, q in named}
    for i, tree in enumerate(trees):
        for n, g in tree.items():
            if isinstance(g, torch.Tensor) and (
                    id(g) in params_by_id or isinstance(g, torch.nn.Parameter)
                    or (g.requires_grad and g.is_leaf)):
                # A parameter where a gradient belongs: aggregating the weights
                # would "work" and silently train on nonsense.
                raise TypeError(
                    f"gradient set {i}, entry {n!r} is a parameter (a tensor that requires "
                    "grad), not a gradient; pass the gradients: flagagg.torch.collect_grads("
                    "model) after loss.backward(), or [q.grad for q in model.parameters()]"
                )
    agg = flagagg.get_rule(rule, **rule_params)
    result = agg(trees, return_result=True, backend=backend)
    with torch.no_grad():
        for n, q in named:
            out = result.aggregate[n]
            if out is None:
                q.grad = None
            elif (q.grad is not None and q.grad.shape == q.shape
                  and q.grad.dtype == q.dtype and q.grad.device == q.device):
                q.grad.copy_(out)
            else:
                q.grad = out.to(dtype=q.dtype, device=q.device).reshape(q.shape).clone()
    return result
