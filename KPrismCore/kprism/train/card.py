"""Writes a model card from the weights' own metadata, the training run and an evaluation report.

    python -m kprism.train.card WEIGHTS --eval eval.json --run RUN_DIR --config CONFIG --out CARD.md
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
}


def model_card(weights: Path, evaluation: dict, config_path: str, curve_png: str | None, notes: str) -> str:
    checkpoint = read_checkpoint(weights)
    training = checkpoint.training
    parameters = sum(t.numel() for t in checkpoint.state_dict.values() if t.is_floating_point())
    size_mb = weights.stat().st_size / 1e6
    data_rows = "\n".join(f"| {name} | {what} | {modality} | {terms} |" for name, (what, modality, terms) in DATASET_TERMS.items()
                          if name in training.get("datasets", []))
    curve = f"\n![learning curve]({curve_png})\n" if curve_png else ""
    return f"""# Model card: {weights.stem}

| | |
|---|---|
| file | `{weights.name}` ({size_mb:.1f} MB, float32), sha256 `{checkpoint.sha256}` |
| architecture | K-Prism `{training.get('preset', '?')}` preset, {parameters / 1e6:.2f} M parameters, {checkpoint.config.image_size}² input: depthwise-separable conv encoder with global attention (strides 2–16), sparse and dense prompt encoders, reference fusion, {checkpoint.config.decoder_layers}-layer two-way decoder with {checkpoint.config.num_experts}-expert top-{checkpoint.config.expert_top_k} MoE feed-forward blocks, mask and quality heads |
| intended use | research; the `kprism` CLI, demo and the Slicer module on a CPU or GPU |
| not for | clinical decisions |

## Training
- Command: `kprism train {config_path}` (the config is committed; relative paths resolve from it).
- Steps: {training.get('steps')} at batch {training.get('batch_size')}; wall time of the run
  {training.get('wall_time_s_this_run', '?')} s on 2 CPU cores, i.e. **{training.get('steps_per_hour', '?')} steps per hour**.
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
    parser.add_argument("--config", required=True, help="the training config, as a repository path")
    parser.add_argument("--curve", help="learning-curve PNG, relative to the card")
    parser.add_argument("--notes", type=Path, help="markdown with observations and limitations")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    notes = args.notes.read_text(encoding="utf-8") if args.notes else ""
    args.out.write_text(model_card(args.weights, json.loads(args.eval.read_text(encoding="utf-8")), args.config, args.curve, notes))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
