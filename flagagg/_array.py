"""Array glue: namespaces, devices, the dtype policy and input coercion.

Every aggregation starts here. :func:`as_stack` turns what the user passed
(a ``(p, n)`` array, ``p`` arrays, or ``p`` pytrees of per-layer arrays) into
a :class:`Stack`: a list of leaves, each holding the ``p`` workers' values of
one pytree leaf, either as one 2-D block (a view of the input) or as ``p``
flattened rows. Nothing is concatenated or converted: kernels see blocks of
shape ``(p, m)`` and the output is rebuilt in the input's structure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from array_api_compat import (
    array_namespace,
    device,
    is_array_api_obj,
    is_cupy_array,
    is_numpy_array,
    is_torch_array,
)

__all__ = ["Leaf", "Stack", "array_library", "as_stack", "dtype_name", "to_numpy"]

Array = Any

# Rows gathered into one temporary block when a leaf is given as p separate
# arrays: about 4 MiB of float64 per block, so it stays in cache.
_CHUNK_BYTES = 1 << 22


def chunk_columns(p: int, nbytes: int = _CHUNK_BYTES) -> int:
    """Number of columns of a ``(p, m)`` float64 chunk of about ``nbytes`` (4 MiB)."""
    return max(1024, nbytes // (8 * max(p, 1)))


def array_library(x: Array) -> str:
    """Short name of the library of ``x``: numpy, torch, cupy or the namespace's module."""
    if is_numpy_array(x):
        return "numpy"
    if is_torch_array(x):
        return "torch"
    if is_cupy_array(x):
        return "cupy"
    return array_namespace(x).__name__


def to_numpy(x: Array) -> np.ndarray:
    """Copy a small array (a ``p x p`` matrix, say) to a host NumPy array."""
    if is_numpy_array(x):
        return x
    if is_torch_array(x):
        return x.detach().cpu().numpy()
    if is_cupy_array(x):
        return x.get()
    try:
        return np.from_dlpack(x)
    except (TypeError, RuntimeError, BufferError, AttributeError):
        return np.asarray(x)


def dtype_name(xp: Any, dtype: Any) -> str:
    """Name of ``dtype`` (``"float32"``...) in namespace ``xp``, the same for every library."""
    # torch and cupy dtypes print differently; compare against the namespace's own.
    for name in ("float64", "float32", "float16", "bfloat16"):
        if hasattr(xp, name) and dtype == getattr(xp, name):
            return name
    return str(dtype).replace("torch.", "")


def _is_float(xp: Any, dtype: Any) -> bool:
    return dtype_name(xp, dtype) in ("float64", "float32", "float16", "bfloat16")


def _check_dtype(xp: Any, x: Array, where: str) -> Array:
    """Return ``x`` with a real floating dtype, promoting integers and bools."""
    if _is_float(xp, x.dtype):
        return x
    if xp.isdtype(x.dtype, ("integral", "bool")) if hasattr(xp, "isdtype") else False:
        # Like np.mean: integer gradients are averaged in the default float.
        return xp.astype(x, xp.float64)
    raise TypeError(
        f"{where} has dtype {dtype_name(xp, x.dtype)}; flagagg aggregates real "
        "floating-point gradients (float16, bfloat16, float32, float64); cast it first"
    )


