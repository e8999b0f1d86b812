"""PyTorch backend (CPU and CUDA): data stays on the tensors' device.

Only the ``p x p`` Gram matrix travels to the host; the combine coefficients
travel back. The kernels are the array-API ones, which torch runs natively.
"""

from __future__ import annotations

from typing import Any

import torch

from ._array_api import ArrayAPIBackend


class TorchBackend(ArrayAPIBackend):
    """Array-API kernels on torch tensors, on their own device."""

    name = "torch"

    def accepts(self, x: Any) -> bool:
        """Accept torch tensors on any device."""
        return isinstance(x, torch.Tensor)


BACKEND = TorchBackend()
