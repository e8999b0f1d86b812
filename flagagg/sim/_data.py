"""Datasets and their partition across workers.

Datasets that ship with installed packages (scikit-learn's digits and breast
cancer, generated classification data) load offline. MNIST and CIFAR-10 load
only from a path the user gives: flagagg never downloads anything.
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DATASETS", "Dataset", "load_dataset", "partition"]

# name -> (input kind, needs a path)
DATASETS = {
    "digits": ("image", False),
    "breast_cancer": ("tabular", False),
    "synthetic": ("tabular", False),
    "mnist": ("image", True),
    "cifar10": ("image", True),
}


@dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset split into train, validation and test parts.

    Attributes
    ----------
    name : str
    X_train, X_val, X_test : ndarray of float32, shape (m, *input_shape)
        Standardised inputs (statistics from the training part only).
    y_train, y_val, y_test : ndarray of int64, shape (m,)
    n_classes : int
    input_shape : tuple of int
        ``(d,)`` for tabular data, ``(channels, height, width)`` for images.
    """

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    input_shape: tuple

    @property
    def is_image(self) -> bool:
        """Whether the inputs are images of shape (channels, height, width)."""
        return len(self.input_shape) == 3

    def split(self, name):
        """Return ``(X, y)`` of the ``"train"``, ``"val"`` or ``"test"`` part."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test': got {name!r}")
        return getattr(self, f"X_{name}"), getattr(self, f"y_{name}")


def _stratified_split(y, fraction, rng):
    """Indices (keep, held_out) with ``fraction`` of every class held out."""
    keep, held = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(fraction * idx.size))
        held.append(idx[:k])
        keep.append(idx[k:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def _standardise(X_train, others, image):
    """Standardise with training statistics: per feature, or per channel for images."""
    axes = (0, 2, 3) if image else (0,)
    mean = X_train.mean(axis=axes, keepdims=True)
    std = X_train.std(axis=axes, keepdims=True)
    # constant features (e.g. digits' border pixels) would divide by zero
    std = np.where(std > 0, std, 1.0)
    return [((X - mean) / std).astype(np.float32) for X in (X_train, *others)]


def _read_idx(path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _load_mnist(path):
    """MNIST from a ``.npz`` (x_train, y_train, x_test, y_test) or a folder of IDX files."""
    path = Path(path).expanduser()
    hint = (
        "flagagg never downloads data: put the four MNIST IDX files (train-images-idx3-ubyte, "
        "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, optionally "
        ".gz) in a folder, or an mnist.npz with x_train, y_train, x_test, y_test, and pass its path"
    )
    if path.is_file() and path.suffix == ".npz":
        with np.load(path) as z:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(z.files)
            if missing:
                raise ValueError(f"{path} lacks {sorted(missing)}; {hint}")
            parts = [z[k] for k in ("x_train", "y_train", "x_test", "y_test")]
    elif path.is_dir():
        parts = []
        for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                     "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
            found = [p for p in (path / stem, path / f"{stem}.gz") if p.is_file()]
            if not found:
                raise FileNotFoundError(f"MNIST file {stem}[.gz] not found in {path}; {hint}")
            parts.append(_read_idx(found[0]))
    else:
        raise FileNotFoundError(f"no MNIST data at {path}; {hint}")
    x_tr, y_tr, x_te, y_te = parts
    x_tr = x_tr.reshape(-1, 1, 28, 28).astype(np.float64) / 255.0
    x_te = x_te.reshape(-1, 1, 28, 28).astype(np.float64) / 255.0
    return x_tr, y_tr.astype(np.int64), x_te, y_te.astype(np.int64)


def _load_cifar10(path):
    """CIFAR-10 from the python version's folder (``cifar-10-batches-py``)."""
    path = Path(path).expanduser()
    if (path / "cifar-10-batches-py").is_dir():
        path = path / "cifar-10-batches-py"
    hint = (
        "flagagg never downloads data: unpack the python version of CIFAR-10 "
        "(cifar-10-python.tar.gz) and pass the cifar-10-batches-py folder"
    )
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 files {missing} not found in {path}; {hint}")
    xs, ys = [], []
    for n in names:
        # the official batches are pickles; only ever load files you trust
        with open(path / n, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
        xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
    x_tr = np.concatenate(xs[:5]).astype(np.float64) / 255.0
    return x_tr, np.concatenate(ys[:5]), xs[5].astype(np.float64) / 255.0, ys[5]


def load_dataset(name, *, path=None, split_seed=0, test_fraction=0.25,
                 validation_fraction=0.15, max_train=None, n_samples=2000, n_features=20,
                 n_classes=4):
    """Load a dataset and split it into train, validation and test parts.

    Parameters
    ----------
    name : {"digits", "breast_cancer", "synthetic", "mnist", "cifar10"}
        Dataset. ``"mnist"`` and ``"cifar10"`` need ``path``.
    path : str or path-like, optional
        Where MNIST (folder of IDX files or ``.npz``) or CIFAR-10 (python
        batches folder) lie. Nothing is ever downloaded.
    split_seed : int, default=0
        Seed of the (stratified) splits and of the generated data.
    test_fraction : float, default=0.25
        Held-out test fraction, for datasets without an official test set.
    validation_fraction : float, default=0.15
        Fraction of the training part held out for tuning.
    max_train : int, optional
        Keep at most this many training samples (stratified), for quick runs
        on large datasets.
    n_samples, n_features, n_classes : int
        Size of the ``"synthetic"`` data (scikit-learn's ``make_classification``).

    Returns
    -------
    dataset : Dataset
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    for label, frac in (("test_fraction", test_fraction),
                        ("validation_fraction", validation_fraction)):
        if not 0.0 < frac < 1.0:
            raise ValueError(f"{label} must be in (0, 1): got {frac!r}")
    rng = np.random.default_rng(split_seed)
    if DATASETS[name][1] and not path:
        raise ValueError(
            f"dataset {name!r} needs a path to files you downloaded yourself "
            "(flagagg never downloads data)"
        )
    if name in ("mnist", "cifar10"):
        loader = _load_mnist if name == "mnist" else _load_cifar10
        X_tr, y_tr, X_te, y_te = loader(path)
    else:
        from sklearn import datasets as skd

        if name == "digits":
            X, y = skd.load_digits(return_X_y=True)
            X = X.reshape(-1, 1, 8, 8)
        elif name == "breast_cancer":
            X, y = skd.load_breast_cancer(return_X_y=True)
        else:
            X, y = skd.make_classification(
                n_samples=n_samples, n_features=n_features,
                n_informative=max(2, n_features // 2), n_classes=n_classes,
                n_clusters_per_class=1, class_sep=1.0, random_state=split_seed,
            )
        tr, te = _stratified_split(y, test_fraction, rng)
        X_tr, y_tr, X_te, y_te = X[tr], y[tr], X[te], y[te]
    tr, va = _stratified_split(y_tr, validation_fraction, rng)
    X_va, y_va = X_tr[va], y_tr[va]
    X_tr, y_tr = X_tr[tr], y_tr[tr]
    if max_train is not None and max_train < y_tr.size:
        _, keep = _stratified_split(y_tr, max_train / y_tr.size, rng)
        X_tr, y_tr = X_tr[keep], y_tr[keep]
    image = X_tr.ndim == 4
    X_tr, X_va, X_te = _standardise(np.asarray(X_tr, np.float64), [X_va, X_te], image)
    return Dataset(
        name=name,
        X_train=X_tr, y_train=np.asarray(y_tr, np.int64),
        X_val=X_va, y_val=np.asarray(y_va, np.int64),
        X_test=X_te, y_test=np.asarray(y_te, np.int64),
        n_classes=int(max(y_tr.max(), y_te.max()) + 1),
        input_shape=tuple(X_tr.shape[1:]),
    )


def partition(y, n_workers, *, rng, method="iid", alpha=0.5, min_size=1):
    """Split sample indices across workers.

    Parameters
    ----------
    y : ndarray of int, shape (m,)
        Labels of the training samples.
    n_workers : int
        Number of shards.
    rng : numpy.random.Generator or int
        Source of randomness.
    method : {"iid", "dirichlet"}, default="iid"
        ``"iid"``: a random equal split. ``"dirichlet"``: every class is
        spread over the workers in proportions drawn from
        Dirichlet(alpha, ..., alpha); small ``alpha`` (<= 0.5) gives workers
        few classes each (the usual non-iid benchmark).
    alpha : float, default=0.5
        Dirichlet concentration, only for ``method="dirichlet"``.
    min_size : int, default=1
        Every shard gets at least this many samples (moved from the largest
        shards), so that every worker can draw a minibatch.

    Returns
    -------
    shards : list of ndarray of int
        ``n_workers`` sorted index arrays that together cover ``range(m)`` once.
    """
    rng = np.random.default_rng(rng)
    m = int(np.asarray(y).size)
    if n_workers * min_size > m:
        raise ValueError(
            f"cannot give {n_workers} workers {min_size} samples each from {m} samples"
        )
    if method == "iid":
        return [np.sort(s) for s in np.array_split(rng.permutation(m), n_workers)]
    if method != "dirichlet":
        raise ValueError(f"partition method must be 'iid' or 'dirichlet': got {method!r}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0: got {alpha!r}")
    shards = [[] for _ in range(n_workers)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        share = rng.dirichlet(np.full(n_workers, float(alpha)))
        cuts = (np.cumsum(share)[:-1] * idx.size).astype(int)
        for w, part in enumerate(np.split(idx, cuts)):
            shards[w].extend(part.tolist())
    # tiny alpha can leave a shard empty; move samples from the largest shard
    sizes = np.array([len(s) for s in shards])
    while sizes.min() < min_size:
        small, big = int(sizes.argmin()), int(sizes.argmax())
        moved = shards[big].pop(int(rng.integers(len(shards[big]))))
        shards[small].append(moved)
        sizes[small] += 1
        sizes[big] -= 1
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]
