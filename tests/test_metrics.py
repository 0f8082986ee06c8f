"""Metric writers: names and values of `optax_layca.metrics`, read back from real TensorBoard
event files (tensorboard's own reader) and from a W&B offline run file; clu is duck-typed."""

from __future__ import annotations

import glob
import math
import struct

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _utils import init_mlp, mlp_data, mlp_loss_jax, small_lca_run

from optax_layca import RotationHistory, metrics, track_rotation
from optax_layca.rotation import FIGURES

SIZES = (5, 20, 8, 3)
LAYERS = ("Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel")


def trained(per_unit=False, steps=6, epoch_len=3):
    """A monitored Adam run on the tanh MLP; a record every step, epochs with params."""
    params = jax.tree.map(jnp.asarray, init_mlp(SIZES))
    x, y = mlp_data(SIZES)
    tx = track_rotation(optax.adam(0.05), per_unit=per_unit)
    state = tx.init(params)
    hist = RotationHistory(every=1, per_unit=per_unit)
    step_fn = jax.jit(lambda p, s: tx.update(jax.grad(mlp_loss_jax)(p, x, y), s, p))
    traj = [params]
    for t in range(1, steps + 1):
        u, state = step_fn(params, state)
        params = optax.apply_updates(params, u)
        traj.append(params)
        end = t % epoch_len == 0
        hist.record(t, state, epoch=t // epoch_len if end else None, params=params if end else None)
    return hist, state, traj


@pytest.fixture(scope="module")
def run():
    return trained()


@pytest.fixture(scope="module")
def run_units():
    return trained(per_unit=True)


@pytest.fixture(scope="module")
def lca_run():
    return small_lca_run()


class CluLike:
    """The two methods of ``clu.metric_writers.MetricWriter`` that `write` calls."""

    def __init__(self):
        self.scalars, self.histograms = [], []

    def write_scalars(self, step, scalars):
        self.scalars.append((step, dict(scalars)))

    def write_histograms(self, step, arrays, num_buckets=None):
        self.histograms.append((step, dict(arrays)))


def test_state_names_and_values_match_the_monitor(run):
    hist, state, _ = run
    m = metrics.flatten(state)
    assert m.step == 6 and not m.histograms
    expected = {f"rotation/{name}/{p}" for name in FIGURES for p in LAYERS}
    assert {
        "rotation/cosine_distance/Dense_0/kernel",
        "rotation/step_angle/Dense_2/kernel",
    } < expected
    assert set(m.scalars) == expected
    for name in ("cosine_distance", "step_angle", "weight_norm"):
        got = {p: m.scalars[f"rotation/{name}/{p}"] for p in LAYERS}
        want = {p: float(v) for p, v in optax.tree.get(state, name).items()}
        assert got == want  # the same float32 numbers, widened: exact
    # the latest history record is the same state (plus the rotation of the epoch it ends)
    latest = metrics.flatten(hist).scalars
    assert {k: v for k, v in latest.items() if "epoch_rotation" not in k} == m.scalars


def test_history_every_record_and_epoch_rotation(run):
    hist, _, _ = run
    records = list(metrics.flatten_all(hist))
    assert [r.step for r in records] == list(range(1, 7))
    cos = hist.get("cosine_distance")
    for i, r in enumerate(records):
        for p in LAYERS:
            assert r.scalars[f"rotation/cosine_distance/{p}"] == float(cos[p][i])
    epochs, rot = hist.per_epoch_rotation()
    assert epochs.tolist() == [1, 2]
    with_epoch = [r for r in records if any("epoch_rotation" in k for k in r.scalars)]
    assert [r.step for r in with_epoch] == [3, 6]
    for r, j in zip(with_epoch, range(2)):
        assert r.scalars["rotation/epoch_rotation/Dense_1/kernel"] == float(
            rot["Dense_1/kernel"][j]
        )


def test_per_unit_vectors_become_histograms_or_scalars(run_units):
    hist, state, _ = run_units
    m = metrics.flatten(state)  # 20 and 8 and 3 units; default max_split = 16
    h = m.histograms["rotation/weight_norm/Dense_0/kernel"]
    np.testing.assert_array_equal(
        h, np.asarray(optax.tree.get(state, "weight_norm")["Dense_0/kernel"], np.float64)
    )
    assert "rotation/weight_norm/Dense_1/kernel" not in m.histograms
    want = np.asarray(optax.tree.get(state, "weight_norm")["Dense_1/kernel"])
    assert [
        m.scalars[f"rotation/weight_norm/Dense_1/kernel/{i}"] for i in range(8)
    ] == want.tolist()
    everything = metrics.flatten(state, max_split=0)
    assert not everything.scalars and len(everything.histograms) == 6 * 3


def test_nonfinite_kept_and_counted():
    hist = RotationHistory()
    v = np.linspace(0.0, 1.0, 20).astype(np.float32)
    v[3], v[7] = np.nan, np.inf
    hist.record(
        1, {"cosine_distance": {"a/kernel": jnp.asarray(v), "b/kernel": jnp.asarray(np.nan)}}
    )
    m = metrics.flatten(hist)
    assert math.isnan(m.scalars["rotation/cosine_distance/b/kernel"])
    assert m.scalars["rotation/cosine_distance/a/kernel/num_nonfinite"] == 2.0
    np.testing.assert_array_equal(
        m.histograms["rotation/cosine_distance/a/kernel"], np.delete(v, [3, 7])
    )


def test_nnx_optimizer_state():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, track_rotation(optax.sgd(0.1)), wrt=nnx.Param)
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 3))) ** 2))(model)
    opt.update(model, grads)
    m = metrics.flatten(opt.opt_state)
    assert m.step == 1 and m.scalars["rotation/step_angle/kernel"] > 0


