"""The network: every mode and combination runs, gradients reach every trainable parameter, MoE works."""

from __future__ import annotations

import itertools

import pytest
import torch

from kprism.model import MODES, Prompts, build_model, preset
from kprism.model.moe import MoEFeedForward

S = 64  # a small input keeps these tests fast; the architecture is size-agnostic


def small_model(**overrides):
    torch.manual_seed(0)
    return build_model(preset("tiny", image_size=S, num_classes=3, **overrides))


def prompt_parts(model, batch: int) -> dict[str, dict]:
    refs = model.encode(torch.randn(batch * 2, 3, S, S)).embedding
    masks = torch.zeros(batch, 2, 1, S, S)
    masks[..., 20:40, 20:40] = 1
    scribbles = torch.zeros(batch, 2, S, S)
    scribbles[:, 0, 30, 25:35] = 1
    return {
        "semantic": {"class_ids": torch.arange(batch) % 3},
        "in_context": {"ref_features": refs.view(batch, 2, *refs.shape[1:]), "ref_masks": masks},
        "clicks": {"points": torch.tensor([[[30.0, 30.0], [10.0, 50.0]]]).repeat(batch, 1, 1),
                   "point_labels": torch.tensor([[1, 0]]).repeat(batch, 1)},
        "box": {"boxes": torch.tensor([[18.0, 18.0, 42.0, 42.0]]).repeat(batch, 1), "box_valid": torch.ones(batch, dtype=torch.bool)},
        "scribble": {"scribbles": scribbles},
        "prior": {"prior_logits": torch.randn(batch, 1, S, S)},
    }


COMBINATIONS = [c for r in (1, 2, 3) for c in itertools.combinations(MODES, r)] + [MODES]


