r"""Angles between layers, accurate down to tiny rotations.

A layer's *rotation* is measured by the angle between two of its values. Angles are computed
in float32 from the *difference* of the two vectors, ``θ = atan2(‖d_⊥‖ ‖a‖, a·a + a·d)`` with
``b = a + d`` and ``d_⊥`` the part of ``d`` orthogonal to ``a``. This is accurate to float32
relative precision for angles down to 1e-6 rad and below, where ``arccos`` of a clamped cosine
would return 0 (and to float32 resolution, ~2e-7, near π). The cosine distance is
``1 - cos θ = 2 sin²(θ/2)``, in ``[0, 2]`` by construction.

Zero-norm convention: the angle between a zero vector and anything is 0, and so is the cosine
distance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .._layers import LeafLayout, layer_dot


def angle_to_sum(a: jax.Array, d: jax.Array, lo: LeafLayout) -> jax.Array:
    """Per-layer angle between ``a`` and ``a + d`` (float32, keepdims), 0 if either is zero.

    ``d_⊥ = d - (a·d / a·a) a`` is formed explicitly, so no cancellation: when ``d`` is small
    (nearly parallel vectors) its own rounding is relative to ``‖d‖``, not to ``‖a‖``.
    """
    a = a.astype(jnp.float32)
    d = d.astype(jnp.float32)
    aa, ad = layer_dot(a, a, lo), layer_dot(a, d, lo)
    has_a = aa > 0
    perp = d - jnp.where(has_a, ad / jnp.where(has_a, aa, 1.0), 0.0) * a
    pp = layer_dot(perp, perp, lo)
    b = a + d
    has_b = layer_dot(b, b, lo) > 0
    theta = jnp.arctan2(jnp.sqrt(pp) * jnp.sqrt(aa), aa + ad)
    return jnp.where(has_a & has_b, theta, 0.0)


def layer_angle_kept(a: jax.Array, b: jax.Array, lo: LeafLayout) -> jax.Array:
    """Per-layer angle in ``[0, π]`` between ``a`` and ``b`` (keepdims).

    Near 0 the difference form is exact to float32 relative precision; near π the error of
    ``‖d_⊥‖`` is ``~eps (‖a‖ + ‖b‖)``, i.e. an absolute angle error of ``~2 eps``: the
    resolution of a float32 number near π, so no separate antiparallel branch is needed.
    """
    a32 = a.astype(jnp.float32)
    return angle_to_sum(a32, b.astype(jnp.float32) - a32, lo)


def cosine_distance_of_angle(theta: jax.Array) -> jax.Array:
    return 2.0 * jnp.square(jnp.sin(0.5 * theta))


def whole_layout(x: jax.Array) -> LeafLayout:
    return LeafLayout("", True, None, tuple(range(np.ndim(x))))


def angle(a: jax.Array, b: jax.Array) -> jax.Array:
    r"""Angle (radians, float32 scalar in ``[0, π]``) between two arrays seen as flat vectors.

    .. math::
      \theta(a, b) = \operatorname{atan2}\big(\lVert d_\perp \rVert \lVert a \rVert,\;
      a \cdot a + a \cdot d\big), \qquad d = b - a, \quad
      d_\perp = d - \tfrac{a \cdot d}{a \cdot a} a

    Exact to float32 relative precision for angles down to 1e-6 rad and below, and to
    float32 resolution (``~2e-7``) near π; 0 if either vector is zero.

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> a = jnp.array([1.0, 0.0])
      >>> round(float(angle(a, jnp.array([1.0, 1e-6]))) / 1e-6, 5)  # arccos(cos) gives 0
      1.0
      >>> round(float(angle(a, jnp.array([-1.0, 1.0]))), 4)
      2.3562
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"`angle(a, b)`: shapes differ: {a.shape} vs {b.shape}.")
    return layer_angle_kept(jnp.ravel(a), jnp.ravel(b), whole_layout(jnp.ravel(a)))[0]


def cosine_distance(a: jax.Array, b: jax.Array) -> jax.Array:
    r"""Cosine distance ``1 - cos(a, b) = 2 sin²(θ/2)`` between two flattened arrays.

    Computed from the accurate :func:`angle` (so ``~θ²/2`` is right even for ``θ = 1e-6``)
    and in ``[0, 2]``; 0 if either vector is zero.

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> np.asarray(cosine_distance(jnp.array([1.0, 0.0]), jnp.array([1.0, 1.0])), float
      ...            ).round(4).tolist()
      0.2929
    """
    return cosine_distance_of_angle(angle(a, b))