@dataclass
class Leaf:
    """One pytree leaf of all ``p`` workers.

    Exactly one of ``block`` (a ``(p, m)`` array) and ``rows`` (``p``
    flattened 1-D arrays of length ``m``) is set.
    """

    shape: tuple[int, ...]
    dtype_name: str
    block: Array | None = None
    rows: list[Array] | None = None

    @property
    def size(self) -> int:
        """Number of coordinates ``m`` of this leaf."""
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass
class Stack:
    """The ``p`` inputs of one aggregation, as leaves plus the structure to rebuild.

    Attributes
    ----------
    p : int
        Number of inputs (workers).
    leaves : list of Leaf
        The leaves in flattening order.
    xp : module
        The array namespace (array-api-compat wrapped) of the inputs.
    library : str
        ``"numpy"``, ``"torch"``, ``"cupy"`` or another namespace's name.
    device : object
        The inputs' device.
    """

    p: int
    leaves: list[Leaf]
    xp: Any
    library: str
    device: Any
    sample: Array
    unflatten: Callable[[list[Array]], Any] = field(repr=False)

    @property
    def n(self) -> int:
        """Total number of coordinates per input."""
        return sum(leaf.size for leaf in self.leaves)

    def blocks(self, leaf: Leaf) -> Iterator[tuple[int, int, Array]]:
        """Yield ``(start, stop, block)`` column blocks of ``leaf`` of shape ``(p, stop-start)``.

        A leaf given as one block is yielded whole; a leaf given as ``p`` rows
        is gathered a cache-sized chunk at a time, never as a full copy.
        """
        if leaf.block is not None:
            yield 0, leaf.size, leaf.block
            return
        step = chunk_columns(self.p)
        for start in range(0, leaf.size, step):
            stop = min(start + step, leaf.size)
            yield start, stop, self.xp.stack([row[start:stop] for row in leaf.rows], axis=0)

    def gram(self, backend: Any) -> np.ndarray:
        """Float64 Gram matrix ``K = G G^T`` of the inputs, summed over leaves and blocks."""
        K = np.zeros((self.p, self.p))
        # Non-finite rows are expected here: they are detected on the diagonal
        # and excluded by the rules, so NumPy's warnings would only be noise.
        with np.errstate(invalid="ignore", over="ignore"):
            for leaf in self.leaves:
                if leaf.block is not None:
                    K += backend.gram(leaf.block)
            row_leaves = self.row_leaves()
            if row_leaves:
                K += backend.gram_rows(row_leaves)
        return K

    def combine(self, backend: Any, coef: np.ndarray) -> Any:
        """Return ``sum_i coef[i] * g_i`` in the input's structure, library, device and dtype."""
        coef = np.ascontiguousarray(coef, dtype=np.float64)
        return self.map_leaves(lambda block: backend.combine(coef, block),
                               lambda leaves: backend.combine_rows(coef, leaves))

    def row_leaves(self) -> list[list[Array]]:
        """The rows of every leaf given as ``p`` rows, in leaf order."""
        return [leaf.rows for leaf in self.leaves if leaf.rows is not None]

    def coordinate_stat(self, backend: Any, rows: np.ndarray, center: str, trim: int,
                        k: int) -> Any:
        """The per-coordinate statistic of the inputs ``rows``, in the input's structure."""
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        return self.map_leaves(
            lambda block: backend.coordinate_stat(block, rows, center, trim, k),
            lambda leaves: backend.coordinate_stat_rows(leaves, rows, center, trim, k))

    def map_leaves(self, block_fn: Callable[[Array], Array],
                   rows_fn: Callable[[list[list[Array]]], list[Array]]) -> Any:
        """Apply a column-wise kernel to every leaf and rebuild the input's structure.

        ``block_fn(block) -> (m,) array`` runs on each leaf given as one
        block; ``rows_fn(leaves) -> list of (m,) arrays`` runs once on all
        leaves given as rows (so the per-row kernels see them together).
        Each output is cast to its leaf's dtype and reshaped.
        """
        row_leaves = self.row_leaves()
        row_outs = iter(rows_fn(row_leaves) if row_leaves else [])
        outs = [block_fn(leaf.block) if leaf.block is not None else next(row_outs)
                for leaf in self.leaves]
        return self._finish(outs)

    def _finish(self, outs: list[Array]) -> Any:
        xp = self.xp
        shaped = []
        for leaf, out in zip(self.leaves, outs, strict=True):
            target = getattr(xp, leaf.dtype_name)
            if out.dtype != target:
                out = xp.astype(out, target)
            shaped.append(xp.reshape(out, leaf.shape))
        return self.unflatten(shaped)

    def map_columns(self, fn: Callable[[Array], Array]) -> Any:
        """Apply a column-wise kernel ``fn(block) -> (m,) array`` to every leaf.

        Blocks of a leaf given as ``p`` rows are filled into one output per
        leaf; each output is cast to its leaf's dtype, reshaped, and the
        whole is rebuilt in the input's structure.
        """
        xp = self.xp
        outs = []
        for leaf in self.leaves:
            if leaf.block is not None:
                out = fn(leaf.block)
            else:
                out = None
                for start, stop, block in self.blocks(leaf):
                    part = fn(block)
                    if out is None:
                        out = xp.empty((leaf.size,), dtype=part.dtype, device=self.device)
                    out[start:stop] = part
            target = getattr(xp, leaf.dtype_name)
            if out.dtype != target:
                out = xp.astype(out, target)
            outs.append(xp.reshape(out, leaf.shape))
        return self.unflatten(outs)


