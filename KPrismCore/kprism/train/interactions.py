"""Turns simulated user interactions into model prompts during training.

The simulators themselves live in `kprism.data.interaction` and are shared with evaluation; this
module only places their clicks, boxes and scribbles on the model grid and runs correction rounds.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.interaction import box_from_mask, click_kprism, click_random_error, first_click, scribble
from ..model import Prompts
from ..model_grid import box_edges, click_point, prior_from_logits

SCRIBBLE_KINDS = ("line", "centerline", "contour")


def set_clicks(prompts: Prompts, clicks: list[list[tuple[float, float, int]]]) -> None:
    """Padded point tensors from per-sample click lists [(x, y, label), ...] (label -1 pads)."""
    longest = max(1, max(len(c) for c in clicks))
    points = torch.zeros(len(clicks), longest, 2)
    labels = torch.full((len(clicks), longest), -1, dtype=torch.long)
    for b, sample in enumerate(clicks):
        for n, (x, y, label) in enumerate(sample):
            points[b, n] = torch.tensor([x, y])
            labels[b, n] = label
    prompts.points, prompts.point_labels = points, labels


def first_prompts(prompts: Prompts, targets: np.ndarray, kind: str, rng: np.random.Generator) -> list[list]:
    """Adds the first interactive prompt of each sample; returns the per-sample click lists."""
    b, size = targets.shape[0], targets.shape[-1]
    clicks: list[list] = [[] for _ in range(b)]
    if kind == "box":
        # Augmentation can push a small object out of view: such a sample gets no box (box_valid False).
        boxes, valid = [], []
        for t in targets:
            corners = box_from_mask(t, rng, jitter=0.1) if t.any() else np.zeros((2, 2))
            boxes.append(list(box_edges(corners[0], corners[1], (size, size), size)))  # (x0, y0, x1, y1)
            valid.append(bool(t.any()))
        prompts.boxes, prompts.box_valid = torch.tensor(boxes, dtype=torch.float32), torch.tensor(valid)
    elif kind == "scribble":
        maps = np.zeros((b, 2, size, size), dtype=np.float32)
        for n, t in enumerate(targets):
            if t.any():
                maps[n, 0] = scribble(t, rng, SCRIBBLE_KINDS[rng.integers(3)], positive=True)
            if rng.random() < 0.5 and t.any() and not t.all():
                maps[n, 1] = scribble(t, rng, SCRIBBLE_KINDS[rng.integers(3)], positive=False)
        prompts.scribbles = torch.from_numpy(maps)
    else:
        for n, t in enumerate(targets):
            if t.any():
                # Half centre clicks (the evaluation rule), half anywhere inside: users are not precise.
                click = first_click(t) if rng.random() < 0.5 else click_random_error(np.zeros_like(t), t, rng)
                clicks[n].append((*click_point(*click.point, (size, size), size), 1))
    for n, t in enumerate(targets):
        if not t.any():
            # The object left the view under augmentation: a background click says "nothing here".
            clicks[n].append((rng.uniform(0, size), rng.uniform(0, size), 0))
    if any(clicks):
        set_clicks(prompts, clicks)
    return clicks


def correction_clicks(prompts: Prompts, logits: torch.Tensor, targets: np.ndarray, clicks: list[list],
                      rng: np.random.Generator) -> None:
    """One correction round: a click on each sample's error, and the prediction fed back as prior."""
    predictions = (logits[:, 0] > 0).cpu().numpy()
    size = targets.shape[-1]
    for n, (pred, truth) in enumerate(zip(predictions, targets)):
        click = click_kprism(pred, truth) if rng.random() < 0.6 else click_random_error(pred, truth, rng)
        if click is not None:
            clicks[n].append((*click_point(*click.point, (size, size), size), int(click.positive)))
    if any(clicks):
        set_clicks(prompts, clicks)
    prompts.prior_logits = prior_from_logits(logits.detach(), size)
