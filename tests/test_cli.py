"""End-to-end tests of the ``optax-layca`` command (in-process, ``--quick`` configurations)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from optax_layca.app import _report, cli

OPTIMIZERS = cli.DEMO_OPTIMIZERS


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One quick demo run shared by the tests below (the expensive part)."""
    out = tmp_path_factory.mktemp("demo")
    assert cli.main(["demo", "--quick", "--no-progress", "--out", str(out)]) == 0
    with open(out / "results.json") as f:
        return out, json.load(f)


def test_demo_writes_every_file(demo):
    out, results = demo
    for name in (
        "results.json",
        "report.md",
        "rotation_curves.png",
        "epoch_rotation.png",
        "accuracy.png",
    ):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    for fig in results["figures"]:
        assert f"]({fig})" in report  # every figure is embedded
    assert set(results["optimizers"]) == set(OPTIMIZERS)


def test_demo_results_are_complete(demo):
    _, results = demo
    layers = results["layers"]
    assert layers == ["Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"]
    epochs = results["config"]["epochs"]
    spe = results["steps_per_epoch"]
    for key in OPTIMIZERS:
        run = results["optimizers"][key]
        cd = np.asarray(run["cosine_distance"]["values"])
        assert cd.shape == (epochs * spe + 1, len(layers))
        assert np.all(cd[0] == 0) and np.all((cd >= 0) & (cd <= 2))
        np.testing.assert_allclose(cd[-1], run["final_cosine_distance"], atol=1e-6)
        assert np.asarray(run["epoch_rotation"]).shape == (epochs, len(layers))
        assert len(run["test_acc"]) == len(run["train_acc"]) == epochs
        fin = run["final"]
        assert fin["cos_min"] <= fin["cos_mean"] <= fin["cos_max"]
        assert fin["train_acc"] > 0.8, key  # every optimizer learns the digits


def test_figures_have_one_line_per_layer(demo):
    _, results = demo
    n_layers = len(results["layers"])
    epochs = results["config"]["epochs"]
    for make in (_report.rotation_curves_figure, _report.epoch_rotation_figure):
        fig = make(results)
        panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
        assert len(panels) == len(OPTIMIZERS)
        for ax in panels:
            assert len(ax.lines) == n_layers
            assert [ln.get_label() for ln in ax.lines] == results["layers"]
        # a colour bar by depth, one tick per layer
        (cbar,) = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
        assert "depth" in cbar.get_ylabel() and len(cbar.get_yticks()) == n_layers
        # the last layer of the first panel plots that optimizer's saved curve
        run = next(iter(results["optimizers"].values()))
        assert panels[0].get_title().startswith(run["label"])
        if make is _report.rotation_curves_figure:
            line = panels[0].lines[-1]
            cd = run["cosine_distance"]
            np.testing.assert_allclose(line.get_ydata(), np.asarray(cd["values"])[:, -1], rtol=1e-6)
            np.testing.assert_allclose(
                line.get_xdata(), np.asarray(cd["step"]) / results["steps_per_epoch"]
            )
            assert all(ax.get_ylim() == (0.0, 1.0) for ax in panels)
        else:
            line = panels[0].lines[0]
            np.testing.assert_allclose(line.get_ydata(), np.asarray(run["epoch_rotation"])[:, 0])
            np.testing.assert_array_equal(line.get_xdata(), np.arange(1, epochs + 1))
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_layca_rotates_more_and_more_uniformly_than_sgd(demo):
    """Seed 000 §4-5: Layca (α = 0, high ρ) gives large and uniform layer rotation, SGD small,
    depth-dependent rotation."""
    _, results = demo
    sgd = np.asarray(results["optimizers"]["sgd"]["final_cosine_distance"])
    layca = np.asarray(results["optimizers"]["layca"]["final_cosine_distance"])
    assert layca.min() > sgd.max()  # every Layca layer rotated more than any SGD layer
    assert _report.uniformity(layca) > _report.uniformity(sgd) + 0.1
    cv = lambda v: v.std() / v.mean()
    assert cv(layca) < cv(sgd)


def test_same_seed_same_results(demo, tmp_path):
    _, results = demo
    assert cli.main(["--quick", "--no-progress", "--out", str(tmp_path)]) == 0  # demo is default
    with open(tmp_path / "results.json") as f:
        again = json.load(f)
    results, again = dict(results), dict(again)
    results.pop("timings"), again.pop("timings")
    assert again == results


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--dataset", "cifar1000"], "unknown dataset"),
        (["demo", "--epochs", "-3"], "--epochs must be >= 1; got -3"),
        (["demo", "--epochs", "0"], "--epochs must be >= 1; got 0"),
        (["sweep", "--epochs", "0"], "--epochs must be >= 1; got 0"),
        (["demo", "--batch-size", "0"], "--batch-size must be >= 1; got 0"),
        (["demo", "--epochs", "many"], "--epochs must be an integer"),
        (["demo", "--model", "transformer"], "invalid choice"),
        (["demo", "--no-such-flag"], "unrecognized arguments"),
        (["sweep", "--alphas", "0,2"], "--alphas must lie in [-1, 1]"),
        (["demo", "--dataset", "missing_file.npz"], "not found"),
        (["demo", "--optimizers", "sgd,rmsprop"], "unknown ['rmsprop']"),
        (["lca", "--lr", "-1"], "--lr must be > 0"),
    ],
)
def test_cli_errors_exit_2_with_one_line(argv, message, capsys, tmp_path):
    assert cli.main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.startswith("optax-layca: error:") and err.count("\n") == 1
    assert "Traceback" not in err


