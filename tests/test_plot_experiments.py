"""Experiment figures (``optax_layca.plot._experiments``): the numbers drawn are the numbers
given, colours follow depth, bad input is refused."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.colors import to_rgba

from optax_layca import plot


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def test_layer_accuracy_mean_line_and_depth_colours():
    acc = np.array([[0.8, 0.7, np.nan, 0.5], [0.6, 0.7, 0.6, 0.3]])
    fig = plot.layer_accuracy_figure(acc, title="t")
    ax = fig.axes[0]
    (line,) = ax.lines
    np.testing.assert_allclose(line.get_ydata(), [0.7, 0.7, 0.6, 0.4])  # NaN left out of layer 2
    mean_points = ax.collections[-1]
    np.testing.assert_allclose(mean_points.get_offsets()[:, 1], [0.7, 0.7, 0.6, 0.4])
    faces = mean_points.get_facecolors()
    cmap = colormaps["viridis"]
    np.testing.assert_allclose(faces[0], to_rgba(cmap(0.0)))  # first layer darkest
    np.testing.assert_allclose(faces[-1], to_rgba(cmap(1.0)))
    assert len(ax.collections) == 3  # two repetitions + the mean
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "3"]


def test_layer_accuracy_one_row_and_bad_shape():
    fig = plot.layer_accuracy_figure([0.5, 0.6])
    assert len(fig.axes[0].collections) == 1
    with pytest.raises(ValueError, match="repetitions, layers"):
        plot.layer_accuracy_figure(np.zeros((2, 2, 2)))


def test_features_images_are_the_units_weights():
    rng = np.random.default_rng(0)
    w0, w1 = rng.normal(size=(12, 7)), rng.normal(size=(12, 7))
    fig = plot.features_figure(
        {"init": w0, "trained": w1},
        shape=(3, 4),
        units=[2, 5],
        annotations={"trained": "cos 0.5"},
    )
    axes = np.asarray(fig.axes).reshape(2, 2)
    for i, w in enumerate((w0, w1)):
        for j, u in enumerate((2, 5)):
            (im,) = axes[i, j].images
            np.testing.assert_allclose(im.get_array(), w[:, u].reshape(3, 4))
    assert axes[0, 0].get_ylabel() == "init" and axes[0, 1].get_title() == "unit 5"
    assert [t.get_text() for t in axes[1, 1].texts] == ["cos 0.5"]


def test_features_signals_as_lines_on_given_axes():
    w = np.arange(40.0 * 3).reshape(40, 3)
    fig, grid = plt.subplots(1, 5)
    out = plot.features_figure({"run": np.tile(w, (1, 2))}, shape=(40,), ax=grid)
    assert out is fig
    np.testing.assert_allclose(grid[4].lines[0].get_ydata(), np.tile(w, (1, 2))[:, 4])
    assert not grid[0].images


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"features": {}, "shape": (2, 2)}, "at least one"),
        ({"features": {"a": np.zeros((5, 3))}, "shape": (2, 2)}, "inputs = 4"),
        ({"features": {"a": np.zeros((4, 3))}, "shape": (2, 2, 1)}, "must be"),
        ({"features": {"a": np.zeros((4, 3))}, "shape": (4,), "units": [3]}, r"\[0, 3\)"),
        ({"features": {"a": np.zeros((4, 3))}, "shape": (4,), "ax": [None]}, "5 axes|1 x 3"),
    ],
)
def test_features_refuses_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plot.features_figure(**kwargs)
