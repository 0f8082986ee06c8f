"""The framework of ``optax-layca reproduce``: registry, runner, records, shared report."""

from __future__ import annotations

import glob
import multiprocessing
import os
import re

import numpy as np
import pytest

from optax_layca import _io
from optax_layca.app import _experiments, _report
from optax_layca.app._experiments import _common, _runner

SEEDS = {  # the paper of each reference, by title, as plain text
    "An experimental study of layer-level training speed and its impact on generalization": "000_*.txt",
    "LCA: Loss Change Allocation for Neural Network Training": "004_*.txt",
    "Which Layer is Learning Faster? A Systematic Exploration of Layer-wise Convergence Rate "
    "for Deep Neural Networks": "003_*.txt",
    "Layer rotation: a surprisingly powerful indicator of generalization in deep networks?": "002_*.txt",
}
PAPERS = {title: glob.glob(f"/work/shared/seeds/{pattern}") for title, pattern in SEEDS.items()}
CARBONNELLE = [
    "one-layer-at-a-time",
    "rotation-grid",
    "weight-decay",
    "adaptive",
    "lars",
    "warmup",
    "adapt-copy",
    "features",
]  # first paper by figure, then the extended


def test_registry_lists_the_papers_experiments_in_order():
    reg = _experiments.registry()
    names = list(reg)
    carbonnelle = [n for n in names if reg[n].reference.authors.startswith("Carbonnelle")]
    assert carbonnelle == CARBONNELLE
    lan = ["lca-table", "lca-layers", "phase-lag", "synchronisation", "class-specialisation"]
    assert [n for n in names if reg[n].reference.authors.startswith("Lan")] == lan
    assert names.index("convergence-bias") < names.index(lan[0])  # Chen sorts before Lan
    for exp in reg.values():
        ref = exp.reference
        assert ref.title in SEEDS and ref.year in (2019, 2023)
        assert any(w in ref.where for w in ("Fig.", "Table", "§", "Definition"))
        assert exp.claim and exp.stand_in
        assert all(callable(getattr(exp, f)) for f in ("run", "figure", "verdict"))


def test_claims_are_quotes_of_the_paper():
    """Every fragment of a claim (between "[...]") appears word for word in its paper."""
    words = lambda t: " ".join(re.sub(r"[^a-z0-9%]+", " ", t.lower()).split())
    checked = 0
    for exp in _experiments.registry().values():
        files = PAPERS[exp.reference.title]
        if not files:  # the paper's text is not on this machine
            continue
        with open(files[0], encoding="utf-8") as f:
            paper = words(f.read())
        for fragment in exp.claim.split("[...]"):
            assert words(fragment) in paper, (exp.name, fragment)
        checked += 1
    if not checked:
        pytest.skip("no paper's text is on this machine")


def test_unknown_experiment_names_the_valid_ones():
    with pytest.raises(KeyError, match="choose from " + ", ".join(CARBONNELLE)):
        _experiments.get("nope")


def _merge(args):
    path, name = args
    for i in range(5):
        _report.merge_report_section(path, name, f"{name} v{i}", title="T")


def test_report_sections_merge_under_a_lock(tmp_path):
    path = str(tmp_path / "report.md")
    _report.merge_report_section(path, "b", "B one", title="T")
    _report.merge_report_section(path, "a", "A", title="T")
    _report.merge_report_section(path, "b", "B two", title="T")
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# T\n") and "B one" not in text
    assert text.index("A") < text.index("B two")  # sorted sections, each once
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        pool.map(_merge, [(path, n) for n in ("x", "y", "z")])
    text = (tmp_path / "report.md").read_text()
    for name in ("a", "b", "x", "y", "z"):
        assert text.count(f"<!-- optax-layca section: {name} -->") == 1
    assert "x v4" in text and "y v4" in text and "z v4" in text


