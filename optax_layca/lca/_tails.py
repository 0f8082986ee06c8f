"""Heavy tails of the per-parameter LCA (Lan et al., "LCA: Loss Change Allocation for Neural
Network Training", NeurIPS 2019, §3 "Learning is heavy-tailed", Fig. 3b, S10).

The paper compares each iteration's LCA distribution over parameters with a Gaussian of the
same spread ("contributions from the tail are about three times larger than would be
expected if learning were Gaussian distributed") and fits a Weibull distribution. Its text
does not define the tail's threshold, and the authors' code for Fig. S10 is not public
(``plot_util.py`` imports ``scipy.stats.dweibull`` but never uses it): the threshold ``z`` is
a parameter here (default 3σ).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from ._analysis import as_history, require_per_param

GAUSSIAN_FRAC_BEYOND_3SIGMA = math.erfc(3 / math.sqrt(2))  # 0.0027


def _per_iteration_values(history: Any, what: str) -> np.ndarray:
    """``[T, P]`` float64 per-parameter LCA (from a history or a ``[T, P]`` array)."""
    if isinstance(history, np.ndarray):
        return np.asarray(history, np.float64).reshape(history.shape[0], -1)
    pp = require_per_param(as_history(history), what)
    return np.concatenate([v.reshape(v.shape[0], -1) for v in pp.values()], axis=1).astype(
        np.float64
    )


class TailStats(NamedTuple):
    r"""Per-iteration tail statistics of the per-parameter LCA ``x`` (``[T]`` each).

    With ``μ``, ``σ`` the mean and standard deviation over the ``P`` parameters of one
    iteration, ``d = x − μ`` and the tail ``|d| > zσ``:

    Attributes:
      tail_vs_gaussian: ``Σ_tail |d| / (P · 2σφ(z))`` — the tail's contribution over what the
        tail of ``P`` draws from ``N(μ, σ²)`` contributes on average (``φ`` the standard
        normal density): the comparison of Lan et al. (2019, §3; "about three times larger").
        1 for a Gaussian.
      tail_share: ``Σ_tail |d| / Σ |d|``, the tail's share of the absolute spread (Gaussian:
        ``e^{−z²/2}`` = 0.0111 at z = 3).
      tail_share_ratio: ``tail_share / e^{−z²/2}`` (what optax_layca 0.1 called
        ``tail_mass_ratio`` and wrongly compared with the paper's ≈ 3: a ratio of *shares*
        also grows as the bulk narrows, ~27 on a small MLP run).
      frac_beyond: fraction of parameters in the tail (Gaussian: ``erfc(z/√2)`` = 0.0027).
      kurtosis: excess kurtosis (0 for a Gaussian).
      z: the tail threshold in standard deviations.
    """

    tail_vs_gaussian: np.ndarray
    tail_share: np.ndarray
    tail_share_ratio: np.ndarray
    frac_beyond: np.ndarray
    kurtosis: np.ndarray
    z: float


def tail_heaviness(history: Any, *, z: float = 3.0) -> TailStats:
    """Tail statistics of each iteration's per-parameter LCA against a Gaussian of the same
    mean and spread (see :class:`TailStats`).

    ``history`` may also be a ``[T, P]`` array of per-parameter LCA. An iteration whose values
    are all equal gives NaN.

    Examples:
      >>> import numpy as np
      >>> x = np.random.default_rng(0).normal(size=(1, 400_000))
      >>> s = tail_heaviness(x)
      >>> round(float(s.tail_vs_gaussian[0]), 1), round(float(s.tail_share_ratio[0]), 1)
      (1.0, 1.0)
    """
    if not z > 0:
        raise ValueError(f"`tail_heaviness(z=...)` must be > 0; got {z!r}.")
    x = _per_iteration_values(history, "tail_heaviness")
    d = x - x.mean(axis=1, keepdims=True)
    sd = d.std(axis=1, keepdims=True)
    ok = sd[:, 0] > 0
    safe = np.where(sd > 0, sd, 1.0)
    absd = np.abs(d)
    tail = absd > z * sd
    tail_sum = (absd * tail).sum(1)
    expected = x.shape[1] * 2.0 * safe[:, 0] * math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    share = tail_sum / np.where(ok, absd.sum(1), 1.0)
    nan = np.full(len(x), np.nan)
    return TailStats(
        tail_vs_gaussian=np.where(ok, tail_sum / expected, nan),
        tail_share=np.where(ok, share, nan),
        tail_share_ratio=np.where(ok, share / math.exp(-0.5 * z * z), nan),
        frac_beyond=np.where(ok, tail.mean(1), nan),
        kurtosis=np.where(ok, np.mean((d / safe) ** 4, axis=1) - 3.0, nan),
        z=float(z),
    )


class WeibullFit(NamedTuple):
    """Weibull fits of the LCA magnitudes of helping (``x < 0``) and hurting (``x > 0``)
    parameters, one per iteration (``[T]`` each).

    Attributes:
      helping_shape, helping_scale: shape ``k`` and scale of ``|x|`` over helping parameters
        (``k < 2``: heavier-tailed than a Gaussian's magnitude; ``k < 1``: than exponential).
      hurting_shape, hurting_scale: the same over hurting parameters.
      helping_loglik_gain, hurting_loglik_gain: mean log-likelihood per value of the Weibull
        fit minus that of a half-normal fit (the Gaussian model) of the same magnitudes;
        positive: the Weibull describes them better.
    """

    helping_shape: np.ndarray
    helping_scale: np.ndarray
    hurting_shape: np.ndarray
    hurting_scale: np.ndarray
    helping_loglik_gain: np.ndarray
    hurting_loglik_gain: np.ndarray


def _fit_side(m: np.ndarray) -> tuple[float, float, float]:
    """``(shape, scale, loglik gain per value)`` of a Weibull vs half-normal fit of ``m > 0``."""
    from scipy import stats

    if m.size < 3:
        return math.nan, math.nan, math.nan
    unit = float(np.mean(m))  # fit on O(1) values: the optimiser's tolerances are absolute
    y = m / unit
    c, _, scale = stats.weibull_min.fit(y, floc=0)
    ll_w = float(np.sum(stats.weibull_min.logpdf(y, c, 0, scale)))
    s2 = float(np.mean(y * y))
    ll_hn = float(np.sum(0.5 * math.log(2 / (math.pi * s2)) - y * y / (2 * s2)))
    return float(c), float(scale * unit), (ll_w - ll_hn) / y.size


def weibull_fit(
    history: Any, *, iterations: Any = None, max_samples: int = 100_000, seed: int = 0
) -> WeibullFit:
    """Maximum-likelihood Weibull fits (``scipy.stats.weibull_min``, location 0) of the
    per-parameter LCA magnitudes, helping and hurting apart (Lan et al. 2019, §3: "a better
    model of LCA would be the Weibull distribution"; the text does not say which values were
    fitted nor how, and the authors' code for it is not public, so this choice is ours).
    Parameters with exactly zero LCA are left out.

    Args:
      history: an ``LCAHistory`` with per-parameter LCA, or a ``[T, P]`` array.
      iterations: row indices to fit (default all).
      max_samples: values per side and iteration, drawn at random without replacement
        beyond that (an MLE fit of 10⁵ values takes ~0.1 s).
      seed: seed of that draw.

    Examples:
      >>> import numpy as np
      >>> rng = np.random.default_rng(0)
      >>> x = rng.weibull(0.7, size=(1, 50_000)) * rng.choice([-1.0, 1.0], size=(1, 50_000))
      >>> f = weibull_fit(x)
      >>> round(float(f.helping_shape[0]), 1), round(float(f.hurting_shape[0]), 1)
      (0.7, 0.7)
    """
    x = _per_iteration_values(history, "weibull_fit")
    rows = np.arange(len(x)) if iterations is None else np.atleast_1d(np.asarray(iterations))
    rng = np.random.default_rng(seed)
    out = np.full((len(rows), 6), np.nan)
    for i, t in enumerate(rows):
        for j, sel in enumerate((x[t] < 0, x[t] > 0)):
            m = np.abs(x[t][sel])
            if m.size > max_samples:
                m = rng.choice(m, size=max_samples, replace=False)
            out[i, [j, 2 + j, 4 + j]] = _fit_side(m)
    return WeibullFit(
        helping_shape=out[:, 0],
        helping_scale=out[:, 2],
        hurting_shape=out[:, 1],
        hurting_scale=out[:, 3],
        helping_loglik_gain=out[:, 4],
        hurting_loglik_gain=out[:, 5],
    )
