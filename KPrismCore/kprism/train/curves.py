"""Learning-curve figure of one or more consecutive training runs (stages): training loss and
validation Dice per mode over steps, each stage continuing the step axis of the one before.

    python -m kprism.train.curves RUN_DIR [RUN_DIR ...] OUT.png
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Sequence, Union

PathLike = Union[str, Path]


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def plot_learning_curve(run_dirs: Union[PathLike, Sequence[PathLike]], path: PathLike) -> Path:
    """Reads each run's log.csv and val.csv (if any); writes a two-panel PNG with stage boundaries."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [Path(run_dirs)] if isinstance(run_dirs, (str, Path)) else [Path(r) for r in run_dirs]
    figure = Figure(figsize=(11, 4), dpi=110, layout="constrained")
    loss_axes, dice_axes = figure.subplots(1, 2)
    steps: list[int] = []
    losses: list[float] = []
    curves: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    offset, boundaries = 0, []
    for run in runs:
        rows = _read(run / "log.csv")
        steps += [offset + int(r["step"]) for r in rows]
        losses += [float(r["loss"]) for r in rows]
        if (run / "val.csv").exists():
            for r in _read(run / "val.csv"):
                curves[r["mode"]][offset + int(r["step"])].append(float(r["dice"]))
        offset += int(rows[-1]["step"]) if rows else 0
        boundaries.append(offset)
    window = 10  # logged points are single batches of one mode each: smooth over several
    smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
    loss_axes.plot(steps, losses, color="0.8", linewidth=0.8, label="logged batch")
    loss_axes.plot(steps, smooth, color="C0", label=f"mean of {window}")
    loss_axes.set(xlabel="step", ylabel="training loss", title="training loss")
    for axes in (loss_axes, dice_axes):
        for boundary in boundaries[:-1]:
            axes.axvline(boundary, color="0.5", linestyle="--", linewidth=0.8)
    loss_axes.legend()
    if curves:
        for mode, by_step in sorted(curves.items()):
            xs = sorted(by_step)
            dice_axes.plot(xs, [sum(by_step[x]) / len(by_step[x]) for x in xs], marker="o", label=mode)
        dice_axes.set(xlabel="step", ylabel="mean Dice over datasets", ylim=(0, 1),
                      title="validation (model resolution)" + (", dashed: next stage" if len(runs) > 1 else ""))
        dice_axes.legend()
        dice_axes.grid(alpha=0.3)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure).print_figure(str(target))
    return target


if __name__ == "__main__":
    import sys

    if len(sys.argv) < 3:
        sys.exit("usage: python -m kprism.train.curves RUN_DIR [RUN_DIR ...] OUT.png")
    print(f"wrote {plot_learning_curve(sys.argv[1:-1], sys.argv[-1])}")
