"""Learning-curve figure of a training run: training loss and validation Dice per mode over steps."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path


def plot_learning_curve(run_dir: str | Path, path: str | Path) -> Path:
    """Reads run_dir/log.csv and run_dir/val.csv; writes a two-panel PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    with open(run_dir / "log.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    figure = Figure(figsize=(11, 4), dpi=110, layout="constrained")
    loss_axes, dice_axes = figure.subplots(1, 2)
    steps = [int(r["step"]) for r in rows]
    window = 10  # logged points are single batches of one mode each: smooth over several
    losses = [float(r["loss"]) for r in rows]
    smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
    loss_axes.plot(steps, losses, color="0.8", linewidth=0.8, label="logged batch")
    loss_axes.plot(steps, smooth, color="C0", label=f"mean of {window}")
    loss_axes.set(xlabel="step", ylabel="training loss", title="training loss")
    loss_axes.legend()
    validation = run_dir / "val.csv"
    if validation.exists():
        curves: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        with open(validation, newline="", encoding="utf-8") as handle:
            for r in csv.DictReader(handle):
                curves[r["mode"]][int(r["step"])].append(float(r["dice"]))
        for mode, by_step in sorted(curves.items()):
            xs = sorted(by_step)
            dice_axes.plot(xs, [sum(by_step[x]) / len(by_step[x]) for x in xs], marker="o", label=mode)
        dice_axes.set(xlabel="step", ylabel="mean Dice over datasets", ylim=(0, 1), title="validation (model resolution)")
        dice_axes.legend()
        dice_axes.grid(alpha=0.3)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure).print_figure(str(target))
    return target


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python -m kprism.train.curves RUN_DIR OUT.png")
    print(f"wrote {plot_learning_curve(sys.argv[1], sys.argv[2])}")
