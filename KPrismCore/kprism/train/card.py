"""Writes a model card from the weights' own metadata, the training run and an evaluation report.

    python -m kprism.train.card WEIGHTS --eval eval.json --config STAGE1.yaml [--config STAGE2.yaml ...] \
        [--speed train_speed.json] [--curve PNG] [--notes NOTES.md] --out CARD.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..evaluate.report import markdown_table
from ..weights import read_checkpoint

DATASET_TERMS = {
    "Dataset001_MontgomeryCXR": ("lungs", "X-ray", "NLM, research use"),
    "Dataset002_DRIVE": ("retinal vessels", "fundus", "research and evaluation only"),
    "Dataset003_PH2": ("skin lesions", "dermoscopy", "research only"),
    "Dataset004_ISBI2012EM": ("membranes", "electron microscopy", "research use"),
    "Dataset005_KvasirMini": ("polyps", "endoscopy", "research/education; commercial use needs permission"),
    "Dataset006_TotalSegCT": ("66 CT classes (model-generated labels)", "CT", "Apache-2.0 repository; scan origin undocumented"),
    "Dataset007_TotalSegMR": ("23 MR classes (model-generated labels)", "MRI", "Apache-2.0 repository; scan origin undocumented"),
    "Dataset008_BrainTumorMRI": ("brain tumour", "MRI", "BSD-3-Clause repository; image origin uncertain"),
    "Dataset020_HC18FetalHead": ("fetal head", "ultrasound", "CC BY 4.0"),
    "Dataset021_MoNuSegNuclei": ("nuclei", "pathology", "CC BY-NC-SA 4.0 (uncertain)"),
    "Dataset022_ACDCCardiacMRI": ("RV, myocardium, LV", "cine MRI", "CC BY-NC-SA 4.0 (uncertain)"),
    "Dataset032_LeftAtrium2018": ("left atrium", "LGE MRI", "research use; no data licence stated (uncertain)"),
}


def _architecture(checkpoint, preset: str, parameters: int) -> str:
    config = checkpoint.config
    decoder = (f"sparse and dense prompt encoders, reference fusion, {config.decoder_layers}-layer two-way decoder with "
               f"{config.num_experts}-expert top-{config.expert_top_k} MoE feed-forward blocks, mask and quality heads"
               f"{', one-pass class head' if config.class_head else ''}")
    if config.foundation:
        frozen = sum(t.numel() for name, t in checkpoint.state_dict.items()
                     if name.startswith("encoder.vit.") and t.is_floating_point())
        return (f"K-Prism `{preset}` preset, {parameters / 1e6:.2f} M parameters, {config.image_size}² input: "
                f"LiteMedSAM's TinyViT image encoder ({frozen / 1e6:.2f} M parameters, frozen, released weights), "
                f"a trainable convolutional stem for stride-2/4 detail and adapters from its 256×64×64 embedding to "
                f"strides 4–16, then {decoder}")
    return (f"K-Prism `{preset}` preset, {parameters / 1e6:.2f} M parameters, {config.image_size}² input: "
            f"depthwise-separable conv encoder with global attention (strides 2–16), {decoder}")


def training_stages(training: dict) -> list[dict]:
    """The training runs behind a checkpoint, first to last, following each run's `init_from` record."""
    stages = []
    while training:
        stages.append(training)
        training = (training.get("init_from") or {}).get("training") or {}
    return stages[::-1]


def _stage_table(stages: list[dict], configs: list[str]) -> str:
    if len(configs) != len(stages):
        raise ValueError(f"The weights come from {len(stages)} training run(s); give one --config per run, in order (got {len(configs)}).")
    rows = ["| stage | command | steps | batch | wall time | steps per hour |", "|---|---|---|---|---|---|"]
    for n, (stage, config) in enumerate(zip(stages, configs), 1):
        wall = stage.get("wall_time_s_this_run")
        rows.append(f"| {n} | `kprism train {config}` | {stage.get('steps')} | {stage.get('batch_size')} | "
                    f"{'?' if wall is None else f'{wall / 60:.0f} min'} | {stage.get('steps_per_hour', '?')} |")
    return "\n".join(rows)


