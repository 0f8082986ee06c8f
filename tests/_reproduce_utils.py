"""Shared by the ``tests/test_reproduce_*.py`` files: run an experiment's ``--quick``
configuration through the command line and read back what it wrote."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from optax_layca.app import _report, cli


def quick_fixture(name: str):
    """A module-scoped fixture ``record`` -> ``(out folder, record)`` of
    :func:`run_quick`: one quick run shared by a test file."""

    @pytest.fixture(scope="module")
    def record(tmp_path_factory):
        out = tmp_path_factory.mktemp(name)
        return out, run_quick(name, out)

    return record


def run_quick(name: str, out: Path) -> dict[str, Any]:
    """``optax-layca reproduce NAME --quick`` into ``out``; returns the JSON record with the
    rotation histories loaded back from their files (checked against their digests)."""
    from optax_layca.rotation import RotationHistory

    assert cli.main(["reproduce", name, "--quick", "--no-progress", "--out", str(out)]) == 0
    record = _report.read_json(str(out / f"{name}.json"))
    histories = {}
    for key, info in record["histories"].items():
        assert _report.file_digest(str(out / info["file"])) == info["blake2b"], key
        histories[key] = RotationHistory.load(out / info["file"])
    return {**record, "histories": histories}


def quick_record_fixture(name: str):
    """A module-scoped fixture: ``(out folder, record)`` of one ``reproduce NAME --quick``."""

    @pytest.fixture(scope="module")
    def record(tmp_path_factory):
        out = tmp_path_factory.mktemp(name)
        return out, run_quick(name, out)

    return record


def non_finite(obj: Any, path: str = "", allowed: tuple[str, ...] = ()) -> list[str]:
    """Paths of the None / non-finite numbers in a JSON record, outside keys ``allowed``."""
    if isinstance(obj, dict):
        return [
            p
            for k, v in obj.items()
            if k not in allowed
            for p in non_finite(v, f"{path}/{k}", allowed)
        ]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in non_finite(v, f"{path}[{i}]", allowed)]
    if obj is None or (isinstance(obj, float) and not math.isfinite(obj)):
        return [path]
    return []


def check_files_and_section(
    out: Path, name: str, record: dict[str, Any], may_be_null: tuple[str, ...] = ()
) -> None:
    """The figure, the JSON and the report section (claim, stand-in, verdict) are there, and
    every number of the JSON is finite (outside the configuration, the divergence epochs
    and the keys ``may_be_null``)."""
    assert non_finite(record, allowed=("config", "diverged_at", *may_be_null)) == []
    assert (out / f"{name}.png").stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert f"<!-- optax-layca section: {name} -->" in report
    verdict = record["verdict"]
    assert f"**Verdict: {verdict['status']}.** {verdict['text']}" in report
    assert record["experiment"]["claim"] in report and record["experiment"]["stand_in"] in report
    assert record["identity"]["quick"] is True and record["identity"]["dataset"]["fingerprint"]


def panel_titles(fig) -> list[str]:
    """Titles of the (sub)figures and of every visible axes of a figure."""
    subs = [s.get_suptitle() for s in fig.subfigs]
    return subs + [ax.get_title() for ax in fig.axes if ax.get_visible()]
