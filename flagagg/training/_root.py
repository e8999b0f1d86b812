"""The server's root dataset and the reference gradient FLTrust needs.

FLTrust (Cao et al., NDSS 2021) trusts a worker by the cosine of its
gradient with the server's own gradient, computed at the same parameters on
a small clean *root dataset* the server holds. :class:`RootGradient` is that
server-side computation for the simulated cluster: a root sample of the
training data drawn from its own random stream (so the workers' shards,
minibatches and attacks stay those of the same run without it), and one
minibatch gradient on it per round, as every worker computes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

from .._validation import check_int

__all__ = ["RootGradient", "needs_reference"]


def needs_reference(rule: Any) -> bool:
    """Whether ``rule`` declares the server's reference gradient as a per-call input (FLTrust).

    Read from the rule's contract (``contract.call_inputs``, through
    ``rule.call_inputs``, which a composed rule takes from its rule); a plain
    callable that is not a flagagg rule needs none.
    """
    return "reference" in getattr(rule, "call_inputs", {})


class RootGradient:
    """Minibatch gradients of the server's root dataset, one per round.

    Parameters
    ----------
    replica : flagagg.training._replica.Replica
        The run's replica: its model, parameter shapes, training data and
        device.
    size : int, default=100
        Examples in the root dataset, drawn without replacement from the
        training split (Cao et al. use 100). At most the training split.
    batch_size : int or None, default=None
        Examples per round's minibatch, drawn with replacement from the root
        dataset, as the workers draw theirs; None: the whole root dataset
        every round.
    seed : int, default=0
        The run's seed. The root stream is spawned from it apart from the
        replica's four streams, so adding a server reference changes nothing
        else in the run.

    Attributes
    ----------
    indices : ndarray of int64, shape (size,)
        The root examples, as indices into the training split.
    """

    def __init__(self, replica: Any, *, size: int = 100, batch_size: int | None = None,
                 seed: int = 0) -> None:
        m = int(replica.X_train.shape[0])
        size = check_int("size", size, owner="root dataset", low=1)
        if size > m:
            raise ValueError(f"the root dataset cannot be larger than the training split: "
                             f"got size={size}, {m} training examples")
        self.batch_size = check_int("batch_size", batch_size, owner="root dataset", low=1,
                                    none=True)
        # SeedSequence(seed).spawn(4) gives the replica's streams; the fifth child
        # (spawn key (4,)) is a stream of its own, independent of those four.
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(4,)))
        self.indices = np.sort(rng.choice(m, size=size, replace=False))
        self._rng = rng
        self._replica = replica
        net, shapes = replica.net, replica.shapes

        def loss(flat, x, y):
            params, start = {}, 0
            for name, shape, n in shapes:
                params[name] = flat[start:start + n].view(shape)
                start += n
            return F.cross_entropy(functional_call(net, params, (x,)), y)

        self._grad = grad(loss)

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        """The root minibatch gradient at the parameters ``flat``, shape (n_params,), float32."""
        idx = self.indices
        if self.batch_size is not None:
            idx = idx[(self._rng.random(self.batch_size) * idx.size).astype(np.int64)]
        sel = torch.from_numpy(idx).to(self._replica.X_train.device)
        x, y = self._replica.X_train[sel], self._replica.y_train[sel]
        return self._grad(flat, x, y).detach().to(torch.float32)

    def bind(self, rule: Any, flat: torch.Tensor, array: str = "numpy") -> Any:
        """``rule`` with this round's reference gradient at ``flat``, in the rows' library.

        Parameters
        ----------
        rule : callable
            A rule that takes ``reference=`` (see :func:`needs_reference`).
        flat : torch.Tensor
            The round's parameters.
        array : {"numpy", "torch"}
            The library of the rows the rule will be called on: a float32
            NumPy array on the CPU, or a float32 tensor on the replica's
            device (``simulate``'s ``array``).

        Returns
        -------
        callable
            ``rows, **kwargs -> rule(rows, reference=g0, **kwargs)``.
        """
        if array not in ("numpy", "torch"):
            raise ValueError(f"array must be 'numpy' or 'torch': got {array!r}")
        g0 = self(flat)
        ref = g0.cpu().numpy() if array == "numpy" else g0

        def with_reference(rows: Any, **kwargs: Any) -> Any:
            return rule(rows, reference=ref, **kwargs)

        with_reference.reference = ref  # type: ignore[attr-defined]
        return with_reference