def test_bad_npz_exits_2(capsys, tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip file")
    incomplete = tmp_path / "incomplete.npz"
    np.savez(incomplete, x_train=np.zeros((4, 3)), y_train=np.zeros(4, int))
    badlabels = tmp_path / "badlabels.npz"
    np.savez(
        badlabels,
        x_train=np.zeros((4, 3)),
        y_train=np.zeros(3, int),
        x_test=np.zeros((2, 3)),
        y_test=np.zeros(2, int),
    )
    for path, msg in (
        (garbage, "cannot read"),
        (incomplete, "missing arrays"),
        (badlabels, "y_train must have shape"),
    ):
        assert cli.main(["demo", "--dataset", str(path), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err


def test_good_npz_and_other_models_run(tmp_path):
    """A user's .npz trains end to end (only two optimizers, one epoch, to stay quick)."""
    rng = np.random.default_rng(0)
    path = tmp_path / "blobs.npz"
    centers = rng.normal(size=(3, 6)) * 3
    y = rng.integers(0, 3, 150)
    x = centers[y] + rng.normal(size=(150, 6))
    np.savez(path, x_train=x[:120], y_train=y[:120], x_test=x[120:], y_test=y[120:])
    cfg = cli.TrainConfig(dataset=str(path), model="mlp", epochs=2, batch_size=50)
    res = cli.run_demo(cfg, str(tmp_path / "o"), progress=False, which=("sgd", "layca"))
    assert set(res["optimizers"]) == {"sgd", "layca"}
    assert res["dataset"]["num_classes"] == 3 and res["dataset"]["train"] == 120
    assert res["optimizers"]["layca"]["final"]["train_acc"] > 0.6


def test_sweep_quick(tmp_path):
    out = tmp_path / "sweep"
    argv = [
        "sweep",
        "--quick",
        "--no-progress",
        "--epochs",
        "2",
        "--ks=-4,-2",
        "--alphas=-0.5,0,0.5",
        "--out",
        str(out),
    ]
    assert cli.main(argv) == 0
    with open(out / "results.json") as f:
        res = json.load(f)
    assert len(res["configs"]) == 6
    for name in ("sweep_heatmap.png", "sweep_curves.png", "report.md"):
        assert (out / name).stat().st_size > 0
    by = {(c["k"], c["alpha"]): np.asarray(c["epoch_cosine_distance"]) for c in res["configs"]}
    # higher rho(0) rotates every layer more (Layca controls the rate exactly)
    assert np.all(by[(-2, 0.0)][-1] > by[(-4, 0.0)][-1])
    # alpha < 0 favours the first layers, alpha > 0 the last ones
    assert by[(-2, -0.5)][-1][0] > by[(-2, -0.5)][-1][-1]
    assert by[(-2, 0.5)][-1][-1] > by[(-2, 0.5)][-1][0]
    # the vmapped grid trains each configuration exactly like a single run would
    from optax_layca import layca

    cfg = cli.TrainConfig(epochs=2, seed=0)
    data, _, params0, apply, order = cli._setup(cfg)
    scale = cli._step_decay(cfg, res["steps_per_epoch"])
    tx = layca(lambda step: 3.0**-2 * scale(step), alpha=0.5, layer_order=order)
    _, rec = cli.train_run(apply, tx, params0, order, data, cfg)
    np.testing.assert_allclose(by[(-2, 0.5)][-1], rec.cosine_distance[-1], rtol=1e-3, atol=1e-5)
    single = next(c for c in res["configs"] if (c["k"], c["alpha"]) == (-2, 0.5))
    assert abs(single["test_acc"] - rec.test_acc[-1]) < 0.01


def test_python_dash_m_help():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(  # noqa: PLW1510 - the return code is asserted
        [sys.executable, "-m", "optax_layca", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0
    assert "demo" in proc.stdout and "sweep" in proc.stdout and "lca" in proc.stdout


def test_lca_quick(tmp_path):
    out = tmp_path / "lca"
    assert cli.main(["lca", "--quick", "--no-progress", "--iters", "12", "--out", str(out)]) == 0
    with open(out / "results.json") as f:
        res = json.load(f)
    for name in (
        "report.md",
        "lca_curves.png",
        "lca_per_layer.png",
        "helping_fraction.png",
        "moments_raster.png",
    ):
        assert (out / name).stat().st_size > 0, name
    per_layer = np.asarray(res["per_layer"])
    assert per_layer.shape == (12, len(res["leaves"]))
    # the allocation adds up to the measured loss change (seed 004: < 1% cumulatively)
    np.testing.assert_allclose(per_layer.sum(1), res["loss_change"], atol=1e-3)
    summary = res["summary"][res["main_run"]]
    assert abs(summary["rk4"]["cumulative_error_pct"]) < 1.0
    # first order is much worse than RK4 (Table S1)
    for row in res["error_table"]:
        assert abs(row["total_error_fo_pct"]) > abs(row["total_error_rk4_pct"])
    frac = np.asarray(res["helping_fraction"]["helping"])
    assert np.all((frac > 0.3) & (frac < 1.0))
    report = (out / "report.md").read_text()
    assert "Total error, RK4" in report and "moments_raster.png" in report


def test_unusable_out_exits_2_before_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert cli.main(["demo", "--quick", "--no-progress", "--out", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert "cannot create output folder" in err and err.count("\n") == 1


def test_zero_epochs_rejected_before_training(tmp_path):
    """Direct calls get the CLI's check too (no run reporting nan accuracy)."""
    with pytest.raises(cli.CLIError, match="must be >= 1; got 0"):
        cli.run_demo(cli.TrainConfig(epochs=0), str(tmp_path / "o"), progress=False)
