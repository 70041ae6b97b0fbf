"""Turns an evaluation report (the `kprism eval --json` structure) into a markdown table and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}"


def markdown_table(report: dict[str, Any]) -> str:
    """One row per dataset: semantic, in-context (1, 2 refs), Dice after 1/3/5/10/20 clicks."""
    click_keys = sorted({k for d in report["datasets"].values() for k in d.get("dice_at_clicks", {})}, key=int)
    header = ["dataset", "split", "cases", "targets", "semantic", "in-context 1 ref", "in-context 2 refs"] + [f"{k} click{'s' if k != '1' else ''}" for k in click_keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, d in report["datasets"].items():
        clicks = d.get("dice_at_clicks", {})
        row = [name, d.get("split", ""), str(d.get("cases", "")), str(d.get("targets", "")), _fmt(d.get("semantic_dice")),
               _fmt(d.get("incontext_1_dice")), _fmt(d.get("incontext_2_dice"))] + [_fmt(clicks.get(k)) for k in click_keys]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_click_curves(report: dict[str, Any], path: str | Path) -> Path:
    """Mean Dice against the number of clicks, one line per dataset."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=110, layout="constrained")
    axes = figure.add_subplot()
    for name, d in report["datasets"].items():
        items = [i for i in d.get("items", []) if "clicks" in i["scores"]]
        if not items:
            continue
        length = len(items[0]["scores"]["clicks"])
        means = [sum(i["scores"]["clicks"][n] for i in items) / len(items) for n in range(length)]
        axes.plot(range(1, length + 1), means, marker="o", markersize=3, label=name.split("_", 1)[-1])
    axes.set_xlabel("clicks")
    axes.set_ylabel("mean Dice")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncol=2)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure).print_figure(str(target))
    return target
