"""End-to-end tests of the ``optax-layca`` command (in-process, small configurations)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from optax_layca.app import _commands, _report, cli

OPTIMIZERS = tuple(_commands.DEMO_OPTIMIZERS)
QUICK = cli.QUICK_DEMO  # demo --quick: SGD, SGD + weight decay, Layca, LARS


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One quick demo (MNIST-1D, 6-layer MLP), shared by the tests below."""
    out = tmp_path_factory.mktemp("demo")
    assert cli.main(["demo", "--quick", "--no-progress", "--out", str(out)]) == 0
    return out, _report.read_json(str(out / "results.json"))


def test_demo_writes_every_file_with_its_identity(demo):
    out, record = demo
    for name in ("report.md", "rotation_curves.png", "epoch_rotation.png", "accuracy.png"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert all(f"]({fig})" in report for fig in record["figures"])
    ident = record["identity"]
    assert ident["command"] == "demo" and ident["seed"] == 0
    assert ident["config"]["model"] == "deep" and ident["dataset"]["name"] == "mnist1d"
    assert len(ident["dataset"]["fingerprint"]) == 32 and ident["versions"]["optax_layca"]
    assert list(record["runs"]) == list(QUICK) and set(QUICK) < set(OPTIMIZERS)
    assert len(ident["layers"]) == 6  # the default model is deep enough for α to matter


def test_histories_are_saved_one_file_per_run(demo):
    from optax_layca.rotation import RotationHistory

    out, record = demo
    layers = record["identity"]["layers"]
    for key, info in record["histories"].items():
        path = out / info["file"]
        assert _report.file_digest(str(path)) == info["blake2b"]
        hist = RotationHistory.load(path)
        cd = hist.get("cosine_distance", layers)
        final = record["runs"][key]["final_cosine_distance"]
        # JSON keeps 7 significant digits of the float32 value
        np.testing.assert_allclose(
            [cd[p][-1] for p in layers], [final[p] for p in layers], rtol=1e-6, atol=1e-9
        )
        ids, _ = hist.per_epoch_rotation()
        assert ids.tolist() == [1, 2, 3]


def test_demo_numbers_are_complete_and_finite(demo):
    _, record = demo
    for key, run in record["runs"].items():
        assert run["diverged_at"] is None, key
        assert len(run["epoch_loss"]) == 3 and run["eval_epochs"] == [0, 1, 2, 3]
        fin = run["final"]
        assert 0 <= fin["cos_min"] <= fin["cos_mean"] <= fin["cos_max"] <= 2
        assert all(np.isfinite(v) for v in (*run["epoch_loss"], *run["test_acc"]))


def test_figures_show_every_run_and_layer(demo):
    import matplotlib.pyplot as plt

    from optax_layca.app._figures import histories_panels
    from optax_layca.rotation import RotationHistory

    out, record = demo
    layers = record["identity"]["layers"]
    hists = {
        run["label"]: RotationHistory.load(out / record["histories"][key]["file"])
        for key, run in record["runs"].items()
    }
    for kind in ("curves", "epoch"):
        fig = histories_panels(
            kind, hists, layers, title="t", steps_per_epoch=record["identity"]["steps_per_epoch"]
        )
        panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
        assert len(panels) == len(QUICK)
        assert all([ln.get_label() for ln in ax.lines] == layers for ax in panels)
        (bar,) = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
        assert "depth" in bar.get_ylabel() and len(bar.get_yticks()) == len(layers)
        plt.close(fig)


def test_same_seed_same_numbers(tmp_path):
    argv = ["demo", "--quick", "--epochs", "1", "--optimizers", "sgd,layca", "--no-progress"]
    records = []
    for name in ("a", "b"):
        assert cli.main([*argv, "--out", str(tmp_path / name)]) == 0
        record = _report.read_json(str(tmp_path / name / "results.json"))
        record.pop("timings")
        for run in record["runs"].values():
            run.pop("seconds")
        records.append(record)
    assert records[0] == records[1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["frobnicate"], "unknown command 'frobnicate'; choose from demo, sweep, lca, reproduce"),
        (["demo", "--dataset", "cifar1000"], "unknown dataset"),
        (["demo", "--epochs", "-3"], "--epochs must be >= 1; got -3"),
        (["sweep", "--epochs", "0"], "--epochs must be >= 1; got 0"),
        (["demo", "--epochs", "many"], "--epochs must be an integer"),
        (["demo", "--batch-size", "0"], "--batch-size must be >= 1; got 0"),
        (["demo", "--seed", str(2**32)], "--seed must be in [0, 4294967295]"),
        (["demo", "--seed", "-1"], "--seed must be in [0, 4294967295]"),
        (["demo", "--model", "transformer"], "invalid choice"),
        (["demo", "--no-such-flag"], "unrecognized arguments"),
        (["sweep", "--alphas", "0,2"], "--alphas must lie in [-1.0, 1.0]"),
        (["demo", "--dataset", "missing_file.npz"], "not found"),
        (["demo", "--optimizers", "sgd,rmsprop"], "unknown ['rmsprop']"),
        (["lca", "--lr", "-1"], "--lr must be > 0"),
        (["lca", "--lr", "nan"], "--lr must be > 0"),
        (["lca", "--iters", "3", "--epochs", "1"], "not allowed with argument"),
        (["reproduce"], "give an experiment NAME"),
        (["reproduce", "no-such-figure"], "unknown experiment 'no-such-figure'; choose from"),
        (["reproduce", "lars", "--dataset", "digits"], "unrecognized arguments"),
        (["demo", "--epochs", str(10**9)], "exceed optax's int32 step counter"),
    ],
)
def test_errors_exit_2_with_one_line(argv, message, capsys, tmp_path):
    assert cli.main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.startswith("optax-layca: error:") and err.count("\n") == 1
    assert "Traceback" not in err


