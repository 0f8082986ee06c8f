"""Reference Flax (linen) models for the demos, the tests and the notebooks.

All models map a batch of inputs ``(N, ...)`` to logits ``(N, num_classes)``. Dense models
flatten their input; convolutional models convolve over every axis between the batch and the
trailing channel axis (``(N, H, W, C)`` images get 2-D convolutions, ``(N, L, C)`` sequences
such as MNIST-1D get 1-D ones), so every model runs on every embedded dataset.

=============  ===========================================================================
``"fc"``       :class:`FCNet`, the LCA paper's fully connected net ``in-100-50-10`` (Lan et al., 2019)
``"deep"``     :class:`DeepMLP`, six dense layers ``in-64-64-64-64-64-10``: deep enough for the
               layer multipliers (α) and layer-wise rotation to matter, cheap on a CPU
``"mlp"``      :class:`MLP`, one hidden layer, for feature pictures (Carbonnelle & De Vleeschouwer, extended version, 2019 §6)
``"cnn"``      :class:`SmallCNN`, conv-conv-pool-conv-conv-global-pool-dense
``"resnet"``   :class:`SmallResNet`, a stem conv, residual blocks whose shortcut is a
               convolution whenever shape changes, a dense head
=============  ===========================================================================

No BatchNorm or dropout anywhere: ``model.apply({"params": p}, x)`` is a pure function of the
parameters, which keeps the training loops, layer rotation and LCA simple. Submodules are
created in forward order, so Flax's automatic names (``Dense_0``, ``Dense_1`` …) sort
naturally in forward order too; :func:`optax_layca.forward_order` recovers the same order from
the traced computation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

__all__ = [
    "MLP",
    "DeepMLP",
    "MODELS",
    "FCNet",
    "SmallCNN",
    "SmallResNet",
    "apply_fn",
    "get_model",
    "init_params",
]


class FCNet(nn.Module):
    """Fully connected ReLU net ``in-hidden[0]-hidden[1]-…-num_classes`` (LCA paper: 100, 50).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> model = FCNet(num_classes=10)
      >>> params = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))["params"]
      >>> {k: v["kernel"].shape for k, v in params.items()}
      {'Dense_0': (64, 100), 'Dense_1': (100, 50), 'Dense_2': (50, 10)}
    """

    num_classes: int = 10
    hidden: Sequence[int] = (100, 50)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        for h in self.hidden:
            x = nn.relu(nn.Dense(h)(x))
        return nn.Dense(self.num_classes)(x)


class DeepMLP(nn.Module):
    """A deep, narrow ReLU perceptron: ``depth`` dense layers of ``width`` units, then the head.

    The stand-in for the deep networks of Carbonnelle & De Vleeschouwer (2019, Table 1) on a
    CPU: with six layers, layer prioritisation (Eq. 1's α) and layer-wise rotation differences
    are visible, and a training step costs well under a millisecond on MNIST-1D.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> model = DeepMLP(num_classes=10)
      >>> params = model.init(jax.random.key(0), jnp.ones((1, 40, 1)))["params"]
      >>> len(params), params["Dense_0"]["kernel"].shape, params["Dense_5"]["kernel"].shape
      (6, (40, 64), (64, 10))
    """

    num_classes: int = 10
    width: int = 64
    depth: int = 6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        for _ in range(self.depth - 1):
            x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(self.num_classes)(x)


class MLP(nn.Module):
    """One-hidden-layer ReLU perceptron (Carbonnelle & De Vleeschouwer, extended version, 2019 §6 visualises its first-layer features).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> model = MLP(num_classes=3, hidden=16)
      >>> model.apply(model.init(jax.random.key(0), jnp.ones((2, 5))), jnp.ones((2, 5))).shape
      (2, 3)
    """

    num_classes: int = 10
    hidden: int = 256

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


def _spatial(x: jax.Array) -> jax.Array:
    """Adds a channel axis to ``(N, D)`` inputs so that they convolve as 1-D sequences."""
    return x[..., None] if x.ndim == 2 else x


def _pool(x: jax.Array) -> jax.Array:
    """2x max-pooling over every spatial axis that is at least 2 long."""
    window = tuple(2 if d >= 2 else 1 for d in x.shape[1:-1])
    return nn.max_pool(x, window, strides=window)


class SmallCNN(nn.Module):
    """Small ConvNet: two conv stages (two 3-wide convs, max-pool) and a dense head.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> model = SmallCNN(num_classes=10)
      >>> x = jnp.ones((2, 8, 8, 1))
      >>> model.apply(model.init(jax.random.key(0), x), x).shape
      (2, 10)
    """

    num_classes: int = 10
    features: Sequence[int] = (16, 32)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _spatial(x)
        k = (3,) * (x.ndim - 2)
        for f in self.features:
            x = nn.relu(nn.Conv(f, k)(x))
            x = nn.relu(nn.Conv(f, k)(x))
            x = _pool(x)
        x = x.mean(axis=tuple(range(1, x.ndim - 1)))  # global average pool
        return nn.Dense(self.num_classes)(x)


class ResBlock(nn.Module):
    """Pre-activation-free residual block ``relu(conv2(relu(conv1(x))) + shortcut(x))``.

    The shortcut is a 1-wide convolution (a *shortcut convolution*) when the number of channels
    or the stride changes, the identity otherwise.
    """

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        nd = x.ndim - 2
        s = tuple(self.strides if d >= 2 else 1 for d in x.shape[1:-1])
        y = nn.relu(nn.Conv(self.features, (3,) * nd, strides=s, name="conv1")(x))
        y = nn.Conv(self.features, (3,) * nd, name="conv2")(y)
        if x.shape[-1] != self.features or any(v != 1 for v in s):
            x = nn.Conv(self.features, (1,) * nd, strides=s, name="shortcut")(x)
        return nn.relu(y + x)


class SmallResNet(nn.Module):
    """Small ResNet: a 3-wide stem conv, one residual block per width, a dense head.

    Every stage after the first halves the resolution, so its block has a shortcut conv.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> model = SmallResNet(num_classes=10)
      >>> x = jnp.ones((2, 8, 8, 1))
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> sorted(params["ResBlock_1"])
      ['conv1', 'conv2', 'shortcut']
      >>> model.apply({"params": params}, x).shape
      (2, 10)
    """

    num_classes: int = 10
    widths: Sequence[int] = (16, 32)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _spatial(x)
        x = nn.relu(nn.Conv(self.widths[0], (3,) * (x.ndim - 2), name="stem")(x))
        for i, w in enumerate(self.widths):
            x = ResBlock(w, strides=1 if i == 0 else 2)(x)
        x = x.mean(axis=tuple(range(1, x.ndim - 1)))
        return nn.Dense(self.num_classes, name="head")(x)


MODELS = {"fc": FCNet, "deep": DeepMLP, "mlp": MLP, "cnn": SmallCNN, "resnet": SmallResNet}


def get_model(name: str = "fc", num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """A reference model by name (``"fc"``, ``"deep"``, ``"mlp"``, ``"cnn"``, ``"resnet"``).

    Examples:
      >>> get_model("mlp", num_classes=3, hidden=8)
      MLP(
          # attributes
          num_classes = 3
          hidden = 8
      )
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}.")
    return MODELS[name](num_classes=num_classes, **kwargs)


