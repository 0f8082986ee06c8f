"""Runs a registered experiment and writes its figure, JSON record and report section."""

from __future__ import annotations

import os
import time
from typing import Any

from . import STATUSES, Experiment, ExperimentConfig, get, registry

__all__ = ["list_lines", "reproduce", "report_section"]

REPORT_TITLE = "optax-layca reproduce: paper experiments"


def list_lines() -> list[str]:
    """One line per experiment: name, paper reference, the claim's first words."""
    out = []
    for name, exp in registry().items():
        claim = exp.claim if len(exp.claim) <= 70 else exp.claim[:67].rstrip() + "..."
        out.append(f'{name:16s} {exp.reference.cite()}: "{claim}"')
    return out


def reproduce(name: str, config: ExperimentConfig) -> dict[str, Any]:
    """Runs experiment ``name``; writes ``NAME.png``, ``NAME.json``, ``NAME_runs/`` and its
    section of ``report.md`` under ``config.out``; returns the record written to the JSON."""
    from .. import _report

    exp = get(name)
    _report.check_writable(config.out)
    t0 = time.perf_counter()
    results = exp.run(config)
    status, text = exp.verdict(results)
    if status not in STATUSES:
        raise ValueError(f"{name}: verdict status {status!r} is not one of {STATUSES}.")
    t_run = time.perf_counter() - t0
    histories = results.pop("histories", {})
    runs_dir = os.path.join(config.out, f"{name}_runs")
    os.makedirs(runs_dir, exist_ok=True)
    saved = {
        key: _report.save_history(h, os.path.join(runs_dir, f"{key}.rotation.npz"))
        for key, h in histories.items()
    }
    figure = _report.save_figure(
        exp.figure({**results, "histories": histories}), os.path.join(config.out, f"{name}.png")
    )
    record = {
        **results,
        "experiment": _describe(exp),
        "verdict": {"status": status, "text": text},
        "histories": {k: {**v, "file": f"{name}_runs/{v['file']}"} for k, v in saved.items()},
        "figure": figure,
        "timings": {"run_s": t_run, "total_s": time.perf_counter() - t0},
    }
    _report.write_json(os.path.join(config.out, f"{name}.json"), record)
    order = {n: i for i, n in enumerate(registry())}
    _report.merge_report_section(
        os.path.join(config.out, "report.md"),
        name,
        report_section(exp, record),
        title=REPORT_TITLE,
        order=lambda n: (order.get(n, len(order)), n),
    )
    return record


def _describe(exp: Experiment) -> dict[str, Any]:
    ref = exp.reference
    return {
        "name": exp.name,
        "reference": {
            "authors": ref.authors,
            "year": ref.year,
            "where": ref.where,
            "title": ref.title,
        },
        "claim": exp.claim,
        "stand_in": exp.stand_in,
    }


def report_section(exp: Experiment, record: dict[str, Any]) -> str:
    """The experiment's Markdown section: claim (quoted, cited), stand-in, this run, verdict."""
    ident = record["identity"]
    cfg, ds = ident["config"], ident["dataset"]
    mode = "quick" if ident.get("quick") else "default"
    lines = [
        f"## `{exp.name}`: {exp.reference.cite()}",
        "",
        f"*{exp.reference.title}* ({exp.reference.authors}, {exp.reference.year}).",
        "",
        f"**The paper's claim** ({exp.reference.cite()}):",
        "",
        f"> {exp.claim}",
        "",
        f"**What stands in for the paper's setting.** {exp.stand_in}",
        "",
        (
            f"**This run.** `optax-layca reproduce {exp.name}` ({mode} configuration): "
            f"{ds['name']} ({ds['train']} train / {ds['test']} test, fingerprint "
            f"`{ds['fingerprint'][:12]}`), model `{cfg['model']}`, {cfg['epochs']} epochs, "
            f"batch size {cfg['batch_size']}, seed {ident['seed']}, optax_layca "
            f"{ident['versions']['optax_layca']}, {record['timings']['total_s']:.0f} s."
        ),
        "",
        record.get("table", ""),
        "",
        f"**Verdict: {record['verdict']['status']}.** {record['verdict']['text']}",
        "",
        f"![{exp.name}]({record['figure']})",
        "",
        f"Every plotted number: `{exp.name}.json`; rotation histories: `{exp.name}_runs/`.",
    ]
    return "\n".join(lines)
