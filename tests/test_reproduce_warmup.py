"""``optax-layca reproduce warmup --quick`` (Carbonnelle & De Vleeschouwer, extended version,
2019, §5.3, Fig. 4), and its warmup schedule against a numpy transcription of the paper's."""

from __future__ import annotations

import types

import numpy as np
from _reproduce_utils import check_files_and_section, non_finite, panel_titles, quick_fixture

from optax_layca.app._experiments import _warmup

NAME = "warmup"


record = quick_fixture(NAME)


def test_files_json_and_report_section(record):
    out, rec = record
    check_files_and_section(out, NAME, rec, may_be_null=("val_acc",))  # no validation split
    diverged = {k for k, r in rec["runs"].items() if r["diverged_at"] is not None}
    assert diverged <= {_warmup.sgd_key(max(rec["sgd_ks"]), d) for d in rec["warmups"]}
    kept = {**rec, "runs": {k: r for k, r in rec["runs"].items() if k not in diverged}}
    assert non_finite(kept, allowed=("diverged_at", "config", "val_acc")) == []
    assert rec["high_k"] in rec["sgd_ks"] and len(rec["shown"]) == len(rec["warmups"]) + 2


def test_figure_has_the_papers_panels(record):
    import matplotlib.pyplot as plt

    _, rec = record
    fig = _warmup.figure(rec)
    titles = panel_titles(fig)
    assert titles[0].startswith("Fig. 4") and titles[1].startswith("rotation per epoch")
    curves = [ax for ax in fig.subfigs[0].axes if ax.get_label() != "<colorbar>"]
    assert len(curves) == len(rec["shown"]) and all(len(ax.lines) == 6 for ax in curves)
    assert [ax.get_title().split("\n")[0] for ax in curves] == [
        rec["runs"][k]["label"] for k in rec["shown"]
    ]
    plt.close(fig)


def test_warmup_schedule_is_the_papers():
    """From a tenth of the rate, linearly to the rate after d epochs, then the step decay."""
    spe, lr = 10, 0.3
    decay = lambda step: np.where(step >= 35, 0.2, 1.0)
    task = types.SimpleNamespace(
        steps_per_epoch=spe, schedule=lambda base: lambda step: base * decay(step)
    )
    steps = np.arange(60)
    for i, d in enumerate(_warmup.WARMUPS):
        fn = _warmup.warmed_schedule(task, {"lr": lr, "warmup": np.float32(i)})
        ramp = 0.1 + 0.9 * np.minimum(steps / (d * spe), 1.0) if d else np.ones(len(steps))
        got = np.asarray([float(fn(t)) for t in steps])
        np.testing.assert_allclose(got, lr * decay(steps) * ramp, rtol=1e-6)  # float32 products


def test_layca_follows_the_warmup(record):
    """Layca turns each layer by arctan(ρ(t)) at step t: the recorded angles trace the ramp."""
    _, rec = record
    d = rec["warmups"][-1]
    hist = rec["histories"][_warmup.layca_key(d)]
    spe = rec["steps_per_epoch"]
    keep = (hist.steps > 0) & (hist.steps <= d * spe)
    assert keep.sum() >= 3
    ramp = 0.1 + 0.9 * (hist.steps[keep] - 1) / (d * spe)  # update t uses the rate of count t-1
    for path, angle in hist.get("step_angle").items():
        # float32 rate and angle: a few ulps (rtol 1e-5 = 80 ulps)
        np.testing.assert_allclose(
            angle[keep], np.arctan(_warmup.LAYCA_RHO * ramp), rtol=1e-5, err_msg=path
        )
