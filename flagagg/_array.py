"""Array glue: namespaces, devices, the dtype policy and input coercion.

Every aggregation starts here. :func:`as_stack` turns what the user passed
(a ``(p, n)`` array, ``p`` arrays, or ``p`` pytrees of per-layer arrays) into
a :class:`Stack`: a list of leaves, each holding the ``p`` workers' values of
one pytree leaf, either as one 2-D block (a view of the input) or as ``p``
flattened rows. Nothing is concatenated or converted: kernels see blocks of
shape ``(p, m)`` and the output is rebuilt in the input's structure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from array_api_compat import (
    device,
    is_array_api_obj,
    is_cupy_array,
    is_numpy_array,
    is_torch_array,
)

from ._gram import stack_gram
from ._namespace import array_namespace

__all__ = ["Leaf", "RowLeaves", "Stack", "array_library", "as_stack", "dtype_name", "to_numpy"]

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
    """Return ``x`` with a real floating dtype, casting integers and bools to float64.

    The one policy for every library and rule: integer and boolean inputs
    are cast to float64 (as ``np.mean`` does) and the output is float64;
    complex and other dtypes are refused with a TypeError.
    """
    if _is_float(xp, x.dtype):
        return x
    if xp.isdtype(x.dtype, ("integral", "bool")) if hasattr(xp, "isdtype") else False:
        # Like np.mean: integer gradients are averaged in the default float.
        return xp.astype(x, xp.float64)
    raise TypeError(
        f"{where} has dtype {dtype_name(xp, x.dtype)}; flagagg aggregates real numbers: "
        "floating-point gradients (float16, bfloat16, float32, float64) keep their dtype, "
        "integer and boolean ones are cast to float64; cast it first"
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


class RowLeaves(list):
    """A list of leaves (each a list of ``p`` rows) with a ``cache`` dict for the backends."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.cache: dict = {}


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

    def gram(self, backend: Any, *, shift: bool = False) -> Any:
        """The float64 Gram matrix ``K = G G^T`` of the inputs, exact where it matters.

        Returns a :class:`flagagg._gram.Gram`: finite inputs are
        never taken for non-finite ones, rows of extreme magnitude are
        handled in a scaled form, and with ``shift`` the Gram may be that of
        the inputs shifted by a central input (only for translation-invariant
        callers). See :func:`flagagg._gram.stack_gram`.
        """
        return stack_gram(self, backend, shift=shift)

    def raw_gram(self, backend: Any, ref: int | None = None,
                 scale: np.ndarray | None = None) -> np.ndarray:
        """One pass of ``backend.gram(block, ref, scale)`` summed over leaves and blocks."""
        K = np.zeros((self.p, self.p))
        kwargs = {} if ref is None and scale is None else {"ref": ref, "scale": scale}
        # Non-finite rows are expected here: they are detected on the diagonal
        # and excluded by the rules, so NumPy's warnings would only be noise.
        with np.errstate(invalid="ignore", over="ignore"):
            for leaf in self.leaves:
                if kwargs:
                    # The shifted or scaled pass (rare: ill-conditioned or extreme
                    # inputs) reads every leaf in stacked chunks; the per-row
                    # kernels have no reference row or scale.
                    for _, _, block in self.blocks(leaf):
                        K += backend.gram(block, **kwargs)
                elif leaf.block is not None:
                    K += backend.gram(leaf.block)
            row_leaves = None if kwargs else self.row_leaves()
            if row_leaves:
                K += backend.gram_rows(row_leaves)
        return K

    def row_absmax(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Largest magnitude of each input in ``rows``, and whether it is all finite.

        Read a cache-sized chunk of columns at a time (never a copy of the
        rows). The maximum of a row holding NaN or Inf is not used.
        """
        xp = self.xp
        rows = np.asarray(rows, dtype=np.int64)
        amax = np.zeros(rows.size)
        finite = np.ones(rows.size, dtype=bool)
        idx = xp.asarray(rows, device=self.device)
        step = chunk_columns(rows.size)
        for leaf in self.leaves:
            for _, _, block in self.blocks(leaf):
                width = block.shape[1]
                for start in range(0, width, step):
                    part = xp.take(block[:, start:min(start + step, width)], idx, axis=0)
                    finite &= to_numpy(xp.all(xp.isfinite(part), axis=1)).astype(bool)
                    amax = np.maximum(amax, to_numpy(xp.max(xp.abs(part), axis=1)).astype(
                        np.float64))
        return amax, finite

    def combine(self, backend: Any, coef: np.ndarray) -> Any:
        """Return ``sum_i coef[i] * g_i`` in the input's structure, library, device and dtype."""
        coef = np.ascontiguousarray(coef, dtype=np.float64)
        return self.map_leaves(lambda block: backend.combine(coef, block),
                               lambda leaves: backend.combine_rows(coef, leaves))

    def row_leaves(self) -> RowLeaves:
        """The rows of every leaf given as ``p`` rows, in leaf order.

        The same object on every call, so that a backend can keep what it
        derives from the rows (address tables) in its ``cache`` between the
        passes of one aggregation.
        """
        cached = self.__dict__.get("_row_leaves")
        if cached is None:
            cached = RowLeaves(leaf.rows for leaf in self.leaves if leaf.rows is not None)
            self.__dict__["_row_leaves"] = cached
        return cached

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


# Types already seen to be arrays: the check runs once per leaf of every input.
_ARRAY_TYPES: set[type] = {np.ndarray}


def _is_array(x: Any) -> bool:
    if type(x) in _ARRAY_TYPES:
        return True
    if is_array_api_obj(x) and hasattr(x, "shape"):
        _ARRAY_TYPES.add(type(x))
        return True
    return False


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


def _path_text(path: tuple) -> str:
    return "".join(f"[{k!r}]" for k in path)


def _register_container(kind: type) -> None:
    """Teach optree a Mapping or Sequence type it does not know, rebuilt as its own type."""
    import optree

    if issubclass(kind, Mapping):
        def flatten(tree: Any) -> tuple:
            keys = list(tree)
            try:
                # Like dicts in optree: the same keys in any order flatten alike.
                keys = sorted(keys)
            except TypeError:
                pass
            return [tree[k] for k in keys], tuple(keys), keys

        def unflatten(keys: tuple, children: Any) -> Any:
            return kind(dict(zip(keys, children, strict=True)))
    else:
        def flatten(tree: Any) -> tuple:
            children = list(tree)
            return children, None, list(range(len(children)))

        def unflatten(_: None, children: Any) -> Any:
            return kind(list(children))

    optree.register_pytree_node(kind, flatten, unflatten, namespace=_NAMESPACE)


# optree namespace of the container types flagagg registers itself.
_NAMESPACE = "flagagg"


def _flatten_tree(tree: Any, i: int) -> tuple[list[Any], Any]:
    """Leaves (arrays, ``None`` nodes dropped) and treespec of one input's pytree.

    Dicts, OrderedDicts, defaultdicts, lists, tuples and NamedTuples are
    optree's own; other Mapping and Sequence types are registered on first
    sight so that the output is rebuilt as their type.
    """
    import optree

    while True:
        leaves, spec = optree.tree_flatten(tree, namespace=_NAMESPACE)
        others = [x for x in leaves if not _is_array(x)]
        unknown = {type(x) for x in others
                   if isinstance(x, (Mapping, Sequence)) and not isinstance(x, (str, bytes))}
        if not unknown:
            break
        for kind in unknown:
            _register_container(kind)
    if not others:
        return leaves, spec
    for path, x in zip(optree.tree_paths(tree, namespace=_NAMESPACE), leaves, strict=True):
        if not _is_array(x):
            raise TypeError(
                f"unsupported leaf {_path_text(path) or 'input'} of input {i} of type "
                f"{type(x).__name__}: pytree leaves must be arrays (NumPy, PyTorch, CuPy or "
                "array-API) or None; containers may be lists, tuples, dicts, NamedTuples or "
                "other Mapping/Sequence types"
            )
    return leaves, spec


def _structure_mismatch(tree0: Any, tree: Any, i: int) -> list[int] | None:
    """How input ``i``'s leaves map onto input 0's when only the order of keys differs.

    Returns the permutation (positions in input ``i``'s leaves, in input
    0's order), or raises a ValueError naming the first leaf that differs.
    """
    import optree

    paths0 = optree.tree_paths(tree0, namespace=_NAMESPACE)
    paths = optree.tree_paths(tree, namespace=_NAMESPACE)
    where = {path: j for j, path in enumerate(paths)}
    if len(paths) == len(paths0) and all(path in where for path in paths0):
        return [where[path] for path in paths0]
    none0 = set(optree.tree_paths(tree0, none_is_leaf=True, namespace=_NAMESPACE)) - set(paths0)
    none = set(optree.tree_paths(tree, none_is_leaf=True, namespace=_NAMESPACE)) - set(paths)
    missing = [path for path in paths0 if path not in where]
    extra = [path for path in paths if path not in set(paths0)]
    if missing and missing[0] in none:
        detail = (f"leaf {_path_text(missing[0])} is None in input {i} but an array in input 0; "
                  "a leaf without a gradient (frozen or unused parameter) must be None for every "
                  "input, or pass zeros")
    elif extra and extra[0] in none0:
        detail = (f"leaf {_path_text(extra[0])} is None in input 0 but an array in input {i}; "
                  "a leaf without a gradient (frozen or unused parameter) must be None for every "
                  "input, or pass zeros")
    elif missing:
        detail = f"input {i} has no leaf {_path_text(missing[0])}"
    else:
        detail = f"input 0 has no leaf {_path_text(extra[0])}"
    raise ValueError(
        f"input {i} has a different structure from input 0: {detail} (input 0 has leaves "
        f"{[_path_text(q) for q in paths0][:8]}, input {i} has "
        f"{[_path_text(q) for q in paths][:8]})"
    )


def _namespace_and_device(everything: list[Array]) -> tuple[Any, Any]:
    """The one namespace and device of all leaves (one representative per array type)."""
    kinds: dict[type, Array] = {}
    for a in everything:
        kinds.setdefault(type(a), a)
    xp = _common_namespace(list(kinds.values()))
    if all(kind is np.ndarray for kind in kinds):
        return xp, device(everything[0])
    if is_torch_array(everything[0]):
        devs = {a.device for a in everything}
        if len(devs) > 1:
            first, *others = sorted(devs, key=str)
            raise ValueError(f"inputs live on different devices ({first} and {others[0]})")
        return xp, device(everything[0])
    return xp, _check_devices(everything)


def _flattener(xp: Any, a: Array) -> Callable[[Array], Array]:
    """How to flatten the leaves of arrays like ``a``, decided once per call."""
    # The arrays' own reshape is several times cheaper than the wrapped one.
    if isinstance(a, np.ndarray) or is_torch_array(a) or is_cupy_array(a):
        return lambda x: x.reshape(-1)
    return lambda x: xp.reshape(x, (-1,))


def _stack_from_trees(trees: list[Any]) -> Stack:
    import optree

    p = len(trees)
    flat0, spec0 = _flatten_tree(trees[0], 0)
    if not flat0:
        raise ValueError("the inputs hold no arrays")
    per_worker = [flat0]
    for i, tree in enumerate(trees[1:], start=1):
        flat, spec = _flatten_tree(tree, i)
        if spec != spec0:
            order = _structure_mismatch(trees[0], tree, i)
            flat = [flat[j] for j in order]
        per_worker.append(flat)
    everything = [a for arrays in per_worker for a in arrays]
    xp, dev = _namespace_and_device(everything)
    names: list[str] | None = None
    flat_row = _flattener(xp, flat0[0])
    leaves = []
    for j, a0 in enumerate(flat0):
        shape = tuple(int(s) for s in a0.shape)
        column = [per_worker[i][j] for i in range(p)]
        bad_shape = [i for i, a in enumerate(column) if tuple(a.shape) != shape]
        bad_dtype = [i for i, a in enumerate(column) if a.dtype != a0.dtype]
        if bad_shape or bad_dtype or not _is_float(xp, a0.dtype):
            if names is None:
                names = [_path_text(q) for q in optree.tree_paths(trees[0], namespace=_NAMESPACE)]
            path = names[j]
            if bad_shape:
                i = bad_shape[0]
                raise ValueError(
                    f"ragged inputs: input {i}{path} has shape {tuple(column[i].shape)}, "
                    f"input 0{path} has shape {shape}"
                )
            if bad_dtype:
                i = bad_dtype[0]
                raise TypeError(
                    f"input {i}{path} has dtype {dtype_name(xp, column[i].dtype)}, input 0{path} "
                    f"has {dtype_name(xp, a0.dtype)}; give every input's leaf the same dtype"
                )
            column = [_check_dtype(xp, a, f"{path or 'input'} of input {i}")
                      for i, a in enumerate(column)]
        if math.prod(shape) == 0:
            continue
        rows = [flat_row(a) for a in column]
        leaves.append(Leaf(shape, dtype_name(xp, rows[0].dtype), rows=rows))
    if not leaves:
        raise ValueError("inputs have no coordinates (every leaf is empty)")

    def unflatten(outs: list[Array]) -> Any:
        # Empty leaves were skipped by the kernels; give them back as empty arrays.
        it_outs = iter(outs)
        full = []
        for a0 in flat0:
            if math.prod(a0.shape) == 0:
                full.append(xp.zeros(tuple(a0.shape), dtype=a0.dtype, device=dev))
            else:
                full.append(next(it_outs))
        return optree.tree_unflatten(spec0, full)

    return Stack(p, leaves, xp, array_library(flat0[0]), dev, flat0[0], unflatten)