def _is_array(x: Any) -> bool:
    return is_array_api_obj(x) and hasattr(x, "shape")


def _flatten(tree: Any, path: str, out: list[tuple[str, Array]]) -> Callable[[Iterator], Any]:
    """Flatten a pytree into ``out``; return a function rebuilding it from leaves."""
    if _is_array(tree):
        out.append((path, tree))
        return lambda it: next(it)
    if isinstance(tree, Mapping):
        keys = list(tree)
        builders = [_flatten(tree[k], f"{path}[{k!r}]", out) for k in keys]
        kind = type(tree) if type(tree) is not dict else dict

        def build_map(it: Iterator) -> Any:
            return kind((k, b(it)) for k, b in zip(keys, builders, strict=True))

        return build_map
    if isinstance(tree, (list, tuple)):
        builders = [_flatten(item, f"{path}[{i}]", out) for i, item in enumerate(tree)]
        kind = list if isinstance(tree, list) else tuple

        def build_seq(it: Iterator) -> Any:
            return kind(b(it) for b in builders)

        return build_seq
    raise TypeError(
        f"unsupported leaf {path or 'input'} of type {type(tree).__name__}: pytree leaves "
        "must be arrays (NumPy, PyTorch, CuPy or array-API); containers may be lists, "
        "tuples or dicts"
    )


def _structure(tree: Any) -> Any:
    if _is_array(tree):
        return None
    if isinstance(tree, Mapping):
        return (dict, tuple((k, _structure(v)) for k, v in tree.items()))
    return (type(tree).__name__, tuple(_structure(v) for v in tree))


def _common_namespace(arrays: Sequence[Array]) -> Any:
    try:
        return array_namespace(*arrays)
    except TypeError as exc:
        libs = sorted({type(a).__module__.split(".")[0] for a in arrays})
        raise TypeError(
            f"inputs mix array libraries ({', '.join(libs)}); pass arrays of one library, "
            "nothing is converted silently"
        ) from exc


def _check_devices(arrays: Sequence[Array]) -> Any:
    dev = device(arrays[0])
    for a in arrays[1:]:
        if device(a) != dev:
            raise ValueError(f"inputs live on different devices ({dev} and {device(a)})")
    return dev


def as_stack(gradients: Any) -> Stack:
    """Coerce the inputs of an aggregation into a :class:`Stack`.

    Parameters
    ----------
    gradients : array of shape (p, n) or (p, ...), or sequence of p arrays or pytrees
        A 2-D (or higher) array whose first axis indexes the inputs; or ``p``
        arrays of one shape; or ``p`` pytrees (nested lists, tuples or dicts
        of arrays) of one structure. Nested Python lists of numbers are read
        with :func:`numpy.asarray`.

    Returns
    -------
    stack : Stack

    Raises
    ------
    ValueError
        No inputs, no coordinates, ragged shapes, mismatched pytrees or devices.
    TypeError
        Mixed array libraries, non-array leaves, complex or other non-real dtypes.
    """
    if _is_array(gradients):
        return _stack_from_array(gradients)
    if isinstance(gradients, Mapping) or not isinstance(gradients, Sequence) or isinstance(
        gradients, (str, bytes)
    ):
        raise TypeError(
            "gradients must be an array of shape (p, n) or a sequence of p arrays or "
            f"pytrees; got {type(gradients).__name__}"
        )
    if len(gradients) == 0:
        raise ValueError("need at least one input (p >= 1); got an empty sequence")
    first = gradients[0]
    if isinstance(first, (int, float, np.number)) or (
        isinstance(first, (list, tuple)) and first and isinstance(first[0], (int, float, np.number))
    ):
        # Nested Python lists of numbers, as np.mean accepts them.
        return _stack_from_array(np.asarray(gradients))
    return _stack_from_trees(list(gradients))


