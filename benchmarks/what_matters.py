"""Does the *what* of a prompt decide the answer? The checks of issue 13, item 3, per model.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/what_matters.py --model kprism-tiny --model runs/.../medsam.safetensors \
        --datasets ../shared/datasets --out benchmarks/results

On shared test splits (and the held-out TotalSeg CT volume, which no model but `kprism-tiny` was trained on):
- **absent class**: each image or slice asked for classes it does not show (half from its own dataset's label
  list, half from the whole catalog; a 2D picture also for two other 2D datasets' main structures, e.g. a
  fetal head on a chest X-ray): share of requests answered with < 1 % of the image, and share whose
  quality flags the answer (< 0.3, or NaN: "not found"), per semantic engine the model has, for all
  requests and apart for volume anatomy and for other pictures' main structures;
- **one-lung reference**: a chest X-ray reference marking one lung (counted from the image's left) on every
  test X-ray: Dice to the same lung, share ≥ 0.90, and the share of the *other* lung covered (< 0.10 wanted);
- **foreign reference**: a reference from an unrelated kind of image (X-ray lungs on ultrasound, a fetal head
  or skin lesion on X-rays): share answered with < 1 % of the image, share flagged by quality;
- **box alone vs one click**: the target's bounding box versus one click at its deepest point, same targets.
Writes what_matters.md/json. Needs ../shared/datasets (a benchmark, not a unit test).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from kprism.data.interaction import dice, first_click  # noqa: E402
from kprism.data.parts import ordered_parts as parts  # noqa: E402
from kprism.data.nnunet_v2 import load_dataset  # noqa: E402
from kprism.evaluate.clickers import SliceClicker, source_slice  # noqa: E402
from kprism.session import KPrismSession  # noqa: E402

CXR, HEAD, LESION, CT, ACDC = ("Dataset001_MontgomeryCXR", "Dataset020_HC18FetalHead", "Dataset003_PH2",
                               "Dataset006_TotalSegCT", "Dataset022_ACDCCardiacMRI")
HELD_OUT_CT = "ts_ct_002"
CT_ORGANS = ["liver", "spleen", "kidney_left", "kidney_right", "stomach"]
FLAG = 0.3  # a quality below this (or NaN) tells the user not to trust the answer
EMPTY = 0.01  # share of the image below which an answer counts as "nothing"


def flagged(quality: float) -> bool:
    return not np.isfinite(quality) or quality < FLAG


class Images:
    """2D test images and held-out volume slices of the shared datasets, loaded once."""

    def __init__(self, root: Path, per_set: int):
        self.root, self.per_set, self._sets = root, per_set, {}

    def dataset(self, name: str):
        if name not in self._sets:
            self._sets[name] = load_dataset(self.root / name)
        return self._sets[name]

    def cases(self, name: str, split: str = "test") -> list[tuple]:
        ds = self.dataset(name)
        return [(case.case_id, *ds.load(case)) for case in ds.cases(split)[: self.per_set]]

    def volume(self, name: str, case_id: str) -> tuple:
        ds = self.dataset(name)
        case = next(c for split in ("train", "test") for c in ds.cases(split) if c.case_id == case_id)
        return ds.load(case)


def absent_class(session: KPrismSession, images: Images, rng: np.random.Generator, per_image: int) -> dict:
    engines = ["prompted"] + (["one_pass"] if session.model.class_head is not None else [])
    main_2d = {n for name in (CXR, HEAD, LESION, "Dataset002_DRIVE", "Dataset004_ISBI2012EM", "Dataset005_KvasirMini",
                              "Dataset021_MoNuSegNuclei") for n in images.dataset(name).labels if n != "background"}
    rows = []

    def ask(index, shown: set[str], own: list[str], truth_of=None):
        own_absent = [n for n in own if n not in shown and n in session.catalog.names]
        anywhere = [n for n in session.catalog.names if n not in shown]
        other_main = sorted(main_2d - shown) if index is None else []  # a 2D picture: also other pictures' main structures
        names: list[str] = []
        for k in range(per_image):
            pool = own_absent if own_absent and k % 2 == 0 else anywhere
            names.append(str(pool[rng.integers(len(pool))]))
        names += [str(n) for n in rng.choice(other_main, min(2, len(other_main)), replace=False)] if other_main else []
        for name in names:
            for engine in engines:
                result = session.segment_semantic([name], slices=None if index is None else [index], engine=engine)[name]
                mask = truth_of(result.mask) if truth_of else result.mask.astype(bool)
                rows.append({"engine": engine, "name": name, "area": float(mask.mean()), "quality": result.quality,
                             "kind": "another picture's main structure" if name in main_2d else "volume anatomy"})

    for name in (CXR, HEAD, LESION):
        ds = images.dataset(name)
        own = [n for n in ds.labels if n != "background"]
        for _, image, labels in images.cases(name):
            session.set_image(image)
            ask(None, {own[0]}, own)
    for name, case_id in ((CT, HELD_OUT_CT), (ACDC, None)):
        ds = images.dataset(name)
        image, labels = images.volume(name, case_id) if case_id else images.dataset(name).load(ds.cases("test")[0])
        session.set_image(image)
        values = {v: n for n, v in ds.labels.items()}
        labelled = [k for k in range(labels.shape[0]) if labels[k].any()]
        for k in [labelled[int(round(x))] for x in np.linspace(0, len(labelled) - 1, 4)]:
            axis, index = source_slice(session.view, 0, k)
            clicker = SliceClicker(session.new_target(), axis, index)
            shown = {values[int(v)] for v in np.unique(labels[k]) if v}
            ask(index, shown, [n for n in ds.labels if n != "background"], truth_of=clicker.truth_of)
    out = {}
    for engine in engines:
        for kind in ("all", "volume anatomy", "another picture's main structure"):
            mine = [r for r in rows if r["engine"] == engine and kind in ("all", r["kind"])]
            if mine:
                out[f"{engine}, {kind}"] = {"requests": len(mine), "under_1pct": float(np.mean([r["area"] < EMPTY for r in mine])),
                                            "mean_area": float(np.mean([r["area"] for r in mine])),
                                            "flagged": float(np.mean([flagged(r["quality"]) for r in mine]))}
    return out


def one_lung_reference(session: KPrismSession, images: Images) -> dict:
    references = [(image, labels) for _, image, labels in images.cases(CXR, "train") if len(parts(labels > 0)) == 2]
    ref_image, ref_labels = references[0]
    ref_parts = parts(ref_labels > 0)
    rows = []
    for _, image, labels in images.cases(CXR):
        query_parts = parts(labels > 0)
        if len(query_parts) != 2:
            continue
        session.set_image(image)
        for side in (0, 1):
            result = session.segment_in_context([(ref_image, ref_parts[side].astype(np.uint8))])
            mask, other = result.mask.astype(bool), query_parts[1 - side]
            rows.append({"side": side, "dice": dice(mask, query_parts[side]),
                         "other_covered": float((mask & other).sum() / other.sum()), "quality": result.quality,
                         "whole_lungs_dice": dice(mask, labels > 0)})
    return {"requests": len(rows), "dice": float(np.mean([r["dice"] for r in rows])),
            "dice_at_least_0.90": float(np.mean([r["dice"] >= 0.9 for r in rows])),
            "other_covered": float(np.mean([r["other_covered"] for r in rows])),
            "other_under_0.10": float(np.mean([r["other_covered"] < 0.1 for r in rows])),
            "dice_to_both_lungs": float(np.mean([r["whole_lungs_dice"] for r in rows]))}


def foreign_reference(session: KPrismSession, images: Images) -> dict:
    first = {name: images.cases(name, "train")[0] for name in (CXR, HEAD, LESION)}
    pairs = [(CXR, HEAD), (HEAD, CXR), (LESION, CXR)]  # (reference from, queries from)
    rows = []
    for source, queries in pairs:
        _, ref_image, ref_labels = first[source]
        for _, image, _ in images.cases(queries):
            session.set_image(image)
            result = session.segment_in_context([(ref_image, (ref_labels > 0).astype(np.uint8))])
            rows.append({"pair": f"{source}->{queries}", "area": float(result.mask.mean()), "quality": result.quality})
    return {"requests": len(rows), "under_1pct": float(np.mean([r["area"] < EMPTY for r in rows])),
            "mean_area": float(np.mean([r["area"] for r in rows])),
            "flagged": float(np.mean([flagged(r["quality"]) for r in rows]))}


def box_vs_click(session: KPrismSession, images: Images) -> dict:
    rows = []

    def both(axis: int, index: int, truth_source: np.ndarray, where: str) -> None:
        box_target = session.new_target()
        clicker = SliceClicker(box_target, axis, index)
        truth = clicker.truth_of(truth_source)
        if truth.sum() < 20:
            return
        rows_, cols = np.nonzero(truth)
        low, high = clicker.source_ijk(rows_.min(), cols.min()), clicker.source_ijk(rows_.max(), cols.max())
        box_target.box(np.minimum(low, high), np.maximum(low, high), "ijk", axis=axis, propagate=False)
        box = dice(clicker.prediction(), truth)
        click_clicker = SliceClicker(session.new_target(), axis, index)
        click = dice(click_clicker(first_click(truth)), truth)
        rows.append({"where": where, "box": box, "click": click})

    for name in (HEAD, LESION, CXR):
        for _, image, labels in images.cases(name):
            session.set_image(image)
            both(0, 0, labels > 0, name)
    ds = images.dataset(CT)
    image, labels = images.volume(CT, HELD_OUT_CT)
    session.set_image(image)
    for organ in CT_ORGANS:
        truth = labels == ds.labels[organ]
        k = int(np.argmax(truth.sum(axis=(1, 2))))
        axis, index = source_slice(session.view, 0, k)
        both(axis, index, truth, f"{CT}/{organ}")
    out = {}
    for where in dict.fromkeys(r["where"].split("/")[0] for r in rows):
        mine = [r for r in rows if r["where"].startswith(where)]
        out[where] = {"targets": len(mine), "box": float(np.mean([r["box"] for r in mine])),
                      "one_click": float(np.mean([r["click"] for r in mine]))}
    return out


def measure(model: str, images: Images, per_image: int) -> dict:
    session = KPrismSession(model=model, threads=int(os.environ.get("KPRISM_THREADS", "2")))
    started = time.perf_counter()
    result = {"model": Path(model).stem if os.path.exists(model) else model,
              "absent_class": absent_class(session, images, np.random.default_rng(0), per_image),
              "one_lung_reference": one_lung_reference(session, images),
              "foreign_reference": foreign_reference(session, images),
              "box_vs_click": box_vs_click(session, images)}
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def table(results: list[dict]) -> str:
    lines = ["# Does the *what* of a prompt decide the answer?", "",
             "Made by `benchmarks/what_matters.py` (issue 13, item 3). Targets: absent class < 1 % area in ≥ 95 % of "
             "requests; one-lung reference Dice ≥ 0.90 to that lung with < 0.10 of the other covered; an absent or "
             f"mismatched answer flagged by its quality (< {FLAG} or not found); a box alone ≥ one click.", "",
             "| model | check | requests | result |", "|---|---|---|---|"]
    for r in results:
        m = r["model"]
        for engine, a in r["absent_class"].items():
            lines.append(f"| {m} | absent class ({engine}) | {a['requests']} | < 1 % area {a['under_1pct']:.0%}, "
                         f"mean area {a['mean_area']:.3f}, flagged {a['flagged']:.0%} |")
        o = r["one_lung_reference"]
        lines.append(f"| {m} | one-lung reference | {o['requests']} | Dice to that lung {o['dice']:.3f} (≥ 0.90: "
                     f"{o['dice_at_least_0.90']:.0%}), other lung covered {o['other_covered']:.2f} (< 0.10: "
                     f"{o['other_under_0.10']:.0%}), Dice to both lungs {o['dice_to_both_lungs']:.3f} |")
        f = r["foreign_reference"]
        lines.append(f"| {m} | foreign reference | {f['requests']} | < 1 % area {f['under_1pct']:.0%}, mean area "
                     f"{f['mean_area']:.3f}, flagged {f['flagged']:.0%} |")
        for where, b in r["box_vs_click"].items():
            lines.append(f"| {m} | box alone vs one click: {where} | {b['targets']} | box {b['box']:.3f}, "
                         f"one click {b['one_click']:.3f} |")
        lines.append(f"| {m} | time | | {r['seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", required=True, help="model name or weights file (repeatable)")
    parser.add_argument("--datasets", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "datasets")
    parser.add_argument("--per-set", type=int, default=10, help="test images per 2D dataset")
    parser.add_argument("--per-image", type=int, default=4, help="absent classes asked per image or slice")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    images = Images(args.datasets, args.per_set)
    results = [measure(model, images, args.per_image) for model in args.model]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "what_matters.json").write_text(json.dumps(results, indent=1))
    (args.out / "what_matters.md").write_text(table(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
