"""Small embedded datasets for the demos, the tests and the notebooks (no network, ever).

Three sources, one :class:`Dataset` type:

* ``"digits"`` (default): scikit-learn's handwritten digits, 1797 real 8x8 images shipped with
  scikit-learn, split deterministically into train/test (75%/25% by default, stratified by
  class). Images are stored as ``(N, 8, 8, 1)`` (NHWC, Flax's layout).
* ``"mnist1d"``: MNIST-1D (Greydanus, 2020), generated procedurally by the ``mnist1d`` package
  (4000 train / 1000 test sequences of length 40, stored as ``(N, 40, 1)``). Never downloaded.
* a path to a ``.npz`` file holding ``x_train, y_train, x_test, y_test`` (integer labels).

Features are standardised with the *training* mean and standard deviation per feature (a
feature with zero spread, such as the always-blank border pixels of digits, gets std 1).

Batching: :func:`epoch_batches` gives, for one epoch, a ``(num_batches, batch_size)`` table of
sample indices and a boolean mask. The samples are a seeded permutation; the last batch is
*padded* (with index 0) and the padding masked out, so no sample is ever dropped and every
batch has the same shape (one compiled step, ``lax.scan``-able). A masked mean over each batch
gives exactly the gradient of the unpadded partial batch. :func:`iterate_batches` yields the
unpadded batches (the last one shorter) for code that prefers plain arrays.

scikit-learn and mnist1d are imported lazily, only by the loader that needs them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import numpy as np

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "epoch_batches",
    "iterate_batches",
    "load_dataset",
    "split",
    "standardize",
]

DATASETS = ("digits", "mnist1d")


class DataError(ValueError):
    """A dataset name is unknown, or a data file is unreadable or malformed."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A classification dataset held in memory as numpy arrays.

    Attributes:
      name: ``"digits"``, ``"mnist1d"`` or the ``.npz`` path.
      x_train, x_test: float32 inputs, ``(N, ...)`` (standardised unless asked otherwise).
      y_train, y_test: int32 labels in ``[0, num_classes)``.
      num_classes: number of classes (``max label + 1``).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample."""
        return tuple(self.x_train.shape[1:])

    def subset(self, num_train: int | None = None, num_test: int | None = None) -> Dataset:
        """The first ``num_train`` / ``num_test`` samples (for quick runs)."""
        return dataclasses.replace(
            self,
            x_train=self.x_train[:num_train],
            y_train=self.y_train[:num_train],
            x_test=self.x_test[:num_test],
            y_test=self.y_test[:num_test],
        )

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={self.x_train.shape}, test={self.x_test.shape}, "
            f"classes={self.num_classes})"
        )


def split(
    x: np.ndarray, y: np.ndarray, test_fraction: float = 0.25, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic stratified train/test split.

    Each class is shuffled with ``numpy.random.default_rng(seed)`` and its first
    ``round(test_fraction * n_class)`` samples go to the test set; both sets are then returned
    in increasing order of original index, so the result depends only on ``seed``.

    Args:
      x, y: inputs and integer labels, same first dimension.
      test_fraction: fraction of each class held out, in ``(0, 1)``.
      seed: split seed.

    Returns:
      ``(x_train, y_train, x_test, y_test)``.

    Examples:
      >>> import numpy as np
      >>> x, y = np.arange(8.0)[:, None], np.array([0, 0, 0, 0, 1, 1, 1, 1])
      >>> xtr, ytr, xte, yte = split(x, y, test_fraction=0.5, seed=0)
      >>> len(xtr), len(xte), sorted(yte.tolist())
      (4, 4, [0, 0, 1, 1])
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"`test_fraction` must lie in (0, 1); got {test_fraction}.")
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y):
        raise DataError(f"x and y have different lengths: {len(x)} and {len(y)}.")
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        test[idx[: round(test_fraction * len(idx))]] = True
    return x[~test], y[~test], x[test], y[test]


def standardize(
    x_train: np.ndarray, x_test: np.ndarray, eps: float = 1e-8
) -> tuple[np.ndarray, np.ndarray]:
    """Standardises each feature with the training mean and standard deviation.

    Features whose training std is below ``eps`` are only centred (std taken as 1), so no
    division by zero. Computed in float64, returned as float32.

    Examples:
      >>> import numpy as np
      >>> tr, te = standardize(np.array([[1.0, 5.0], [3.0, 5.0]]), np.array([[2.0, 6.0]]))
      >>> tr.tolist(), te.tolist()
      ([[-1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0]])
    """
    xtr = np.asarray(x_train, np.float64)
    mean = xtr.mean(axis=0)
    std = xtr.std(axis=0)
    std = np.where(std < eps, 1.0, std)
    f = lambda a: ((np.asarray(a, np.float64) - mean) / std).astype(np.float32)
    return f(xtr), f(x_test)


def _digits(seed: int, test_fraction: float):
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise DataError(
            "dataset 'digits' needs scikit-learn: pip install 'optax-layca[demo]'."
        ) from e
    d = load_digits()
    x = d.images.astype(np.float32)[..., None]  # (1797, 8, 8, 1), values 0..16
    return split(x, d.target, test_fraction, seed)


def _mnist1d(seed: int):
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise DataError("dataset 'mnist1d' needs the mnist1d package: pip install mnist1d.") from e
    args = get_dataset_args()
    args.seed = int(seed) if seed else args.seed  # seed 0 keeps the package's canonical data
    d = make_dataset(args)  # procedural; never the download path
    x = np.asarray(d["x"], np.float32)[..., None]
    xt = np.asarray(d["x_test"], np.float32)[..., None]
    return x, np.asarray(d["y"]), xt, np.asarray(d["y_test"])


def _npz(path: str):
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f.files]
            if missing:
                raise DataError(
                    f"{path}: missing arrays {missing}; a dataset .npz needs x_train, y_train, "
                    f"x_test, y_test (found {sorted(f.files)})."
                )
            arrays = [np.asarray(f[k]) for k in ("x_train", "y_train", "x_test", "y_test")]
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - BadZipFile, OSError, ValueError (pickles), ...
        raise DataError(f"cannot read {path} as a .npz dataset: {type(e).__name__}: {e}") from None
    xtr, ytr, xte, yte = arrays
    for name, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        if x.ndim < 2 or len(x) == 0:
            raise DataError(f"{path}: x_{name} must have shape (N, ...) with N > 0; got {x.shape}.")
        if y.shape != (len(x),):
            raise DataError(f"{path}: y_{name} must have shape ({len(x)},); got {y.shape}.")
        if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x.astype(np.float64)).all():
            raise DataError(f"{path}: x_{name} must hold finite numbers.")
        if not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
            raise DataError(f"{path}: y_{name} must hold non-negative integer labels.")
    if xtr.shape[1:] != xte.shape[1:]:
        raise DataError(
            f"{path}: x_train and x_test samples differ in shape: "
            f"{xtr.shape[1:]} vs {xte.shape[1:]}."
        )
    if xtr.ndim == 2:  # (N, D) vectors: one channel, so convolutions see (N, D, 1)
        xtr, xte = xtr[..., None], xte[..., None]
    return xtr, ytr, xte, yte


def load_dataset(
    name: str = "digits",
    *,
    seed: int = 0,
    test_fraction: float = 0.25,
    standardized: bool = True,
) -> Dataset:
    """Loads an embedded dataset or a user's ``.npz`` file.

    Args:
      name: ``"digits"``, ``"mnist1d"``, or a path ending in ``.npz`` with arrays ``x_train,
        y_train, x_test, y_test``.
      seed: seed of the train/test split (digits only; mnist1d has its own fixed split and
        uses the seed to generate the data, 0 = the package's canonical data).
      test_fraction: held-out fraction for digits.
      standardized: standardise with the training statistics (:func:`standardize`).

    Returns:
      A :class:`Dataset` (inputs float32 with a trailing channel axis, labels int32).

    Raises:
      DataError: unknown name, unreadable file or malformed arrays (the message names which).

    Examples:
      >>> ds = load_dataset("digits")
      >>> ds
      Dataset('digits', train=(1347, 8, 8, 1), test=(450, 8, 8, 1), classes=10)
      >>> abs(float(ds.x_train.mean())) < 1e-6
      True
    """
    name = os.fspath(name)
    if name == "digits":
        xtr, ytr, xte, yte = _digits(seed, test_fraction)
    elif name == "mnist1d":
        xtr, ytr, xte, yte = _mnist1d(seed)
    elif name.endswith(".npz") or os.path.exists(name):
        if not os.path.isfile(name):
            raise DataError(f"dataset file not found: {name}")
        xtr, ytr, xte, yte = _npz(name)
    else:
        raise DataError(
            f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)} or give a path to a "
            ".npz file with x_train, y_train, x_test, y_test."
        )
    if standardized:
        xtr, xte = standardize(xtr, xte)
    else:
        xtr, xte = xtr.astype(np.float32), xte.astype(np.float32)
    ytr, yte = ytr.astype(np.int32), yte.astype(np.int32)
    num_classes = int(max(ytr.max(), yte.max())) + 1
    return Dataset(name, xtr, ytr, xte, yte, num_classes)


def epoch_batches(
    num_samples: int, batch_size: int, seed: int = 0, epoch: int = 0, shuffle: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Index table and mask for one epoch: every sample exactly once, fixed batch shape.

    The order is a permutation drawn from ``numpy.random.default_rng((seed, epoch))``, so
    each epoch differs and the whole run is reproducible. The last batch, when partial, is
    padded with index 0 and ``mask`` is False there: average the per-sample loss with the mask
    (``sum(mask * loss) / sum(mask)``) and the padded batch gives exactly the gradient of the
    partial batch. Nothing is dropped.

    Args:
      num_samples: dataset size ``N > 0``.
      batch_size: ``B > 0`` (capped at ``N``).
      seed, epoch: permutation seed.
      shuffle: False gives ``0 … N-1`` in order.

    Returns:
      ``(idx, mask)``, int32 and bool arrays of shape ``(ceil(N / B), B)``.

    Examples:
      >>> idx, mask = epoch_batches(5, 2, shuffle=False)
      >>> idx.tolist(), mask.tolist()
      ([[0, 1], [2, 3], [4, 0]], [[True, True], [True, True], [True, False]])
    """
    if num_samples <= 0:
        raise DataError(f"`num_samples` must be positive; got {num_samples}.")
    if batch_size <= 0:
        raise DataError(f"`batch_size` must be positive; got {batch_size}.")
    batch_size = min(batch_size, num_samples)
    order = (
        np.random.default_rng((seed, epoch)).permutation(num_samples)
        if shuffle
        else np.arange(num_samples)
    )
    nb = -(-num_samples // batch_size)
    idx = np.zeros(nb * batch_size, np.int32)
    idx[:num_samples] = order
    mask = np.arange(nb * batch_size) < num_samples
    return idx.reshape(nb, batch_size), mask.reshape(nb, batch_size)


def iterate_batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields ``(x_batch, y_batch)`` for one epoch; the last batch may be shorter (never dropped).

    Same order as :func:`epoch_batches`.

    Examples:
      >>> import numpy as np
      >>> [len(b) for b, _ in iterate_batches(np.zeros((5, 1)), np.zeros(5), 2)]
      [2, 2, 1]
    """
    idx, mask = epoch_batches(len(x), batch_size, seed, epoch, shuffle)
    for i, m in zip(idx, mask):
        i = i[m]
        yield x[i], y[i]
