"""Small embedded datasets for the demos, the tests and the notebooks (no network, ever).

Three sources, one :class:`Dataset` type:

* ``"digits"`` (default): scikit-learn's handwritten digits, 1797 real 8x8 images shipped with
  scikit-learn, split deterministically into train/test (75%/25% by default, stratified by
  class). Images are stored as ``(N, 8, 8, 1)`` (NHWC, Flax's layout).
* ``"mnist1d"``: MNIST-1D (Greydanus, 2020), generated procedurally by the ``mnist1d`` package
  (4000 train / 1000 test sequences of length 40, stored as ``(N, 40, 1)``). Never downloaded;
  generated once per seed and cached (with a checksum) under :func:`user_cache_dir`.
* a path to a ``.npz`` file holding ``x_train, y_train, x_test, y_test`` (integer labels).

Every source goes through :func:`check_arrays`: malformed shapes, complex, NaN or infinite
features (the feature is named), and labels that are negative, beyond int32 or far more than
the data could hold are refused with a :class:`DataError`, never wrapped or truncated.

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
import hashlib
import os
from collections.abc import Iterator

import numpy as np

from . import _io

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "check_arrays",
    "epoch_batches",
    "iterate_batches",
    "load_dataset",
    "split",
    "standardize",
    "user_cache_dir",
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

    def fingerprint(self) -> str:
        """A blake2b digest of the four arrays (shapes, dtypes, bytes): the data's identity,
        recorded with every result computed from them."""
        return _checksum(
            {
                "x_train": self.x_train,
                "y_train": self.y_train,
                "x_test": self.x_test,
                "y_test": self.y_test,
            }
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
    with np.errstate(over="ignore", invalid="ignore"):  # huge values: refused after the cast
        mean = xtr.mean(axis=0)
        std = xtr.std(axis=0)
    std = np.where(std < eps, 1.0, std)
    def f(a):
        with np.errstate(over="ignore", invalid="ignore"):
            return ((np.asarray(a, np.float64) - mean) / std).astype(np.float32)

    return f(xtr), f(x_test)


MAX_LABEL = np.iinfo(np.int32).max
"""Largest label a dataset may hold: labels are stored as int32."""

MIN_CLASS_LIMIT = 1000
"""Datasets may have up to ``max(MIN_CLASS_LIMIT, 10 * examples)`` classes (see
:func:`check_arrays`): more means labels that cannot be class indices of this data."""


def _describe_features(bad: np.ndarray, sample_shape: tuple[int, ...]) -> str:
    """ "feature 14" or "feature (3, 2)" for the first flagged column, and how many more."""
    cols = np.flatnonzero(bad.any(axis=0))
    first = int(cols[0])
    where = (
        first
        if len(sample_shape) == 1
        else tuple(int(i) for i in np.unravel_index(first, sample_shape))
    )
    rows = int(bad[:, first].sum())
    more = f" and {len(cols) - 1} more feature(s)" if len(cols) > 1 else ""
    return f"feature {where} ({rows} sample(s), first sample {int(np.argmax(bad[:, first]))}){more}"


def _check_features(x: np.ndarray, what: str) -> None:
    """Numeric real features ``(N, ...)`` with N > 0, a non-empty sample, every value finite."""
    if x.ndim < 2 or len(x) == 0:
        raise DataError(f"{what} must have shape (N, ...) with N > 0; got {x.shape}.")
    if int(np.prod(x.shape[1:])) == 0:
        raise DataError(f"{what} has an empty feature axis: samples of shape {x.shape[1:]}.")
    if np.issubdtype(x.dtype, np.complexfloating):
        raise DataError(f"{what} is complex ({x.dtype}); features must be real numbers.")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{what} must hold real numbers; got dtype {x.dtype}.")
    if np.issubdtype(x.dtype, np.floating):
        flat = x.reshape(len(x), -1)
        for test, kind in ((np.isnan, "NaN"), (np.isinf, "infinite")):
            bad = test(flat)
            if bad.any():
                raise DataError(
                    f"{what} has {kind} values in {_describe_features(bad, x.shape[1:])}."
                )


def _check_labels(y: np.ndarray, n: int, what: str) -> None:
    """Integer labels ``(n,)`` in ``[0, MAX_LABEL]``: nothing is wrapped or truncated later."""
    if y.shape != (n,):
        raise DataError(f"{what} must have shape ({n},); got {y.shape}.")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{what} must hold integer class labels; got dtype {y.dtype}.")
    if n and y.min() < 0:
        raise DataError(f"{what} holds a negative label ({int(y.min())}); labels must be >= 0.")
    if n and int(y.max()) > MAX_LABEL:  # int() first: uint64 beyond int64 compares exactly
        raise DataError(
            f"{what} holds label {int(y.max())}, beyond the int32 range (max {MAX_LABEL})."
        )


def check_arrays(
    xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray, source: str
) -> int:
    """Checks a dataset before it is used; returns its number of classes (``max label + 1``).

    Refused, with a :class:`DataError` naming the array (and, for values, the feature): shapes
    other than ``x (N, ...)``, ``y (N,)`` with ``N > 0``; an empty feature axis; complex,
    non-numeric, NaN or infinite features; non-integer, negative or beyond-int32 labels (never
    wrapped or truncated); more classes than ``max(MIN_CLASS_LIMIT, 10 × examples)`` (a model
    head that large is a label error, not a dataset); train and test samples of different
    shapes.

    Examples:
      >>> import numpy as np
      >>> x = np.zeros((3, 2), np.float32)
      >>> check_arrays(x, np.array([0, 2, 1]), x, np.array([1, 1, 0]), "demo")
      3
      >>> x[1, 1] = np.nan
      >>> check_arrays(x, np.array([0, 2, 1]), x, np.array([1, 1, 0]), "demo")
      Traceback (most recent call last):
      ...
      optax_layca.data.DataError: demo: x_train has NaN values in feature 1 (1 sample(s), first sample 1).
    """
    for name, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        _check_features(x, f"{source}: x_{name}")
        _check_labels(y, len(x), f"{source}: y_{name}")
    if xtr.shape[1:] != xte.shape[1:]:
        raise DataError(
            f"{source}: x_train and x_test samples differ in shape: "
            f"{xtr.shape[1:]} vs {xte.shape[1:]}."
        )
    num_classes = int(max(ytr.max(), yte.max())) + 1
    limit = max(MIN_CLASS_LIMIT, 10 * (len(ytr) + len(yte)))
    if num_classes > limit:
        raise DataError(
            f"{source}: the largest label, {num_classes - 1}, implies {num_classes} classes for "
            f"{len(ytr) + len(yte)} examples (at most {limit} allowed); labels must be class "
            "indices 0..C-1."
        )
    return num_classes


def user_cache_dir(*parts: str) -> str:
    """``$OPTAX_LAYCA_CACHE`` or ``$XDG_CACHE_HOME/optax_layca`` (default
    ``~/.cache/optax_layca``), joined with ``parts``."""
    root = os.environ.get("OPTAX_LAYCA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "optax_layca",
    )
    return os.path.join(root, *parts)


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


MNIST1D_KEYS = ("x", "y", "x_test", "y_test")


def _mnist1d_generate(seed: int) -> dict[str, np.ndarray]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise DataError("dataset 'mnist1d' needs the mnist1d package: pip install mnist1d.") from e
    args = get_dataset_args()
    args.seed = int(seed) if seed else args.seed  # seed 0 keeps the package's canonical data
    state = np.random.get_state()  # make_dataset seeds numpy's global generator
    try:
        d = make_dataset(args)  # procedural; never the download path
    finally:
        np.random.set_state(state)
    return {k: np.asarray(d[k]) for k in MNIST1D_KEYS}


def _mnist1d_cache_path(seed: int) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("mnist1d")
    except PackageNotFoundError:  # pragma: no cover
        ver = "unknown"
    return user_cache_dir("mnist1d", f"mnist1d-{ver}-seed{int(seed)}.npz")


def _mnist1d(seed: int):
    """MNIST-1D generated by the ``mnist1d`` package, cached under :func:`user_cache_dir`.

    The cache holds a checksum of its arrays; a file that does not match is regenerated, and
    a cache that cannot be written is skipped (the data are then generated every time).
    """
    path = _mnist1d_cache_path(seed)
    d = _read_checked_npz(path, MNIST1D_KEYS)
    if d is None:
        d = _mnist1d_generate(seed)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            _io.write_npz(path, {**d, "checksum": np.asarray(_checksum(d))})
        except OSError:
            pass  # read-only home: no cache, same data
    x = np.asarray(d["x"], np.float32)[..., None]
    xt = np.asarray(d["x_test"], np.float32)[..., None]
    return x, np.asarray(d["y"]), xt, np.asarray(d["y_test"])


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}{a.shape}{a.dtype.str}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _read_checked_npz(path: str, keys: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """The arrays ``keys`` of a file written with a matching ``checksum``, else None."""
    try:  # our own handle: np.load leaves it open when the zip is truncated
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as f:
            d = {k: np.asarray(f[k]) for k in keys}
            stored = str(f["checksum"])
    except Exception:  # noqa: BLE001 - missing, truncated or foreign file: regenerate
        return None
    return d if stored == _checksum(d) else None


def _npz(path: str):
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as f:
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
    check_arrays(xtr, ytr, xte, yte, path)
    return xtr, ytr, xte, yte


def _as_float32(x: np.ndarray, what: str) -> np.ndarray:
    """``x`` in float32, refusing values that overflow it (inf after the cast)."""
    with np.errstate(over="ignore"):  # overflow is reported below, with the feature
        out = np.asarray(x).astype(np.float32)
    bad = ~np.isfinite(out.reshape(len(out), -1))
    if bad.any():
        raise DataError(
            f"{what} has values beyond float32's range in {_describe_features(bad, out.shape[1:])}."
        )
    return out


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
      DataError: unknown name, unreadable file or malformed arrays (the message names which;
        see :func:`check_arrays`).

    Examples:
      >>> ds = load_dataset("digits")
      >>> ds
      Dataset('digits', train=(1347, 8, 8, 1), test=(450, 8, 8, 1), classes=10)
      >>> abs(float(ds.x_train.mean())) < 1e-6
      True
    """
    name = os.fspath(name)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise DataError(f"`load_dataset(seed=...)` must be an int in [0, 2**32); got {seed!r}.")
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
    num_classes = check_arrays(xtr, ytr, xte, yte, name)
    if standardized:
        xtr, xte = standardize(xtr, xte)
    xtr, xte = _as_float32(xtr, f"{name}: x_train"), _as_float32(xte, f"{name}: x_test")
    ytr, yte = ytr.astype(np.int32), yte.astype(np.int32)  # checked: within int32
    if xtr.ndim == 2:  # (N, D) vectors: one channel, so convolutions see (N, D, 1)
        xtr, xte = xtr[..., None], xte[..., None]
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