def _npz(path, x, y, xt=None, yt=None):
    np.savez(
        path, x_train=x, y_train=y, x_test=x if xt is None else xt, y_test=y if yt is None else yt
    )
    return str(path)


def test_data_errors_exit_2_with_one_line(capsys, tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip file")
    x = np.ones((8, 3), np.float32)
    nan = x.copy()
    nan[5, 2] = np.nan
    cases = [
        (str(garbage), "cannot read"),
        (_npz(tmp_path / "nan.npz", nan, np.zeros(8, int)), "NaN values in feature 2"),
        (_npz(tmp_path / "big.npz", x, np.full(8, 10**9)), "implies 1000000001 classes"),
        (_npz(tmp_path / "neg.npz", x, np.full(8, -2)), "negative label"),
        (_npz(tmp_path / "empty.npz", np.ones((8, 0)), np.zeros(8, int)), "empty feature axis"),
    ]
    for path, message in cases:
        assert cli.main(["demo", "--dataset", path, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_unusable_out_exits_2_before_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert cli.main(["demo", "--quick", "--no-progress", "--out", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert "cannot create output folder" in err and err.count("\n") == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_exits_2(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    assert cli.main(["demo", "--quick", "--out", str(ro)]) == 2
    assert "not writable" in capsys.readouterr().err


@pytest.fixture
def blobs(tmp_path):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 6)) * 3
    y = rng.integers(0, 3, 150)
    x = centers[y] + rng.normal(size=(150, 6))
    return _npz(tmp_path / "blobs.npz", x[:120], y[:120], x[120:], y[120:])


def test_a_diverging_optimizer_is_named_and_the_others_kept(blobs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(
        _commands.DEMO_OPTIMIZERS, "sgd", ("SGD", "sgd", {"lr": 1e9, "weight_decay": 0.0})
    )
    out = tmp_path / "o"
    argv = [
        "demo",
        "--dataset",
        blobs,
        "--model",
        "mlp",
        "--epochs",
        "2",
        "--optimizers",
        "sgd,layca",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "diverged (non-finite training loss): SGD (epoch 1)" in err and err.count("\n") == 1
    record = _report.read_json(str(out / "results.json"))
    assert record["runs"]["sgd"]["diverged_at"] == 1
    assert record["runs"]["sgd"]["final"]["test_acc"] is None  # NaN is written as null
    assert record["runs"]["layca"]["final"]["train_acc"] > 0.6
    assert (out / "rotation_curves.png").stat().st_size > 0


def test_help_and_version_do_not_import_jax():
    code = (
        "import sys; from optax_layca.app import cli\n"
        "try: cli.main(['--help'])\nexcept SystemExit: pass\n"
        "cli.main(['--version']); cli.main(['reproduce', '--help'])\n"
        "assert 'jax' not in sys.modules, 'jax imported'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "demo" in proc.stdout and "reproduce" in proc.stdout and "0.2" in proc.stdout


def test_python_dash_m_help():
    proc = subprocess.run(
        [sys.executable, "-m", "optax_layca", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0
    assert all(c in proc.stdout for c in cli.COMMANDS)


def test_reproduce_list(capsys):
    assert cli.main(["reproduce", "--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == [
        "one-layer-at-a-time", "rotation-grid", "weight-decay", "adaptive", "lars", "warmup",
        "adapt-copy", "features", "convergence-bias", "lca-table", "lca-layers", "phase-lag",
        "synchronisation", "class-specialisation",
    ]
    authors = ["Carbonnelle & De Vleeschouwer, 2019"] * 8 + ["Chen, Yuille & Zhou, 2023"]
    authors += ["Lan, Liu, Zhou & Yosinski, 2019"] * 5
    assert all(a in line for a, line in zip(authors, lines, strict=True))


def test_sweep_controls_the_rates(tmp_path):
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
    record = _report.read_json(str(out / "results.json"))
    assert (out / "sweep.png").stat().st_size > 0 and len(record["histories"]) == 6
    final = {
        k: np.asarray(list(r["final_cosine_distance"].values())) for k, r in record["runs"].items()
    }
    # Layca sets the rotation rate: higher ρ(0) rotates every layer more; α < 0 favours the
    # first layer, α > 0 the last one (Carbonnelle & De Vleeschouwer, 2019, Eq. 1)
    assert np.all(final["k-2_a+0.00"] > final["k-4_a+0.00"])
    assert final["k-2_a-0.50"][0] > final["k-2_a-0.50"][-1]
    assert final["k-2_a+0.50"][-1] > final["k-2_a+0.50"][0]


def test_lca_iters_and_epochs_are_honoured(blobs, tmp_path):
    out = tmp_path / "lca"
    argv = ["lca", "--dataset", blobs, "--model", "mlp", "--batch-size", "40", "--no-progress"]
    assert cli.main([*argv, "--iters", "5", "--out", str(out)]) == 0
    record = _report.read_json(str(out / "results.json"))
    per_layer = np.asarray(record["per_layer"])
    assert per_layer.shape == (5, len(record["layers"])) and record["identity"]["iterations"] == 5
    assert record["layers"] == ["Dense_0", "Dense_1"]  # modules (kernel + bias), forward order
    # the allocation adds up to the measured loss change (Lan et al., 2019: RK4 error < 1%)
    np.testing.assert_allclose(per_layer.sum(1), record["loss_change"], atol=1e-3)
    for row in record["error_table"]:  # first order is much worse than RK4 (Table S1)
        assert abs(row["total_error_fo_pct"]) > abs(row["total_error_rk4_pct"])
    for name in ("report.md", "lca_curves.png", "lca_per_layer.png", "moments_raster.png"):
        assert (out / name).stat().st_size > 0, name
    assert cli.main([*argv, "--epochs", "2", "--out", str(tmp_path / "e")]) == 0
    record = _report.read_json(str(tmp_path / "e" / "results.json"))
    assert record["identity"]["iterations"] == 6  # 2 epochs of ceil(120 / 40) steps


@pytest.mark.slow
@pytest.mark.parametrize("model", ["cnn", pytest.param("resnet", marks=pytest.mark.extended)])
def test_quick_demo_of_other_models(model, tmp_path):
    assert (
        cli.main(["demo", "--quick", "--model", model, "--no-progress", "--out", str(tmp_path)])
        == 0
    )
    record = json.loads((tmp_path / "results.json").read_text())
    assert all(r["diverged_at"] is None for r in record["runs"].values())
