"""Two models' `kprism eval` reports side by side (same datasets, same arguments): the 2D protocol and CVPR25 3D.

    python benchmarks/compare_models.py --name kprism-tiny --name kprism-medsam \
        --eval2d results/eval_medsam/tiny_2d.json --eval2d results/eval_medsam/medsam_2d.json \
        --eval3d results/eval_medsam/tiny_cvpr25.json --eval3d results/eval_medsam/medsam_cvpr25.json \
        --out results/eval_medsam/README.md

Each cell is "first → second"; bold marks the better of the two where they differ by more than 0.005.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

MODES_2D = [("semantic", None), ("onepass", None), ("incontext_1", None), ("scribble", None),
            ("interactive", "1"), ("interactive", "5"), ("interactive", "20")]


def _value(entry: Optional[dict], click: Optional[str]) -> Optional[float]:
    if entry is None:
        return None
    return entry["dice_at_clicks"].get(click) if click else entry["dice_mean"]


def _pair(a: Optional[float], b: Optional[float], digits: int = 3, higher_is_better: bool = True) -> str:
    if a is None and b is None:
        return "–"
    text = [f"{v:.{digits}f}" if v is not None else "–" for v in (a, b)]
    if a is not None and b is not None and abs(a - b) > 0.005:
        better = int((b > a) == higher_is_better)
        text[better] = f"**{text[better]}**"
    return f"{text[0]} → {text[1]}"


def table_2d(first: dict, second: dict) -> list[str]:
    heads = ["semantic", "one-pass", "in-context 1", "scribble", "1 click", "5 clicks", "20 clicks", "NoC@90"]
    lines = ["| dataset | split | targets | " + " | ".join(heads) + " |", "|---" * (len(heads) + 3) + "|"]
    for name, a in first["datasets"].items():
        b = second["datasets"].get(name)
        if b is None:
            continue
        cells = [_pair(_value(a["modes"].get(m), c), _value(b["modes"].get(m), c)) for m, c in MODES_2D]
        cells.append(_pair(a["modes"]["interactive"].get("noc90"), b["modes"]["interactive"].get("noc90"), 1, False))
        lines.append(f"| {name} | {a['split']} | {a['modes']['interactive']['targets']} | " + " | ".join(cells) + " |")
    return lines


def table_3d(first: dict, second: dict) -> list[str]:
    lines = ["| dataset | split | mode | targets | first step | 1 click | 5 clicks | NSD@2mm |", "|---|---|---|---|---|---|---|---|"]
    for name, a in first["datasets"].items():
        b = second["datasets"].get(name)
        if b is None:
            continue
        for mode, entry in a["modes"].items():
            other = b["modes"].get(mode)
            if other is None:
                continue
            at, bt = entry["dice_at_interactions"], other["dice_at_interactions"]
            last = max(at, key=int)
            lines.append(f"| {name} | {a['split']} | {mode} | {entry['targets']} | {_pair(at['0'], bt['0'])} | "
                         f"{_pair(at.get('1'), bt.get('1'))} | {_pair(at[last], bt.get(last))} | "
                         f"{_pair(entry['nsd_mean'], other['nsd_mean'])} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", action="append", required=True)
    parser.add_argument("--eval2d", action="append", required=True, type=Path)
    parser.add_argument("--eval3d", action="append", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    if not len(args.name) == len(args.eval2d) == len(args.eval3d) == 2:
        parser.error("give exactly two --name, --eval2d and --eval3d, in the same model order")
    two_d = [json.loads(p.read_text(encoding="utf-8")) for p in args.eval2d]
    three_d = [json.loads(p.read_text(encoding="utf-8")) for p in args.eval3d]
    first, second = args.name
    text: list[Any] = [f"# {first} → {second}, same datasets and arguments", "",
                       f"Made by `benchmarks/compare_models.py` from the four `kprism eval` reports in this folder (commands in "
                       f"`benchmarks/README.md`). Each cell is {first} → {second}; bold marks the better where they differ by "
                       "more than 0.005. TotalSeg CT is scored on `ts_ct_002` alone: held out of the second model's training, "
                       "trained on by the first.", "", "## 2D protocol (Dice; NoC@90: clicks to 0.90, lower is better)", "",
                       *table_2d(*two_d), "", "## CVPR25 3D protocol (volumetric Dice: box or knowledge first, then clicks in 3D)", "",
                       *table_3d(*three_d), ""]
    args.out.write_text("\n".join(text), encoding="utf-8")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