def test_json_records_are_atomic_and_checked(tmp_path):
    path = str(tmp_path / "r.json")
    _report.write_json(
        path,
        {"identity": {"format": _report.JSON_FORMAT}, "x": np.float32(np.nan), "y": np.arange(3)},
    )
    record = _report.read_json(path)
    assert record["x"] is None and record["y"] == [0, 1, 2] and record["complete"] is True
    with open(path, "r+") as f:  # a truncated or foreign file is refused
        f.truncate(20)
    with pytest.raises(ValueError):
        _report.read_json(path)

    def crash(f):
        f.write(b"half a record")
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        _io.atomic_write(str(tmp_path / "never"), crash)
    assert sorted(os.listdir(tmp_path)) == ["r.json"]  # no temp file left, nothing replaced


def test_verdict_rules():
    agrees, no, maybe = _experiments.AGREES, _experiments.NOT_REPRODUCED, _experiments.INCONCLUSIVE
    assert _common.combine([agrees, agrees]) == agrees
    assert _common.combine([agrees, maybe]) == maybe
    assert _common.combine([maybe, no, agrees]) == no
    # 2 standard errors of a difference of accuracies measured on 1000 examples
    se = _common.accuracy_se(0.5, 0.5, 1000)
    assert _common.compare_accuracies(0.5 + 2.1 * se, 0.5, 1000, "greater")[0] == agrees
    assert _common.compare_accuracies(0.5 - 2.1 * se, 0.5, 1000, "greater")[0] == no
    assert _common.trend_status(_common.rank_trend([1, 2, 3, 4], [4, 3, 2, 1])) == no
    assert _common.trend_status(_common.rank_trend([1, 2, 3], [1, 2, 3])) == maybe


def _fake_experiment(status: str):
    """A registered experiment that trains nothing: a real two-record history and numbers."""
    import jax.numpy as jnp
    import optax

    from optax_layca.rotation import RotationHistory, track_rotation

    def run(config):
        params = {"Dense_0": {"kernel": jnp.ones((3, 2))}}
        tx = track_rotation(optax.sgd(0.1))
        hist = RotationHistory()
        hist.record(0, tx.init(params))
        ident = {
            "format": _report.JSON_FORMAT,
            "config": {"model": "none", "epochs": 0, "batch_size": 1},
            "seed": config.seed,
            "quick": config.quick,
            "versions": {"optax_layca": "test"},
            "dataset": {"name": "none", "train": 0, "test": 0, "fingerprint": "0" * 32},
        }
        return {"identity": ident, "value": 0.5, "histories": {"only": hist}}

    def figure(results):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, results["value"]])
        return fig

    return _experiments.Experiment(
        name="fake-test",
        reference=_experiments.Reference("A & B", 2000, "Fig. 0"),
        claim="a claim",
        stand_in="nothing",
        run=run,
        figure=figure,
        verdict=lambda results: (status, "measured 0.5"),
    )


def test_runner_writes_figure_json_histories_and_section(tmp_path, monkeypatch):
    from optax_layca.rotation import RotationHistory

    monkeypatch.setitem(_experiments._REGISTRY, "fake-test", _fake_experiment("inconclusive"))
    config = _experiments.ExperimentConfig(quick=True, seed=3, out=str(tmp_path), progress=False)
    record = _runner.reproduce("fake-test", config)
    assert (tmp_path / "fake-test.png").stat().st_size > 0
    saved = _report.read_json(str(tmp_path / "fake-test.json"))
    assert saved["verdict"] == {"status": "inconclusive", "text": "measured 0.5"}
    assert saved["experiment"]["reference"]["authors"] == "A & B" and saved["value"] == 0.5
    info = saved["histories"]["only"]
    assert _report.file_digest(str(tmp_path / info["file"])) == info["blake2b"]
    assert len(RotationHistory.load(tmp_path / info["file"])) == 1
    section = (tmp_path / "report.md").read_text()
    assert "> a claim" in section and "**Verdict: inconclusive.** measured 0.5" in section
    assert "](fake-test.png)" in section and "seed 3" in section and record["figure"]


def test_runner_refuses_an_unknown_status(tmp_path, monkeypatch):
    monkeypatch.setitem(_experiments._REGISTRY, "fake-test", _fake_experiment("probably"))
    config = _experiments.ExperimentConfig(out=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="verdict status 'probably'"):
        _runner.reproduce("fake-test", config)
