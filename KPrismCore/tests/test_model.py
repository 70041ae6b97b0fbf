"""The network: every mode and combination runs, gradients reach every trainable parameter, MoE works."""

from __future__ import annotations

import itertools

import pytest
import torch

from kprism.model import MODES, ExpertUsage, Prompts, build_model, preset
from kprism.model.moe import MoEFeedForward
from kprism.train.losses import total_loss

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
        out = model(torch.randn(batch, 3, S, S), prompts, deep_supervision=True)
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


def test_moe_top_k_routes_each_token_to_exactly_k_experts_and_returns_the_usage():
    torch.manual_seed(0)
    moe = MoEFeedForward(dim=16, hidden=32, num_experts=4, top_k=2)
    tokens, mode = torch.randn(3, 5, 16), torch.randn(3, 16)
    _, routing = moe(tokens, mode)
    assert routing.usage.sum() == 3 * 5 * 2  # 15 tokens × 2 experts each
    probs = torch.softmax(moe.router(tokens + mode[:, None]), -1)
    chosen = torch.zeros_like(probs).scatter(-1, probs.topk(2, -1).indices, 1.0)
    assert torch.equal(routing.usage, chosen.sum((0, 1)))
    assert not routing.usage.requires_grad


def test_moe_router_sees_the_mode():
    """Same tokens, different mode embedding → different routing."""
    torch.manual_seed(0)
    moe = MoEFeedForward(dim=16, hidden=32, num_experts=4, top_k=1)
    tokens = torch.randn(1, 8, 16)
    _, first = moe(tokens, torch.zeros(1, 16))
    _, second = moe(tokens, torch.full((1, 16), 5.0) * torch.randn(1, 16))
    assert not torch.equal(first.usage, second.usage)


def test_moe_balance_loss_is_minimal_for_uniform_routing_and_trains_the_router():
    moe = MoEFeedForward(dim=8, hidden=16, num_experts=4, top_k=0)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.bias.zero_()
    _, routing = moe(torch.randn(2, 6, 8), torch.zeros(2, 8))
    assert routing.balance_loss.item() == pytest.approx(1.0, abs=1e-5)  # E · Σ (1/E)(1/E) · E... = 1 when uniform
    skewed = MoEFeedForward(dim=8, hidden=16, num_experts=4, top_k=1)
    with torch.no_grad():
        skewed.router.bias.copy_(torch.tensor([5.0, 0, 0, 0]))
    _, routing = skewed(torch.randn(2, 6, 8), torch.zeros(2, 8))
    assert routing.balance_loss.item() > 2.0
    routing.balance_loss.backward()
    assert skewed.router.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------ no hidden state in forward (issue 11 item 5)
def _module_state(model: torch.nn.Module) -> tuple[dict, dict]:
    """Every tensor the model holds (non-persistent buffers included) and every module attribute."""
    tensors = {name: t.detach().clone() for name, t in model.state_dict(keep_vars=True).items()}
    tensors.update({name: t.detach().clone() for name, t in model.named_buffers()})
    attributes = {}
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            if isinstance(value, torch.Tensor):
                value = value.detach().clone()
            elif isinstance(value, dict):  # parameters, buffers, submodules, hooks: which objects hang there
                value = {k: id(v) for k, v in value.items()}
            attributes[(name, key)] = value
    return tensors, attributes