def init_params(model: nn.Module, input_shape: Sequence[int], seed: int = 0) -> Any:
    """Initial parameters of ``model`` for inputs of one-sample shape ``input_shape``.

    Examples:
      >>> p = init_params(FCNet(), (8, 8, 1), seed=0)
      >>> p["Dense_0"]["kernel"].shape
      (64, 100)
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        # jax.random.key wraps larger seeds silently (key(2**32) == key(0))
        raise ValueError(f"`init_params(seed=...)` must be an int in [0, 2**32); got {seed!r}.")
    x = jnp.zeros((1, *input_shape), jnp.float32)
    return model.init(jax.random.key(seed), x)["params"]


def apply_fn(model: nn.Module):
    """``f(params, x) -> logits`` for a linen model (what :func:`optax_layca.forward_order` and
    the training loops take).

    Examples:
      >>> import jax.numpy as jnp
      >>> from optax_layca import forward_order
      >>> model = SmallResNet()
      >>> p = init_params(model, (8, 8, 1))
      >>> forward_order(apply_fn(model), p, jnp.zeros((1, 8, 8, 1)))  # doctest: +NORMALIZE_WHITESPACE
      ('stem/kernel', 'ResBlock_0/conv1/kernel', 'ResBlock_0/conv2/kernel',
       'ResBlock_1/conv1/kernel', 'ResBlock_1/conv2/kernel', 'ResBlock_1/shortcut/kernel',
       'head/kernel')
    """
    return lambda params, x: model.apply({"params": params}, x)
