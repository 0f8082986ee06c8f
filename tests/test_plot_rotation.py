"""Layer-rotation figures: content checks (lines per layer, limits, colour order), Agg backend."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.colors import to_rgba

from optax_layca import RotationHistory, plot
from optax_layca import rotation as rot

LAYERS = [f"Dense_{i}/kernel" for i in (0, 1, 2, 10)]  # natural order puts Dense_10 last


def fake_history(n=8, epoch_len=2, scale=1.0):
    """A history from hand-made figures (no training): known values to find in the plot."""
    hist = RotationHistory()
    for t in range(1, n + 1):
        figs = {
            name: {
                p: jnp.asarray(scale * (0.1 * t + 0.01 * i), jnp.float32)
                for i, p in enumerate(LAYERS)
            }
            for name in rot.FIGURES
        }
        hist.record(t, figs, epoch=t // epoch_len if t % epoch_len == 0 else None)
    return hist


def trained_history():
    """A real monitored run (SGD on a quadratic) with per-epoch rotation recorded."""
    import jax
    import optax

    params = {p.split("/")[0]: {"kernel": jnp.eye(3) + 0.1 * i} for i, p in enumerate(LAYERS)}
    target = jax.tree.map(lambda w: jnp.flip(w, 0) + 1.0, params)
    tx = rot.track_rotation(optax.sgd(0.05))
    state, hist = tx.init(params), RotationHistory()
    loss = lambda p: sum(
        jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target))
    )
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
    for t in range(1, 7):
        u, state = step(params, state)
        params = optax.apply_updates(params, u)
        hist.record(t, state, epoch=t // 2 if t % 2 == 0 else None, params=params)
    return hist


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def line_data(ax):
    return [ln for ln in ax.get_lines() if ln.get_label() and not ln.get_label().startswith("_")]


def test_rotation_curves_content(tmp_path):
    hist = fake_history()
    fig = plot.rotation_curves_figure(hist, title="adam")
    ax = fig.axes[0]
    lines = line_data(ax)
    assert [ln.get_label() for ln in lines] == LAYERS  # one line per layer, forward order
    assert ax.get_ylim() == (0.0, 1.0)
    np.testing.assert_allclose(lines[1].get_ydata(), 0.1 * np.arange(1, 9) + 0.01, rtol=1e-6)
    np.testing.assert_array_equal(lines[0].get_xdata(), np.arange(1, 9))
    # viridis by depth, first layer darkest
    cmap = colormaps["viridis"]
    colors = [to_rgba(ln.get_color()) for ln in lines]
    assert colors[0] == cmap(0.0) and colors[-1] == cmap(1.0)
    lum = [0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2] for c in colors]
    assert lum == sorted(lum)
    assert ax.get_title() == "adam" and ax.get_xscale() == "linear"
    fig.savefig(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_rotation_curves_panels_log_x_epoch_and_accuracy(tmp_path):
    runs = {"sgd": fake_history(), "layca": fake_history(scale=0.5)}
    fig = plot.rotation_curves_figure(
        runs, log_x=True, x="epoch", accuracies={"sgd": 0.812, "layca": 90.0}
    )
    assert len(fig.axes) == 2
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["sgd (test acc. 81.2%)", "layca (test acc. 90.0%)"]
    for ax in fig.axes:
        assert ax.get_xscale() == "log" and ax.get_ylim() == (0.0, 1.0)
        assert len(line_data(ax)) == len(LAYERS)
        np.testing.assert_array_equal(line_data(ax)[0].get_xdata(), [1, 2, 3, 4])
    # given axes are used
    fig2, axes = plt.subplots(1, 2)
    assert plot.rotation_curves_figure(runs, ax=axes) is fig2
    with pytest.raises(ValueError, match="must hold 2 axes"):
        plot.rotation_curves_figure(runs, ax=axes[0])
    # a saved history path works too
    path = runs["sgd"].save(tmp_path / "h.npz")
    assert len(line_data(plot.rotation_curves_figure(path).axes[0])) == len(LAYERS)


def test_rotation_curves_errors():
    with pytest.raises(ValueError, match="empty"):
        plot.rotation_curves_figure(RotationHistory())
    with pytest.raises(ValueError, match="unknown layers"):
        plot.rotation_curves_figure(fake_history(), layer_order=["nope/kernel"])
    with pytest.raises(TypeError, match="RotationHistory"):
        plot.rotation_curves_figure([1, 2])
    with pytest.raises(ValueError, match="x="):
        plot.rotation_curves_figure(fake_history(), x="time")


def test_epoch_rotation_and_layer_norms():
    hist = trained_history()
    fig = plot.epoch_rotation_figure(hist)
    ax = fig.axes[0]
    lines = line_data(ax)
    assert len(lines) == len(LAYERS) and ax.get_yscale() == "log"
    epochs, rot_per_epoch = hist.per_epoch_rotation()
    np.testing.assert_array_equal(lines[0].get_xdata(), epochs)
    np.testing.assert_allclose(lines[2].get_ydata(), rot_per_epoch[LAYERS[2]])
    fig = plot.layer_norms_figure(hist, names=("grad_norm", "weight_norm", "update_norm"))
    assert len(fig.axes) == 3
    assert [ax.get_ylabel() for ax in fig.axes] == ["grad norm", "weight norm", "update norm"]
    assert all(len(line_data(ax)) == len(LAYERS) for ax in fig.axes)
    np.testing.assert_allclose(
        line_data(fig.axes[1])[3].get_ydata(), hist.get("weight_norm")[LAYERS[3]]
    )
    with pytest.raises(ValueError, match="per-epoch rotation"):
        plot.epoch_rotation_figure(fake_history())
    with pytest.raises(ValueError, match="Unknown figure"):
        plot.layer_norms_figure(hist, names=["loss"])


def test_moment_percentiles():
    snaps = {
        f"epoch {e}": {
            p: np.array([1.0, 2.0, 4.0]) * 10.0 ** (-i - e) for i, p in enumerate(LAYERS)
        }
        for e in (1, 10)
    }
    fig = plot.moment_percentiles_figure(snaps)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    # two errorbar containers, medians at the bullets
    bullets = [ln for ln in ax.get_lines() if ln.get_marker() == "o"]
    assert len(bullets) == 2
    np.testing.assert_allclose(bullets[0].get_ydata(), [2.0 * 10.0 ** (-i - 1) for i in range(4)])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["epoch 1", "epoch 10"]
    single = plot.moment_percentiles_figure(snaps["epoch 1"])
    assert len([ln for ln in single.axes[0].get_lines() if ln.get_marker() == "o"]) == 1
    with pytest.raises(ValueError, match="at least one"):
        plot.moment_percentiles_figure({})


def test_layer_multipliers_figure():
    fig = plot.layer_multipliers_figure([-0.5, 0.0, 0.5], 6)
    lines = line_data(fig.axes[0])
    assert len(lines) == 3
    np.testing.assert_allclose(
        lines[2].get_ydata(),
        np.asarray([(1 - 0.5) ** (5 * (5 - l) / 5) for l in range(6)]),
        rtol=1e-6,
    )
    np.testing.assert_allclose(lines[1].get_ydata(), np.ones(6))
    assert fig.axes[0].get_ylim()[0] == 0.0


def test_convergence_rates_bars():
    rates = {p: float(i + 1) for i, p in enumerate(reversed(LAYERS))}
    fig = plot.convergence_rates_figure(rates)
    ax = fig.axes[0]
    heights = [b.get_height() for b in ax.patches]
    assert heights == [rates[p] for p in LAYERS]  # natural order
    colors = [b.get_facecolor() for b in ax.patches]
    assert colors[0] == colormaps["viridis"](0.0)
    with pytest.raises(ValueError, match="at least one"):
        plot.convergence_rates_figure({})


def test_all_listed():
    from optax_layca.plot import _rotation

    assert sorted(_rotation.__all__) == sorted(
        [
            "rotation_curves_figure",
            "epoch_rotation_figure",
            "layer_norms_figure",
            "moment_percentiles_figure",
            "layer_multipliers_figure",
            "convergence_rates_figure",
        ]
    )
    for name in _rotation.__all__:
        assert getattr(plot, name).__doc__