def _stack_from_array(G: Array) -> Stack:
    xp = array_namespace(G)
    if G.ndim < 2:
        raise ValueError(
            f"expected an array of shape (p, n) with one row per input; got shape "
            f"{tuple(G.shape)}. For a single input use G[None, :]"
        )
    p = int(G.shape[0])
    if p == 0:
        raise ValueError("need at least one input (p >= 1); got an array with 0 rows")
    G = _check_dtype(xp, G, "gradients")
    leaf_shape = tuple(int(s) for s in G.shape[1:])
    m = int(np.prod(leaf_shape, dtype=np.int64))
    if m == 0:
        raise ValueError(f"inputs have no coordinates (shape {tuple(G.shape)})")
    block = G if G.ndim == 2 else xp.reshape(G, (p, m))
    leaf = Leaf(leaf_shape, dtype_name(xp, G.dtype), block=block)
    return Stack(p, [leaf], xp, array_library(G), device(G), G, lambda outs: outs[0])


def _stack_from_trees(trees: list[Any]) -> Stack:
    p = len(trees)
    flat0: list[tuple[str, Array]] = []
    unflatten_tree = _flatten(trees[0], "", flat0)
    if not flat0:
        raise ValueError("the inputs hold no arrays")
    structure0 = _structure(trees[0])
    per_worker = [[a for _, a in flat0]]
    for i, tree in enumerate(trees[1:], start=1):
        flat: list[tuple[str, Array]] = []
        _flatten(tree, "", flat)
        if _structure(tree) != structure0:
            raise ValueError(
                f"input {i} has a different structure from input 0; every pytree must have "
                f"the same containers and keys (input 0 has leaves "
                f"{[path for path, _ in flat0][:8]}, "
                f"input {i} has {[path for path, _ in flat][:8]})"
            )
        per_worker.append([a for _, a in flat])
    everything = [a for arrays in per_worker for a in arrays]
    xp = _common_namespace(everything)
    dev = _check_devices(everything)
    leaves = []
    for j, (path, a0) in enumerate(flat0):
        shape = tuple(int(s) for s in a0.shape)
        name = path or "input"
        rows = []
        for i in range(p):
            a = per_worker[i][j]
            if tuple(a.shape) != shape:
                raise ValueError(
                    f"ragged inputs: input {i}{path} has shape {tuple(a.shape)}, "
                    f"input 0{path} has shape {shape}"
                )
            if a.dtype != a0.dtype:
                raise TypeError(
                    f"input {i}{path} has dtype {dtype_name(xp, a.dtype)}, input 0{path} has "
                    f"{dtype_name(xp, a0.dtype)}; give every input's leaf the same dtype"
                )
            a = _check_dtype(xp, a, f"{name} of input {i}")
            rows.append(xp.reshape(a, (-1,)))
        if int(np.prod(shape, dtype=np.int64)) == 0:
            continue
        leaves.append(Leaf(shape, dtype_name(xp, rows[0].dtype), rows=rows))
    if not leaves:
        raise ValueError("inputs have no coordinates (every leaf is empty)")

    def unflatten(outs: list[Array]) -> Any:
        # Empty leaves were skipped by the kernels; give them back as empty arrays.
        it_outs = iter(outs)
        full = []
        for _, a0 in flat0:
            if int(np.prod(a0.shape, dtype=np.int64)) == 0:
                full.append(xp.zeros(tuple(a0.shape), dtype=a0.dtype, device=dev))
            else:
                full.append(next(it_outs))
        return unflatten_tree(iter(full))

    return Stack(p, leaves, xp, array_library(flat0[0][1]), dev, flat0[0][1], unflatten)
