"""The LCA experiments' figures (:mod:`optax_layca.plot._experiments_lca`): what is drawn is
the data given."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from optax_layca import lca, plot  # noqa: E402


def test_bars_heights_are_the_values_in_order():
    import matplotlib.pyplot as plt

    values = {"a": {"x": -1.0, "y": 2.0, "z": 0.5}, "b": {"x": 3.0, "y": -0.25, "z": 1.0}}
    fig = plot.lca_bars_figure(values, categories=["z", "x", "y"])
    heights = [float(p.get_height()) for p in fig.axes[0].patches]
    assert heights == [0.5, -1.0, 2.0, 1.0, 3.0, -0.25]
    centres = [p.get_x() + p.get_width() / 2 for p in fig.axes[0].patches]
    assert centres[0] < centres[3] < centres[1]  # series side by side within a category
    plt.close(fig)
    log = plot.lca_bars_figure(values, log_y=True)
    assert sorted(float(p.get_height()) for p in log.axes[0].patches) == [0.25, 0.5, 1, 1, 2, 3]
    plt.close(log)
    with pytest.raises(ValueError, match=r"values\['b'\]` lacks the categories \['w'\]"):
        plot.lca_bars_figure({"a": {"w": 1.0}, "b": {"x": 1.0}})


def test_baseline_histogram_counts_every_draw():
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    curves = rng.normal(size=(80, 3)).cumsum(0) * 0 + rng.normal(size=(80, 3))
    m = lca.moments_of_learning(curves, k=5, num_shuffles=50, seed=1)
    fig = plot.moments_baseline_figure(m)
    ax = fig.axes[0]
    assert sum(p.get_height() for p in ax.patches) == 50
    assert ax.lines[0].get_xdata()[0] == m.num_synchronized
    plt.close(fig)


def test_class_layer_heatmap_is_the_matrix_with_a_symmetric_scale():
    import matplotlib.pyplot as plt

    v = np.array([[-2.0, 0.5, 1.0], [0.0, -0.5, 0.25]])
    fig = plot.class_layer_lca_figure(v, class_names=["c0", "c1"], layer_names=["a", "b", "c"])
    im = fig.axes[0].images[0]
    np.testing.assert_array_equal(im.get_array(), v)
    assert im.get_clim() == (-2.0, 2.0)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["c0", "c1"]
    plt.close(fig)
    with pytest.raises(ValueError, match="must be"):
        plot.class_layer_lca_figure(np.zeros(3))