def _assert_same_entries(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        same = torch.equal(value, after[key]) if isinstance(value, torch.Tensor) else value == after[key]
        assert same, f"{key} changed while decoding"


def test_decoding_twice_at_inference_changes_no_module_attribute_or_buffer():
    model = small_model().eval()
    features = model.encode(torch.randn(1, 3, S, S))
    tensors, attributes = _module_state(model)
    with torch.inference_mode():
        first = model.decode(features, Prompts(class_ids=torch.tensor([1])))
        model.decode(features, Prompts(points=torch.tensor([[[20.0, 30.0]]]), point_labels=torch.tensor([[1]])))
        again = model.decode(features, Prompts(class_ids=torch.tensor([1])))
    after_tensors, after_attributes = _module_state(model)
    _assert_same_entries(tensors, after_tensors)
    _assert_same_entries(attributes, after_attributes)
    assert torch.equal(first.logits, again.logits) and torch.equal(first.expert_usage, again.expert_usage)


def test_balance_loss_comes_back_in_the_prediction_and_trains_every_router():
    model = small_model().train()
    returned = []  # what each MoE layer hands back to the decoder
    for layer in model.decoder.layers:
        layer.moe.register_forward_hook(lambda module, inputs, output: returned.append(output[1]))
    out = model(torch.randn(2, 3, S, S), Prompts(class_ids=torch.tensor([0, 2])), deep_supervision=True)
    assert len(returned) == model.config.decoder_layers
    assert torch.equal(out.balance_loss, torch.stack([r.balance_loss for r in returned]).mean())
    assert out.balance_loss.requires_grad and out.balance_loss.item() >= 1.0 - 1e-5  # 1 is the uniform optimum
    out.balance_loss.backward()
    for layer in model.decoder.layers:
        assert layer.moe.router.weight.grad.abs().sum() > 0


def _deep_kernel_calls(model) -> list:
    calls = []
    for kernel in model.mask_head.kernels[:2]:  # the stride-8 and stride-4 kernels feed only deep supervision
        kernel.register_forward_hook(lambda module, inputs, output: calls.append(module))
    return calls


def test_mask_head_computes_deep_supervision_only_when_asked():
    model = small_model().eval()
    calls = _deep_kernel_calls(model)
    features = model.encode(torch.randn(1, 3, S, S))
    prompts = Prompts(points=torch.tensor([[[20.0, 30.0]]]), point_labels=torch.tensor([[1]]))
    with torch.no_grad():
        plain = model.decode(features, prompts)
        assert plain.aux_logits == [] and calls == []
        deep = model.decode(features, prompts, deep_supervision=True)
    assert len(calls) == 2
    assert [tuple(a.shape[-2:]) for a in deep.aux_logits] == [(S // 8, S // 8), (S // 4, S // 4)]
    assert torch.equal(plain.logits, deep.logits) and torch.equal(plain.quality, deep.quality)
    # Training mode alone does not switch them on: the caller asks, as the trainer does.
    model.train()
    assert model(torch.randn(1, 3, S, S), prompts).aux_logits == []
    trained = model(torch.randn(1, 3, S, S), prompts, deep_supervision=True)
    assert len(trained.aux_logits) == 2 and all(a.requires_grad for a in trained.aux_logits)


def test_training_loss_refuses_a_prediction_without_deep_supervision():
    model = small_model().train()
    prompts = Prompts(class_ids=torch.tensor([0]))
    target = torch.zeros(1, S, S)
    target[:, 20:40, 20:40] = 1
    weights = {"mask": 1.0, "deep": 0.4, "balance": 0.01, "quality": 0.5}
    with pytest.raises(ValueError, match="deep_supervision=True"):
        total_loss(model(torch.randn(1, 3, S, S), prompts), target, weights)
    parts = total_loss(model(torch.randn(1, 3, S, S), prompts, deep_supervision=True), target, weights)
    assert parts["deep"] > 0 and parts["balance"].requires_grad


def test_expert_usage_accumulates_only_in_the_callers_counter():
    model = small_model().eval()
    assert not [name for name, _ in model.named_buffers() if "usage" in name]
    token_counts = []
    first_moe = model.decoder.layers[0].moe
    first_moe.register_forward_hook(lambda module, inputs, output: token_counts.append(inputs[0].shape[:2].numel()))
    counted, other = ExpertUsage(), ExpertUsage()
    features = model.encode(torch.randn(2, 3, S, S))
    with torch.inference_mode():
        a = model.decode(features, Prompts(class_ids=torch.tensor([0, 1])))
        b = model.decode(features, Prompts(points=torch.tensor([[[20.0, 30.0]]] * 2), point_labels=torch.tensor([[1]] * 2)))
    counted.add(a.expert_usage)
    counted.add(b.expert_usage)
    assert a.expert_usage.shape == (model.config.decoder_layers, model.config.num_experts)
    slots_per_layer = sum(token_counts) * model.config.expert_top_k
    assert counted.counts.sum(1).tolist() == [slots_per_layer] * model.config.decoder_layers
    assert torch.equal(counted.counts, (a.expert_usage + b.expert_usage).double())
    fractions = counted.fractions()
    assert len(fractions) == model.config.decoder_layers and all(abs(sum(layer) - 1) < 1e-9 for layer in fractions)
    assert other.counts is None and other.fractions() == []  # a counter nobody fed stays empty
    counted.reset()
    assert counted.fractions() == []
    with pytest.raises(ValueError, match="cannot be added"):
        other.add(torch.ones(2, 4))
        other.add(torch.ones(3, 4))


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
