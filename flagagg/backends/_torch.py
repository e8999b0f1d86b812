"""PyTorch backend (CPU and CUDA): data stays on the tensors' device.

On a GPU the kernels are torch's own ops: the Gram matrix is accumulated in
float64 a large chunk of columns at a time (no float64 copy of the input),
the combination is a matrix-vector product over runs of rows with non-zero
coefficients. Only the ``p x p`` Gram matrix travels to the host, and the
``p`` coefficients back.

CPU tensors share their memory with a NumPy view, so they go to the host
kernels without a copy: numba's when it is installed, else NumPy's. On CPU,
torch's chunked float64 Gram of a float32 ``(15, 4e6)`` tensor measured 6x
(4 MiB chunks) to 19x (64 MiB chunks) slower than the numba kernel on the
development machine (MKL on an AMD CPU), which is why torch's own ops are
not used there.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._namespace import array_namespace
from . import _host_backend
from ._array_api import ArrayAPIBackend, _nonzero_runs, symmetric, transformed_chunk
from ._registry import _library_installed
from ._rows import row_tables, scatter

# Dtypes whose CPU tensors NumPy can view without a copy.
_VIEWABLE = (torch.float32, torch.float64, torch.float16)


def _host_view(X: torch.Tensor) -> np.ndarray | None:
    """A NumPy view (no copy) of a CPU tensor, or None when there is none."""
    if X.device.type != "cpu" or X.dtype not in _VIEWABLE:
        return None
    return X.detach().numpy()


def _widened_chunks(X: torch.Tensor):
    """Yield ``(start, stop, chunk)``: float32 NumPy copies of column chunks of a CPU tensor.

    For dtypes NumPy cannot view (bfloat16): widening to float32 is exact,
    and a few MiB at a time never copies the whole input.
    """
    m = X.shape[1]
    step = max(1024, (1 << 22) // (4 * max(X.shape[0], 1)))
    for start in range(0, m, step):
        stop = min(start + step, m)
        yield start, stop, X[:, start:stop].detach().float().numpy()


class TorchBackend(ArrayAPIBackend):
    """Array-API kernels on torch tensors, on their own device."""

    name = "torch"

    # Used on GPUs only (CPU tensors go to the host kernels): chunks large
    # enough that kernel launches are negligible.
    chunk_bytes = 1 << 26

    def accepts(self, x: Any) -> bool:
        """Accept torch tensors on any device."""
        return isinstance(x, torch.Tensor)

    def gram(self, X: torch.Tensor, ref: int | None = None,
             scale: np.ndarray | None = None) -> np.ndarray:
        """Float64 ``X @ X.T`` (shifted/scaled as in :meth:`Backend.gram`).

        Host kernels on CPU; on a GPU chunked float64 ``addmm``.
        """
        view = _host_view(X)
        if view is not None:
            return _host_backend().gram(view, ref, scale)
        if X.device.type == "cpu":
            K = np.zeros((X.shape[0], X.shape[0]))
            for _, _, chunk in _widened_chunks(X):
                K += _host_backend().gram(chunk, ref, scale)
            return K
        return self._gram_device(X, ref, scale)

    def _gram_device(self, X: torch.Tensor, ref: int | None = None,
                     scale: np.ndarray | None = None) -> np.ndarray:
        # torch ops only, on any device (tests run it on CPU tensors). Large p
        # needs no other path here: addmm on a float64 chunk is GEMM already.
        p, m = X.shape
        X = X.detach()
        if ref is None and scale is None and X.dtype == torch.float64:
            return symmetric((X @ X.T).cpu().numpy())
        xp = array_namespace(X)
        s = None if scale is None else torch.as_tensor(
            np.asarray(scale, dtype=np.float64).reshape(p, 1), device=X.device)
        K = torch.zeros((p, p), dtype=torch.float64, device=X.device)
        step = self._step(p)
        for start in range(0, m, step):
            B = transformed_chunk(xp, X[:, start:start + step], ref, s)
            K.addmm_(B, B.T)
        return symmetric(K.cpu().numpy())  # the one device -> host copy (p x p)

    def combine(self, coef: np.ndarray, X: torch.Tensor) -> torch.Tensor:
        """``sum_i coef[i] X[i]`` over non-zero coefficients, on the tensor's device."""
        view = _host_view(X)
        if view is not None:
            return torch.from_numpy(_host_backend().combine(coef, view))
        return self._combine_device(coef, X)

    def _combine_device(self, coef: np.ndarray, X: torch.Tensor) -> torch.Tensor:
        # torch ops only, on any device (tests run it on CPU tensors).
        X = X.detach()
        ct = torch.float64 if X.dtype == torch.float64 else torch.float32
        p, m = X.shape
        runs = _nonzero_runs(coef)
        out = torch.zeros((m,), dtype=ct, device=X.device)
        if not runs:
            return out
        c = torch.as_tensor(np.asarray(coef, dtype=np.float64), dtype=ct).to(X.device)
        low = X.dtype != ct
        step = self._step(p) if low else m
        for start in range(0, m, step):
            stop = min(start + step, m)
            part = out[start:stop]
            for a, b in runs:
                rows = X[a:b, start:stop]
                # out[start:stop] += rows^T c, in place: no temporary of size m per run
                part.addmv_((rows.to(ct) if low else rows).T, c[a:b])
        return out

    def coordinate_stat(self, X: torch.Tensor, rows: np.ndarray, center: str, trim: int,
                        k: int) -> torch.Tensor:
        """Per-column order statistic: host kernels on CPU, a sorting network on a GPU."""
        view = _host_view(X)
        if view is not None:
            return torch.from_numpy(_host_backend().coordinate_stat(view, rows, center, trim, k))
        if X.device.type == "cpu":
            out = torch.empty((X.shape[1],), dtype=torch.float32)
            for start, stop, chunk in _widened_chunks(X):
                out[start:stop] = torch.from_numpy(
                    _host_backend().coordinate_stat(chunk, rows, center, trim, k))
            return out
        return self._coordinate_stat_device(X, rows, center, trim, k)

    def _coordinate_stat_device(self, X: torch.Tensor, rows: np.ndarray, center: str, trim: int,
                                k: int) -> torch.Tensor:
        # torch ops only, on any device (tests run it on CPU tensors): the
        # array-API sorting network, a few hundred elementwise min/max
        # kernels over large chunks; no segmented sort along the short axis
        # (and torch.quantile caps at 16M elements).
        return super().coordinate_stat(X.detach(), rows, center, trim, k)


    # Leaves given as p separate rows (pytrees of per-layer tensors). On CPU
    # the numba per-row kernels read every row in place through its
    # data_ptr(); on a GPU the combination is one fused foreach add per
    # worker over all leaves, and the Gram matrix goes through chunks.

    def gram_rows(self, leaves: list) -> np.ndarray:
        """Float64 Gram matrix summed over leaves given as rows."""
        tables, rest = _cpu_tables(leaves)
        K = np.zeros((len(leaves[0]),) * 2)
        if tables:
            from ._numba import gram_table  # numba is optional: loaded only when installed

            for t in tables:
                K += gram_table(t)
        if rest:
            K += super().gram_rows([leaves[j] for j in rest])
        return K

    def combine_rows(self, coef: np.ndarray, leaves: list) -> list:
        """Per-leaf ``sum_i coef[i] g_i`` of leaves given as rows, on their device."""
        tables, rest = _cpu_tables(leaves)
        flats = []
        if tables:
            from ._numba import combine_table  # numba is optional

            flats = [torch.from_numpy(combine_table(coef, t)) for t in tables]
        fused = [j for j in rest if leaves[j][0].device.type != "cpu"
                 and leaves[j][0].dtype in (torch.float32, torch.float64)]
        generic = [j for j in rest if j not in set(fused)]
        outs = scatter(len(leaves), tables, flats, generic,
                       super().combine_rows(coef, [leaves[j] for j in generic]) if generic
                       else [])
        if fused:
            for j, out in zip(fused, self._combine_rows_device(coef, [leaves[j] for j in fused]),
                              strict=True):
                outs[j] = out
        return outs

    def _combine_rows_device(self, coef: np.ndarray, leaves: list) -> list:
        # torch ops only, on any device (tests run it on CPU tensors). Each
        # worker with a non-zero coefficient is one _foreach_add_ over all
        # leaves: p kernel launches per dtype, no stacked copy.
        outs = [torch.zeros(rows[0].shape, dtype=rows[0].dtype, device=rows[0].device)
                for rows in leaves]
        for i in np.flatnonzero(coef).tolist():
            torch._foreach_add_(outs, [rows[i].detach() for rows in leaves],
                                alpha=float(coef[i]))
        return outs

    def coordinate_stat_rows(self, leaves: list, rows: np.ndarray, center: str, trim: int,
                             k: int) -> list:
        """Per-leaf coordinate statistic of leaves given as rows."""
        tables, rest = _cpu_tables(leaves)
        flats = []
        if tables:
            from ._numba import coordinate_stat_table  # numba is optional

            flats = [torch.from_numpy(coordinate_stat_table(t, rows, center, trim, k))
                     for t in tables]
        others = (super().coordinate_stat_rows([leaves[j] for j in rest], rows, center, trim, k)
                  if rest else [])
        return scatter(len(leaves), tables, flats, rest, others)


_KERNEL_NP = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}


def _cpu_tables(leaves: list) -> tuple[list, list]:
    """Address tables of the CPU float32/float64 leaves when numba is installed; the rest."""
    if not _library_installed("numba"):
        return [], list(range(len(leaves)))
    return row_tables(leaves, _cpu_row_ok, _address, _kernel_dtype)


def _cpu_row_ok(row: torch.Tensor) -> bool:
    return row.device.type == "cpu" and row.dim() == 1 and row.is_contiguous()


def _address(row: torch.Tensor) -> int:
    return row.data_ptr()


def _kernel_dtype(row: torch.Tensor) -> Any:
    return _KERNEL_NP.get(row.dtype)


BACKEND = TorchBackend()