def _speed_lines(speed: list[dict]) -> str:
    if not speed:
        return ""
    lines = ["", "Training throughput measured alone on this CPU (`benchmarks/train_speed.py`, `benchmarks/results/train_speed.md`):"]
    lines += [f"- `{r['config']}`: **{r['steps_per_hour']} steps per hour** (batch {r['batch_size']}, ≤ {r['max_correction_rounds']} "
              f"correction rounds, {r['threads']} threads)" for r in speed]
    return "\n".join(lines)


def model_card(weights: Path, evaluation: dict, configs: list[str], curve_png: str | None, notes: str,
               speed: list[dict] | None = None) -> str:
    checkpoint = read_checkpoint(weights)
    if checkpoint.tensors_sha256 is None:
        raise ValueError(f"{weights} carries no tensor hash; re-export it with kprism.weights.reexport_checkpoint "
                         "before writing its card, so the card cites the hashes of the file users get.")
    training = checkpoint.training
    stages = training_stages(training)
    first = stages[0]
    parameters = sum(t.numel() for t in checkpoint.state_dict.values() if t.is_floating_point())
    size_mb = weights.stat().st_size / 1e6
    data_rows = "\n".join(f"| {name} | {what} | {modality} | {terms} |" for name, (what, modality, terms) in DATASET_TERMS.items()
                          if name in first.get("datasets", []))
    curve = f"\n![learning curve]({curve_png})\n" if curve_png else ""
    stored = sorted({str(t.dtype).removeprefix("torch.") for t in checkpoint.state_dict.values() if t.is_floating_point()})
    dtypes = " and ".join(stored) + (" (the float16 tensors are the converted encoder, stored losslessly)" if len(stored) > 1 else "")
    return f"""# Model card: {weights.stem}

| | |
|---|---|
| file | `{weights.name}` ({size_mb:.1f} MB, {dtypes}), sha256 `{checkpoint.sha256}`; tensor data sha256 `{checkpoint.tensors_sha256}` (recorded in the file, checked on every load) |
| architecture | {_architecture(checkpoint, training.get('preset', '?'), parameters)} |
| intended use | research; the `kprism` CLI, demo and the Slicer module on a CPU or GPU |
| not for | clinical decisions |

## Training
Run the stages in order (the configs are committed; relative paths resolve from each config; each stage
starts from the previous stage's weights, checked by hash):

{_stage_table(stages, configs)}

Wall times are of the runs themselves on 2 CPU cores, with other benchmarks sharing the machine at times.
{_speed_lines(speed or [])}

- Data: the `imagesTr` split of each dataset (volumes as axial slices of the canonical LPS view);
  `imagesTs` was never trained on.

| dataset | structures | modality | licence / terms (see its SOURCE.md) |
|---|---|---|---|
{data_rows}

Several sources are research-only or non-commercial: use these weights for research only.
{curve}
## Classes ({len(checkpoint.catalog)})
{', '.join(checkpoint.catalog.names)}

## Measured accuracy
`kprism eval` ({evaluation.get('protocol')} click rule, {evaluation.get('clicks')} clicks) on every dataset's `imagesTs` split
(`imagesTr` where there is none: TotalSeg CT/MR and brain MRI, which were trained on). 2D per-slice
protocol: each labelled slice (a few per label and volume) and each label scored on its own, Dice at
the original resolution; in-context references from a fixed, seeded list of other (training) cases.

{markdown_table(evaluation)}

{notes}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a model card.")
    parser.add_argument("weights", type=Path)
    parser.add_argument("--eval", required=True, type=Path, help="kprism eval --json output")
    parser.add_argument("--config", required=True, action="append", help="training config of each stage, in order, as repository paths")
    parser.add_argument("--speed", type=Path, help="benchmarks/results/train_speed.json")
    parser.add_argument("--curve", help="learning-curve PNG, relative to the card")
    parser.add_argument("--notes", type=Path, help="markdown with observations and limitations")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    notes = args.notes.read_text(encoding="utf-8") if args.notes else ""
    speed = json.loads(args.speed.read_text(encoding="utf-8")) if args.speed else None
    card = model_card(args.weights, json.loads(args.eval.read_text(encoding="utf-8")), args.config, args.curve, notes, speed)
    args.out.write_text(card, encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