def test_lca_result_and_history_rows(lca_run):
    results, history = lca_run
    m = metrics.flatten(results[1])
    assert m.step is None
    for name, value in results[1].per_layer.items():
        assert m.scalars[f"lca/per_layer/{name}"] == float(value)
    for name in ("total", "loss_change", "loss_before", "loss_after", "error", "num_splits"):
        assert m.scalars[f"lca/{name}"] == float(getattr(results[1], name))
    assert m.scalars["lca/converged"] in (0.0, 1.0)
    # per-class totals: C = 3 scalars, each class's allocations summed over layers
    want = np.asarray(results[1].per_class, np.float64).sum(axis=-1)
    assert [m.scalars[f"lca/per_class/{c}"] for c in range(3)] == want.tolist()
    change = np.asarray(results[1].class_loss_change, np.float64)
    assert [m.scalars[f"lca/class_loss_change/{c}"] for c in range(3)] == change.tolist()
    # per-parameter LCA: one histogram per leaf, every parameter in it
    hists = metrics.flatten(results[1], max_split=0).histograms
    for layer, leaves in results[1].per_param.items():
        for leaf, values in leaves.items():
            np.testing.assert_array_equal(
                hists[f"lca/per_param/{layer}/{leaf}"], np.ravel(values).astype(np.float64)
            )
    row = metrics.flatten(history, record=1)
    assert row.step == 11
    assert row.scalars == m.scalars  # a history row holds the same numbers as its result
    assert [r.step for r in metrics.flatten_all(history)] == [10, 11, 12]


def test_write_to_clu_like_writer_and_errors(run, lca_run):
    hist, state, _ = run
    w = CluLike()
    assert metrics.write(w, hist, record=None) == 6
    assert [s for s, _ in w.scalars] == list(range(1, 7)) and not w.histograms
    results, _ = lca_run
    assert metrics.write(w, results[0], step=40, max_split=0) == 1
    step, scalars = w.scalars[-1]
    assert step == 40 and "lca/per_layer/" + next(iter(results[0].per_layer)) in scalars
    ((step, hists),) = w.histograms  # per-class totals and per-parameter LCA
    assert step == 40 and "lca/per_class" in hists and "lca/per_param/Dense_0/kernel" in hists
    with pytest.raises(ValueError, match="step"):
        metrics.write(w, results[0])
    with pytest.raises(ValueError, match="single record"):
        metrics.write(w, hist, step=3, record=None)
    with pytest.raises(TypeError, match="write_scalars"):
        metrics.write(object(), state)
    with pytest.raises(TypeError, match="track_rotation"):
        metrics.flatten(optax.sgd(0.1).init({"w": jnp.ones(2)}))
    with pytest.raises(IndexError, match="record=6"):
        metrics.flatten(hist, record=6)
    with pytest.raises(ValueError, match="max_split"):
        metrics.flatten(state, max_split=-1)