@pytest.mark.parametrize("kinds", COMBINATIONS, ids=lambda c: "+".join(c))
def test_every_prompt_combination_gives_a_mask_and_quality(kinds):
    model = small_model().eval()
    parts = prompt_parts(model, batch=2)
    prompts = Prompts(**{k: v for kind in kinds for k, v in parts[kind].items()})
    with torch.no_grad():
        out = model(torch.randn(2, 3, S, S), prompts)
    assert out.logits.shape == (2, 1, S // 2, S // 2)
    assert torch.isfinite(out.logits).all()
    assert ((out.quality >= 0) & (out.quality <= 1)).all()
    flags = prompts.mode_flags()
    assert flags[:, [MODES.index(k) for k in kinds]].eq(1).all()


def test_no_prompt_is_a_clear_error():
    model = small_model().eval()
    with pytest.raises(ValueError, match="No prompt given"):
        model(torch.randn(1, 3, S, S), Prompts())


def test_prompts_change_the_answer():
    """A positive click at one place or another must move the mask: the prompt is not ignored."""
    model = small_model().eval()
    image = torch.randn(1, 3, S, S)
    with torch.no_grad():
        features = model.encode(image)
        a = model.decode(features, Prompts(points=torch.tensor([[[10.0, 10.0]]]), point_labels=torch.tensor([[1]]))).logits
        b = model.decode(features, Prompts(points=torch.tensor([[[50.0, 50.0]]]), point_labels=torch.tensor([[1]]))).logits
        c = model.decode(features, Prompts(class_ids=torch.tensor([1]))).logits
    assert (a - b).abs().max() > 1e-3 and (a - c).abs().max() > 1e-3


def test_gradients_reach_every_parameter():
    """No dead parameters: over all prompt kinds (present and absent) every weight gets a gradient."""
    model = small_model().train()
    batch = 2
    parts = prompt_parts(model, batch)
    everything = Prompts(**{k: v for p in parts.values() for k, v in p.items()})
    # The "absent" embeddings (no class, no reference, no point, no box) train on samples without them.
    absent = Prompts(class_ids=torch.tensor([-1, 0]), points=torch.tensor([[[5.0, 5.0]]] * 2),
                     point_labels=torch.tensor([[1], [-1]]), boxes=torch.zeros(2, 4), box_valid=torch.tensor([True, False]))
    loss = 0
    for prompts in (everything, absent, Prompts(prior_logits=torch.randn(batch, 1, S, S))):
        out = model(torch.randn(batch, 3, S, S), prompts)
        loss = loss + out.logits.square().mean() + sum(a.square().mean() for a in out.aux_logits) + out.quality.sum() + out.balance_loss
    loss.backward()
    dead = [name for name, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert dead == []


def test_random_position_basis_is_saved_with_the_weights():
    """Position encodings are buffers in the state dict: a reloaded model answers identically."""
    model = small_model().eval()
    state = model.state_dict()
    assert any(k.endswith("basis") for k in state)
    torch.manual_seed(123)
    twin = build_model(model.config).eval()
    twin.load_state_dict(state, strict=True)
    prompts = Prompts(points=torch.tensor([[[20.0, 30.0]]]), point_labels=torch.tensor([[1]]))
    image = torch.randn(1, 3, S, S)
    with torch.no_grad():
        assert torch.equal(model(image, prompts).logits, twin(image, prompts).logits)


def test_moe_top_k_routes_each_token_to_exactly_k_experts_and_counts_usage():
    moe = MoEFeedForward(dim=16, hidden=32, num_experts=4, top_k=2)
    tokens, mode = torch.randn(3, 5, 16), torch.randn(3, 16)
    moe(tokens, mode)
    usage = moe.usage.clone()
    assert usage.sum() == 3 * 5 * 2  # 15 tokens × 2 experts each
    assert torch.allclose(moe.usage_fraction().sum(), torch.tensor(1.0))
    moe.reset_usage()
    assert moe.usage.sum() == 0


def test_moe_router_sees_the_mode():
    """Same tokens, different mode embedding → different routing."""
    moe = MoEFeedForward(dim=16, hidden=32, num_experts=4, top_k=1)
    tokens = torch.randn(1, 8, 16)
    moe(tokens, torch.zeros(1, 16))
    first = moe.usage.clone()
    moe.reset_usage()
    moe(tokens, torch.full((1, 16), 5.0) * torch.randn(1, 16))
    assert not torch.equal(first, moe.usage)


def test_moe_balance_loss_is_minimal_for_uniform_routing_and_trains_the_router():
    moe = MoEFeedForward(dim=8, hidden=16, num_experts=4, top_k=0)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.bias.zero_()
    moe(torch.randn(2, 6, 8), torch.zeros(2, 8))
    assert moe.balance_loss.item() == pytest.approx(1.0, abs=1e-5)  # E · Σ (1/E)(1/E) · E... = 1 when uniform
    skewed = MoEFeedForward(dim=8, hidden=16, num_experts=4, top_k=1)
    with torch.no_grad():
        skewed.router.bias.copy_(torch.tensor([5.0, 0, 0, 0]))
    skewed(torch.randn(2, 6, 8), torch.zeros(2, 8))
    assert skewed.balance_loss.item() > 2.0
    skewed.balance_loss.backward()
    assert skewed.router.weight.grad.abs().sum() > 0


def test_expert_usage_is_reported_per_layer():
    model = small_model().eval()
    model.reset_expert_usage()
    with torch.no_grad():
        model(torch.randn(1, 3, S, S), Prompts(class_ids=torch.tensor([0])))
    usage = model.expert_usage()
    assert len(usage) == model.config.decoder_layers
    assert all(abs(sum(layer) - 1) < 1e-5 for layer in usage)


def test_invalid_top_k_is_refused():
    with pytest.raises(ValueError, match="top_k"):
        MoEFeedForward(dim=8, hidden=16, num_experts=2, top_k=3)


def test_base_preset_builds_and_runs():
    model = build_model(preset("base", image_size=64, num_classes=2)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64), Prompts(class_ids=torch.tensor([1])))
    assert out.logits.shape == (1, 1, 32, 32)


def test_class_head_logits_for_chosen_classes_equal_the_full_pass():
    import torch

    from kprism.model import build_model, preset

    torch.manual_seed(0)
    model = build_model(preset("tiny", image_size=64, num_classes=5, class_head=True)).eval()
    with torch.no_grad():
        features = model.encode(torch.randn(2, 3, 64, 64))
        full = model.segment_all(features)
        chosen = torch.tensor([[4, 0], [2, 2]])
        part = model.class_head.logits_for(model.class_head.pixel_features(features), chosen)
    assert part.shape == (2, 2, 32, 32)
    for b in range(2):
        assert torch.allclose(part[b], full[b, chosen[b]], atol=1e-5)
