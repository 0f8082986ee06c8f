"""Layer-rotation figures: content checks (lines per layer, limits, colour order), Agg backend."""

from __future__ import annotations

import functools

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


@functools.cache
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


@functools.cache
def stacked_adam_state(n=3):
    """Adam after one step on a scanned (stacked, ``layer_axis=0``) kernel and a plain one."""
    import optax

    params = {"blocks": {"kernel": jnp.ones((n, 4, 4))}, "head": {"kernel": jnp.ones((4, 2))}}
    grads = {
        "blocks": {"kernel": jnp.arange(n * 16.0).reshape(n, 4, 4) + 1.0},
        "head": {"kernel": jnp.full((4, 2), 0.5)},
    }
    tx = optax.adam(1e-3)
    _, state = tx.update(grads, tx.init(params), params)
    return grads, state


def test_stacked_layers_are_entries_not_averaged():
    """`second_moment_percentiles` / `layer_convergence_rate` with layer_axis=0 give one value
    per stacked layer: the figures draw each one (never the first or the mean only)."""
    grads, state = stacked_adam_state()
    layer_axis = lambda path, leaf: 0 if path.startswith("blocks") else None
    pct = rot.second_moment_percentiles(state, layer_axis=layer_axis)
    assert np.shape(pct["blocks/kernel"]) == (3, 3)
    fig = plot.moment_percentiles_figure(pct)
    (bullets,) = [ln for ln in fig.axes[0].get_lines() if ln.get_marker() == "o"]
    # numpy reference: ν = (1 - 0.999) g² per stacked slice, median over its 16 entries
    g = np.asarray(grads["blocks"]["kernel"], np.float64)
    want = [np.median(0.001 * g[i] ** 2) for i in range(3)] + [0.001 * 0.25]
    # float32 ν (one rounding of g², one of the product): relative 2 * 2**-24
    np.testing.assert_allclose(bullets.get_ydata(), want, rtol=2**-22)
    with pytest.raises(ValueError, match="3 percentiles"):
        plot.moment_percentiles_figure(rot.second_moment_percentiles(state, q=(10, 90)))

    traj = [
        {"blocks": {"kernel": np.full((3, 2, 2), 4.0 - t * np.array([1, 2, 3])[:, None, None] / 4)}}
        for t in range(3)
    ]
    final = {"blocks": {"kernel": np.zeros((3, 2, 2))}}
    rates = rot.layer_convergence_rate(traj, final, 0, 1, 2, layer_axis=0)
    fig = plot.convergence_rates_figure(rates)
    ax = fig.axes[0]
    # slice i moves (i + 1) / 4 of a distance 4 per step: C = (i + 1) / 16
    np.testing.assert_allclose([b.get_height() for b in ax.patches], [1 / 16, 2 / 16, 3 / 16])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["blocks[0]", "blocks[1]", "blocks[2]"]


def all_single_panel_figures():
    hist = trained_history()
    _, state = stacked_adam_state()
    return {
        "rotation_curves": lambda ax: plot.rotation_curves_figure(
            hist, ax=ax, title="Adam + Layca", accuracies=0.912, colorbar=True
        ),
        "epoch_rotation": lambda ax: plot.epoch_rotation_figure(hist, ax=ax, colorbar=True),
        "layer_norms": lambda ax: plot.layer_norms_figure(hist, names="weight_norm", ax=ax),
        "moment_percentiles": lambda ax: plot.moment_percentiles_figure(
            {"epoch 1": rot.second_moment_percentiles(state)}, ax=ax
        ),
        "layer_multipliers": lambda ax: plot.layer_multipliers_figure([-0.5, 0.5], 8, ax=ax),
        "convergence_rates": lambda ax: plot.convergence_rates_figure(
            {p: 0.1 * i for i, p in enumerate(LAYERS)}, ax=ax
        ),
    }


def test_figures_save_unclipped_with_default_savefig(tmp_path):
    """Everything a figure made here draws lies inside it after a plain `fig.savefig(path)`:
    the tight box of the drawn artists (what ``bbox_inches="tight"`` would crop to) is within
    the figure, and so is each drawn text."""
    for name, draw in all_single_panel_figures().items():
        fig = draw(None)
        fig.savefig(tmp_path / f"{name}.png")  # default args: no bbox_inches="tight"
        renderer = fig.canvas.get_renderer()
        w, h = fig.get_size_inches()
        tight = fig.get_tightbbox(renderer)  # inches, drawn artists only
        # 0.01 in (1 px at 100 dpi) slack: extents are snapped to whole pixels
        assert tight.x0 >= -0.01 and tight.y0 >= -0.01, (name, tight)
        assert tight.x1 <= w + 0.01 and tight.y1 <= h + 0.01, (name, tight)
        texts = [t for ax in fig.axes for t in (ax.title, ax.xaxis.label, ax.yaxis.label)]
        for t in texts:
            if t.get_text():
                ext = t.get_window_extent(renderer)
                assert ext.x0 >= -1 and ext.x1 <= fig.bbox.x1 + 1, (name, t.get_text(), ext)
                assert ext.y0 >= -1 and ext.y1 <= fig.bbox.y1 + 1, (name, t.get_text(), ext)


def test_caller_axes_keep_their_layout():
    """On a caller's axes, a figure draws and nothing else: no layout engine is set, no axes
    is moved or resized (a colour bar becomes an inset instead of stealing room)."""
    for name, draw in all_single_panel_figures().items():
        fig, ax = plt.subplots(figsize=(4, 3))
        before = ax.get_position().bounds
        assert draw(ax) is fig, name
        fig.canvas.draw()
        assert fig.get_layout_engine() is None, name
        assert ax.get_position().bounds == before, name
        plt.close(fig)