def test_tensorboard_event_files_read_back(tmp_path, run_units, lca_run):
    tbx = pytest.importorskip("tensorboardX")
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    hist, _, _ = run_units
    results, history = lca_run
    with tbx.SummaryWriter(str(tmp_path)) as writer:
        assert metrics.write(writer, hist, record=None) == 6
        assert metrics.write(writer, history, record=None) == 3
    acc = ea.EventAccumulator(str(tmp_path), size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0})
    acc.Reload()
    tags = acc.Tags()
    cos = hist.get("cosine_distance")
    for i in range(8):  # Dense_1 has 8 units: scalars
        events = acc.Scalars(f"rotation/cosine_distance/Dense_1/kernel/{i}")
        assert [e.step for e in events] == list(range(1, 7))
        # TensorBoard stores float32; the monitor's figures are float32: exact
        assert [e.value for e in events] == cos["Dense_1/kernel"][:, i].tolist()
    assert "rotation/cosine_distance/Dense_0/kernel" in tags["histograms"]  # 20 units
    h = acc.Histograms("rotation/cosine_distance/Dense_0/kernel")
    assert [e.step for e in h] == list(range(1, 7))
    for e, row in zip(h, cos["Dense_0/kernel"].astype(np.float64)):
        assert e.histogram_value.num == 20
        assert e.histogram_value.min == row.min() and e.histogram_value.max == row.max()
        # float64 sum of 20 numbers in [0, 2]: |err| <= 20 * 2**-52 * 40, far below 1e-12
        assert abs(e.histogram_value.sum - row.sum()) < 1e-12
    for name in history.layer_names:
        events = acc.Scalars(f"lca/per_layer/{name}")
        assert [e.step for e in events] == [10, 11, 12]
        want = [results[t].per_layer[name] for t in range(3)]
        # float64 -> float32 rounding: relative 2**-24
        np.testing.assert_allclose([e.value for e in events], want, rtol=2**-23, atol=0)
    assert [e.value for e in acc.Scalars("lca/converged")] == [float(r.converged) for r in results]


def wandb_history(run_file):
    """History rows of a W&B ``.wandb`` file: its LevelDB-style log of ``Record`` protos
    (7-byte ``:W&B`` header, 32 KiB blocks, records with a 7-byte crc/length/type header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(run_file, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    pos, block, chunk, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if n == 0 and kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {(i.key or "/".join(i.nested_key)): i.value_json for i in record.history.item}
                )
    return rows


def test_wandb_offline_run_file(tmp_path, monkeypatch, run_units):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    hist, _, _ = run_units
    run = wandb.init(project="optax-layca-test", dir=str(tmp_path), mode="offline")
    try:
        assert metrics.write(run, hist, record=None) == 6
    finally:
        run.finish()
        wandb.teardown()  # stops the wandb service: the run file is complete only then
    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    rows = wandb_history(run_file)
    assert [int(r["_step"]) for r in rows] == list(range(1, 7))
    cos = hist.get("cosine_distance")
    for r, want in zip(rows, cos["Dense_2/kernel"]):
        got = [float(r[f"rotation/cosine_distance/Dense_2/kernel/{i}"]) for i in range(3)]
        assert got == want.astype(np.float64).tolist()  # JSON keeps float64 round-trip exact
        assert r["rotation/cosine_distance/Dense_0/kernel/_type"] == '"histogram"'
