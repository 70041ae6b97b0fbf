"""Turns an evaluation report (the `kprism eval --json` structure) into markdown and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional


def _fmt(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(report: dict[str, Any]) -> str:
    """One row per dataset: semantic (prompted, one-pass), in-context, scribble, Dice after 1/3/5/10/20 clicks, NoC@90."""
    click_keys = sorted({k for d in report["datasets"].values() for k in d["modes"].get("interactive", {}).get("dice_at_clicks", {})}, key=int)
    header = (["dataset", "split", "targets", "semantic", "one-pass", "in-context 1", "in-context 2", "scribble"]
              + [f"{k} click{'s' if k != '1' else ''}" for k in click_keys] + ["NoC@90", "click p50 ms"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, d in report["datasets"].items():
        modes = d["modes"]
        interactive = modes.get("interactive", {})
        clicks = interactive.get("dice_at_clicks", {})
        targets = max((m.get("targets", 0) for m in modes.values()), default=0)
        row = ([name, d.get("split", ""), str(targets)]
               + [_fmt(modes.get(m, {}).get("dice_mean")) for m in ("semantic", "onepass", "incontext_1", "incontext_2", "scribble")]
               + [_fmt(clicks.get(k)) for k in click_keys]
               + [_fmt(interactive.get("noc90"), 1), _fmt((interactive.get("latency_ms") or {}).get("click_p50"), 1)])
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(figure, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure).print_figure(str(path))
    return path


def plot_click_curves(report: dict[str, Any], path: Path) -> Path:
    """Mean Dice against clicks, one line per dataset."""
    figure = _figure(7.5, 4.8)
    axes = figure.add_subplot()
    for n, (name, d) in enumerate(report["datasets"].items()):
        curves = [i["scores"]["interactive"]["curve"] for i in d.get("items", []) if "interactive" in i["scores"]]
        if not curves:
            continue
        mean = [sum(c[k] for c in curves) / len(curves) for k in range(len(curves[0]))]
        axes.plot(range(1, len(mean) + 1), mean, marker="o", markersize=3, color=f"C{n % 10}", label=name.split("_", 1)[-1])
    axes.set(xlabel="clicks", ylabel="mean Dice", ylim=(0, 1))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncol=2)
    return _save(figure, path)


def plot_mode_bars(report: dict[str, Any], path: Path) -> Path:
    """Per-dataset Dice bars for semantic, one-pass, in-context (1 ref), scribble and 5 clicks."""
    import numpy as np

    names = list(report["datasets"])
    series = {
        "semantic": [report["datasets"][n]["modes"].get("semantic", {}).get("dice_mean") for n in names],
        "one-pass": [report["datasets"][n]["modes"].get("onepass", {}).get("dice_mean") for n in names],
        "in-context (1 ref)": [report["datasets"][n]["modes"].get("incontext_1", {}).get("dice_mean") for n in names],
        "scribble": [report["datasets"][n]["modes"].get("scribble", {}).get("dice_mean") for n in names],
        "5 clicks": [report["datasets"][n]["modes"].get("interactive", {}).get("dice_at_clicks", {}).get("5") for n in names],
    }
    figure = _figure(max(7.0, 0.9 * len(names)), 4.2)
    axes = figure.add_subplot()
    width = 0.8 / len(series)
    for k, (label, values) in enumerate(series.items()):
        axes.bar(np.arange(len(names)) + k * width, [v if v is not None else 0 for v in values], width, label=label)
    axes.set_xticks(np.arange(len(names)) + 0.4 - width / 2, [n.split("_", 1)[-1] for n in names], rotation=30, ha="right", fontsize=7)
    axes.set(ylabel="mean Dice", ylim=(0, 1))
    axes.legend(fontsize=7)
    return _save(figure, path)


def write_report(report: dict[str, Any], folder: Path) -> Path:
    """report.md with the table and both plots."""
    folder.mkdir(parents=True, exist_ok=True)
    curves = plot_click_curves(report, folder / "dice_vs_clicks.png")
    bars = plot_mode_bars(report, folder / "dice_by_dataset.png")
    text = (f"# Evaluation of {report['model']} ({report['protocol']} click rule, {report.get('clicks')} clicks)\n\n"
            f"{markdown_table(report)}\n\n![Dice against clicks]({curves.name})\n\n![Dice by dataset and mode]({bars.name})\n")
    target = folder / "report.md"
    target.write_text(text, encoding="utf-8")
    return target


def volume_table(report: dict[str, Any]) -> str:
    """The CVPR25 3D protocol: one row per dataset and mode, mean volumetric Dice after the first step and each click."""
    rows = [(name, d, mode, entry) for name, d in report["datasets"].items() for mode, entry in d["modes"].items()]
    steps = max((len(entry["dice_at_interactions"]) for *_, entry in rows), default=1)
    header = (["dataset", "split", "mode", "targets", "first step"] + [f"{n} click{'s' if n > 1 else ''}" for n in range(1, steps)]
              + ["Dice AUC", "NSD@2mm", "click p50 ms"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, d, mode, entry in rows:
        curve = entry["dice_at_interactions"]
        lines.append("| " + " | ".join([name, d.get("split", ""), mode, str(entry["targets"])]
                                       + [_fmt(curve.get(str(n))) for n in range(steps)]
                                       + [_fmt(entry["dice_auc"]), _fmt(entry["nsd_mean"]),
                                          _fmt((entry.get("latency_ms") or {}).get("click_p50"), 0)]) + " |")
    return "\n".join(lines)


def volume_comparison(report: dict[str, Any], previous: dict[str, Any]) -> str:
    """Each dataset and mode of both reports: previous → this run, for the first step, the last click, the rise and AUC/NSD."""
    lines = ["| dataset | mode | first step | last click | rise | Dice AUC | NSD@2mm |", "|---|---|---|---|---|---|---|"]
    for name, d in report["datasets"].items():
        for mode, now in d["modes"].items():
            before = previous.get("datasets", {}).get(name, {}).get("modes", {}).get(mode)
            if before is None:
                continue
            pairs = [(_first(before), _first(now)), (_last(before), _last(now)),
                     (_last(before) - _first(before), _last(now) - _first(now)),
                     (before.get("dice_auc"), now.get("dice_auc")), (before.get("nsd_mean"), now.get("nsd_mean"))]
            lines.append(f"| {name} | {mode} | " + " | ".join(f"{_fmt(a)} → {_fmt(b)}" for a, b in pairs) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _first(entry: dict) -> float:
    return entry["dice_at_interactions"]["0"]


def _last(entry: dict) -> float:
    curve = entry["dice_at_interactions"]
    return curve[str(len(curve) - 1)]


def write_volume_report(report: dict[str, Any], folder: Path, previous: Optional[dict[str, Any]] = None) -> Path:
    """report.md with the CVPR25 3D table (first step: the 3D box, or semantic / in-context when chained),
    and, given an earlier report, its numbers beside these."""
    folder.mkdir(parents=True, exist_ok=True)
    text = (f"# 3D evaluation of {report['model']} (CVPR25 protocol, {report.get('clicks')} clicks)\n\n"
            "Mean volumetric Dice per dataset after the first step (interactive: the 3D bounding box; chained: "
            "semantic or in-context) and after each click on the largest 3D error.\n\n"
            f"{volume_table(report)}\n")
    comparison = volume_comparison(report, previous) if previous else ""
    if comparison:
        text += f"\n## Previous run → this run\n\n{comparison}\n"
    target = folder / "report.md"
    target.write_text(text, encoding="utf-8")
    return target
