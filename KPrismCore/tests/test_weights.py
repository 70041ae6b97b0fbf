"""Checkpoint format, manifest and weight resolution; everything local, nothing touches the network."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import warnings
from dataclasses import fields
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub.utils import LocalEntryNotFoundError
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import kprism.model
from kprism import weights
from kprism.catalog import ClassCatalog
from kprism.model import build_model, preset
from kprism.weights import ModelInfo, WeightsError

CONFIG = preset("tiny", num_classes=3)
CATALOG = ClassCatalog.from_names(["liver", "spleen", "kidney"])
REAL_HF_HUB_DOWNLOAD = huggingface_hub.hf_hub_download


class StandIn(nn.Module):
    """A few-parameter model with the awkward cases: tied weights and a non-contiguous buffer."""

    def __init__(self, config):
        super().__init__()
        self.embed = nn.Embedding(config.num_classes, 4)
        self.head = nn.Linear(4, config.num_classes, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("basis", torch.randn(4, 2).t())


class StandInWithExtraLayer(StandIn):
    def __init__(self, config):
        super().__init__(config)
        self.extra = nn.Linear(2, 2)


class StandInWithoutBuffer(StandIn):
    def __init__(self, config):
        super().__init__(config)
        del self.basis


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Lets huggingface_hub read its cache, and fails the test on any attempt to go online."""

    def local_only(*args, **kwargs):
        if not kwargs.get("local_files_only"):
            pytest.fail(f"network access attempted: hf_hub_download{args}")
        return REAL_HF_HUB_DOWNLOAD(*args, **kwargs)

    def no_metadata_request(url, **kwargs):
        pytest.fail(f"network access attempted: get_hf_file_metadata({url})")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", local_only)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", no_metadata_request)


@pytest.fixture
def hub_answers(monkeypatch) -> list[dict]:
    """The Hub answers the metadata request made before a download; returns the requests made."""
    requests = []
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", lambda url, **kwargs: requests.append({"url": url, **kwargs}))
    return requests


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(kprism.model, "build_model", StandIn)


@pytest.fixture
def checkpoint_file(tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    weights.save_checkpoint(StandIn(CONFIG), path, CONFIG, CATALOG, training={"steps": 10, "datasets": ["a"]})
    return path


def _manifest_entry(**changes) -> dict:
    entry = {
        "name": "kprism-tiny",
        "description": "test model",
        "repo_id": "kprism/kprism-tiny",
        "filename": "kprism-tiny.safetensors",
        "sha256": "",
        "licence": "Apache-2.0",
        "classes": [],
        "input_size": 256,
        "bundled": True,
    }
    return {**entry, **changes}


@pytest.fixture
def manifest(tmp_path, monkeypatch):
    """A private manifest and an empty bundled-weights folder; call it to rewrite the entry."""
    path = tmp_path / "models.json"
    bundled = tmp_path / "bundled"
    bundled.mkdir()
    monkeypatch.setattr(weights, "MANIFEST_PATH", path)
    monkeypatch.setattr(weights, "BUNDLED_DIR", bundled)

    def write(**changes) -> Path:
        path.write_text(json.dumps([_manifest_entry(**changes)]), encoding="utf-8")
        return bundled

    write()
    return write


def _build_hub_cache(cache: Path, repo_id: str, filename: str, source: Path) -> Path:
    """The layout huggingface_hub writes: blobs by hash, refs/<branch> → commit, snapshot symlinks."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    blob = repo / "blobs" / hashlib.sha256(source.read_bytes()).hexdigest()
    blob.parent.mkdir(parents=True)
    shutil.copyfile(source, blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit, encoding="utf-8")  # read back verbatim: a trailing newline would break it
    snapshot = repo / "snapshots" / commit / filename
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    return snapshot


# --- checkpoint format ---------------------------------------------------------------------------


def test_round_trip_keeps_tensors_and_metadata(tmp_path):
    model = StandIn(CONFIG)
    path = tmp_path / "sub" / "model.safetensors"
    sha = weights.save_checkpoint(model, path, CONFIG, CATALOG, training={"steps": 10, "datasets": ["a"]})

    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temp file left behind
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "kprism" and metadata["format_version"] == "1"
    assert metadata["tensors_sha256"] == weights.tensors_sha256(weights._savable_state_dict(model))
    assert json.loads(metadata["config"]) == json.loads(json.dumps(CONFIG.to_dict()))
    assert json.loads(metadata["classes"]) == json.loads(json.dumps(CATALOG.to_list()))

    checkpoint = weights.read_checkpoint(path, expected_sha256=sha.upper())
    assert checkpoint.config == CONFIG
    assert checkpoint.catalog.to_list() == CATALOG.to_list()
    assert checkpoint.training == {"steps": 10, "datasets": ["a"]}
    assert (checkpoint.path, checkpoint.sha256) == (path, sha)
    assert checkpoint.tensors_sha256 == metadata["tensors_sha256"]
    expected = model.state_dict()
    assert checkpoint.state_dict.keys() == expected.keys()  # both names of the tied weight are kept
    for name, tensor in expected.items():
        assert torch.equal(checkpoint.state_dict[name], tensor)


def test_training_metadata_is_optional(tmp_path):
    path = tmp_path / "model.safetensors"
    weights.save_checkpoint(StandIn(CONFIG), path, CONFIG, CATALOG)
    with safe_open(path, framework="pt") as f:
        assert "training" not in f.metadata()
    assert weights.read_checkpoint(path).training == {}


def test_load_model_is_strict_and_in_eval_mode(checkpoint_file, stand_in):
    model, catalog, checkpoint = weights.load_model(checkpoint_file)
    assert isinstance(model, StandIn) and not model.training
    assert catalog.names == CATALOG.names
    assert model.head.weight is model.embed.weight
    assert torch.equal(model.basis, checkpoint.state_dict["basis"])


def test_load_rejects_missing_keys(checkpoint_file, monkeypatch):
    monkeypatch.setattr(kprism.model, "build_model", StandInWithExtraLayer)
    with pytest.raises(WeightsError, match=r"missing keys: extra\.bias, extra\.weight") as error:
        weights.load_model(checkpoint_file)
    assert str(checkpoint_file) in str(error.value)


def test_load_rejects_unexpected_keys(checkpoint_file, monkeypatch):
    monkeypatch.setattr(kprism.model, "build_model", StandInWithoutBuffer)
    with pytest.raises(WeightsError, match="unexpected keys: basis") as error:
        weights.load_model(checkpoint_file)
    assert "missing" not in str(error.value)


def test_load_rejects_wrong_shapes(checkpoint_file, monkeypatch):
    monkeypatch.setattr(kprism.model, "build_model", lambda config: StandIn(preset("tiny", num_classes=5)))
    with pytest.raises(WeightsError, match="does not fit"):
        weights.load_model(checkpoint_file)


def test_real_model_saves_and_reloads_strictly(tmp_path):
    config = preset("tiny", num_classes=3)
    original = build_model(config)
    path = tmp_path / "kprism.safetensors"
    weights.save_checkpoint(original, path, config, CATALOG)

    model, catalog, checkpoint = weights.load_model(path)
    assert type(model) is type(original) and not model.training
    assert checkpoint.config == config and catalog.names == CATALOG.names
    reloaded = model.state_dict()
    for name, tensor in original.state_dict().items():
        assert torch.equal(reloaded[name], tensor), name


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="not found") as error:
        weights.read_checkpoint(tmp_path / "absent.safetensors")
    assert "absent.safetensors" in str(error.value)


def test_random_bytes_are_rejected(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(WeightsError, match="not a readable safetensors file") as error:
        weights.read_checkpoint(path)
    assert str(path) in str(error.value)


def test_truncated_file_is_rejected(checkpoint_file):
    data = checkpoint_file.read_bytes()
    checkpoint_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated"):
        weights.read_checkpoint(checkpoint_file)


def test_wrong_hash_gives_both_hashes_and_a_remedy(checkpoint_file):
    actual = hashlib.sha256(checkpoint_file.read_bytes()).hexdigest()
    with pytest.raises(WeightsError, match="sha256 mismatch") as error:
        weights.read_checkpoint(checkpoint_file, expected_sha256="ab" * 32)
    message = str(error.value)
    assert "ab" * 32 in message and actual in message
    assert "re-download" in message and "kprism models verify" in message


def test_unsupported_format_version(tmp_path):
    path = tmp_path / "future.safetensors"
    save_file({"x": torch.zeros(1)}, path, metadata={"format": "kprism", "format_version": "2"})
    with pytest.raises(WeightsError, match="version '2'.*only version '1'"):
        weights.read_checkpoint(path)


def test_plain_safetensors_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match="not a KPrism checkpoint"):
        weights.read_checkpoint(path)


# --- manifest ------------------------------------------------------------------------------------


def test_shipped_manifest_lists_the_bundled_tiny_model():
    info = weights.get_model_info("kprism-tiny")
    assert info.bundled and info.filename == "kprism-tiny.safetensors" and info.repo_id == "kprism/kprism-tiny"


def test_unknown_model_name_lists_known_ones():
    with pytest.raises(WeightsError, match="Unknown model 'kprism-huge'.*Known models: .*kprism-tiny"):
        weights.get_model_info("kprism-huge")


def test_update_manifest_entry_rewrites_in_field_order(manifest):
    updated = weights.update_manifest_entry("kprism-tiny", sha256="ab" * 32, classes=["liver", "spleen"])
    assert updated.sha256 == "ab" * 32 and updated.classes == ("liver", "spleen")
    assert weights.get_model_info("kprism-tiny") == updated

    text = weights.MANIFEST_PATH.read_text(encoding="utf-8")
    assert text.endswith("\n") and text.startswith('[\n  {\n    "name"')
    assert list(json.loads(text)[0]) == [f.name for f in fields(ModelInfo)]
    with pytest.raises(WeightsError, match="Cannot set"):
        weights.update_manifest_entry("kprism-tiny", weights_url="x")
    with pytest.raises(WeightsError, match="Known models: kprism-tiny"):
        weights.update_manifest_entry("kprism-huge", sha256="")


# --- resolution ----------------------------------------------------------------------------------


def test_explicit_path_wins_over_bundled(manifest, checkpoint_file, tmp_path):
    shutil.copyfile(checkpoint_file, manifest() / "kprism-tiny.safetensors")
    assert weights.resolve_weights(checkpoint_file) == checkpoint_file
    assert weights.resolve_weights(str(checkpoint_file)) == checkpoint_file


@pytest.mark.parametrize("name", ["absent.safetensors", "dir/absent"])
def test_missing_path_does_not_fall_through(manifest, name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("fell through to the hub"))
    with pytest.raises(WeightsError, match=r"Weights file /.*absent(\.safetensors)? not found"):
        weights.resolve_weights(name)


def test_bundled_default(manifest, checkpoint_file):
    bundled = manifest() / "kprism-tiny.safetensors"
    shutil.copyfile(checkpoint_file, bundled)
    assert weights.resolve_weights() == bundled


def test_manifest_hash_is_checked_once_per_file_version(manifest, checkpoint_file, monkeypatch):
    bundled = manifest(sha256=hashlib.sha256(checkpoint_file.read_bytes()).hexdigest()) / "kprism-tiny.safetensors"
    shutil.copyfile(checkpoint_file, bundled)
    hashed = []
    real_hash_file = weights._hash_file
    monkeypatch.setattr(weights, "_hash_file", lambda path: hashed.append(path) or real_hash_file(path))

    assert weights.resolve_weights("kprism-tiny") == bundled
    assert weights.resolve_weights("kprism-tiny") == bundled
    assert len(hashed) == 1

    bundled.write_bytes(bundled.read_bytes() + b"tampered")
    with pytest.raises(WeightsError, match="sha256 mismatch.*kprism models download kprism-tiny"):
        weights.resolve_weights("kprism-tiny")


def test_found_in_local_hub_cache(manifest, checkpoint_file, tmp_path):
    cache = tmp_path / "hub"
    snapshot = _build_hub_cache(cache, "kprism/kprism-tiny", "kprism-tiny.safetensors", checkpoint_file)
    found = weights.resolve_weights("kprism-tiny", cache_dir=cache)
    assert found == cache.resolve() / snapshot.relative_to(cache)
    assert found.read_bytes() == checkpoint_file.read_bytes()


def test_offline_without_any_copy_fails_fast_with_advice(manifest, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError) as error:
        weights.resolve_weights(allow_download=True, cache_dir=tmp_path / "empty-cache")
    message = str(error.value)
    assert "offline" in message and "HF_HUB_OFFLINE" in message
    assert "bundled file" in message and "Hugging Face cache" in message
    assert "kprism models download kprism-tiny" in message and "--model" in message


def test_no_download_unless_allowed(manifest, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(WeightsError, match="download: not attempted"):
        weights.resolve_weights(cache_dir=tmp_path / "empty-cache")


def test_download_is_the_last_resort(manifest, checkpoint_file, tmp_path, monkeypatch, hub_answers):
    calls = []

    def fake_hub(repo_id, filename, *, cache_dir, local_files_only=False, **kwargs):
        calls.append(local_files_only)
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        return str(checkpoint_file)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hub)
    assert weights.resolve_weights(allow_download=True, cache_dir=tmp_path) == checkpoint_file
    assert calls == [True, False]
    assert len(hub_answers) == 1 and hub_answers[0]["timeout"] == weights.HUB_TIMEOUT_S


def test_failed_download_is_reported(manifest, tmp_path, monkeypatch, hub_answers):
    def unreachable(repo_id, filename, *, cache_dir, local_files_only=False, **kwargs):
        raise LocalEntryNotFoundError("connection error")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(WeightsError, match=r"3\. Download of model 'kprism-tiny' \(kprism-tiny.safetensors from .*\) "
                                           r"failed: LocalEntryNotFoundError: connection error"):
        weights.resolve_weights(allow_download=True, cache_dir=tmp_path)


# --- CLI helpers ---------------------------------------------------------------------------------


def test_download_model_refuses_when_offline(manifest, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError, match="offline"):
        weights.download_model("kprism-tiny")


def test_download_model_checks_the_hash(manifest, checkpoint_file, monkeypatch, hub_answers):
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *args, **kwargs: str(checkpoint_file))
    manifest(sha256=hashlib.sha256(checkpoint_file.read_bytes()).hexdigest())
    assert weights.download_model("kprism-tiny") == checkpoint_file
    manifest(sha256="ab" * 32)
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        weights.download_model("kprism-tiny")


def test_verify_a_file(checkpoint_file, stand_in):
    ok, message = weights.verify_model(checkpoint_file)
    assert ok and "OK" in message and "3 classes" in message


def test_verify_reports_a_corrupt_file(checkpoint_file, stand_in):
    checkpoint_file.write_bytes(b"garbage")
    ok, message = weights.verify_model(checkpoint_file)
    assert not ok and "not a readable safetensors file" in message


def test_verify_a_named_model_against_the_manifest(manifest, checkpoint_file, stand_in):
    sha = hashlib.sha256(checkpoint_file.read_bytes()).hexdigest()
    shutil.copyfile(checkpoint_file, manifest(sha256=sha, classes=CATALOG.names) / "kprism-tiny.safetensors")
    ok, message = weights.verify_model("kprism-tiny")
    assert ok and "sha256 matches the manifest" in message

    manifest(sha256=sha, classes=["liver"])
    ok, message = weights.verify_model("kprism-tiny")
    assert not ok and "differ from the manifest" in message


# --- tensor hash ---------------------------------------------------------------------------------


def _flip_last_data_byte(path: Path) -> None:
    """Flips the file's last byte, which lies in a tensor: the header still parses, the data differ."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_tensor_hash_ignores_order_but_not_content():
    tensors = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.tensor(1.5), "c": torch.zeros(0)}
    reference = weights.tensors_sha256(tensors)

    assert weights.tensors_sha256(dict(reversed(list(tensors.items())))) == reference
    assert weights.tensors_sha256({**tensors, "b": tensors["b"].t().contiguous().t()}) == reference  # layout only
    changed_byte = tensors["b"].clone()
    changed_byte.view(torch.uint8)[0] ^= 1
    variants = [
        {**tensors, "b": changed_byte},
        {**tensors, "b": tensors["b"].reshape(3, 2)},
        {**tensors, "b": tensors["b"].to(torch.float64)},
        {"B": tensors["b"], "a": tensors["a"], "c": tensors["c"]},
        {"b": tensors["b"], "a": tensors["a"]},
    ]
    assert len({weights.tensors_sha256(v) for v in variants} | {reference}) == len(variants) + 1


def test_tensor_hash_does_not_depend_on_the_header_layout(tmp_path, checkpoint_file):
    """The same tensors and metadata written in another order give another file but the same tensor hash."""
    with safe_open(checkpoint_file, framework="pt") as f:
        metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    relaid = tmp_path / "relaid.safetensors"
    save_file(dict(reversed(list(tensors.items()))), relaid, metadata=dict(reversed(list(metadata.items()))))

    assert weights.read_checkpoint(relaid).tensors_sha256 == weights.read_checkpoint(checkpoint_file).tensors_sha256


def test_changed_tensor_data_are_refused_naming_the_file(checkpoint_file, stand_in):
    _flip_last_data_byte(checkpoint_file)

    with pytest.raises(WeightsError) as error:
        weights.load_model(checkpoint_file)
    message = str(error.value)
    assert message.startswith(f"{checkpoint_file}: its tensor data do not match the sha256 recorded in it")
    assert "re-download or re-export" in message and "\n" not in message
    ok, verdict = weights.verify_model(checkpoint_file)
    assert not ok and verdict == message


def _without_tensor_hash(path: Path) -> None:
    """Rewrites a checkpoint as kprism wrote it before tensor hashes were recorded."""
    with safe_open(path, framework="pt") as f:
        metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    del metadata["tensors_sha256"]
    save_file(tensors, path, metadata=metadata)


def test_file_without_tensor_hash_loads_with_a_warning_and_verify_says_so(checkpoint_file, stand_in):
    _without_tensor_hash(checkpoint_file)

    with pytest.warns(weights.MissingTensorHashWarning) as caught:
        _, catalog, checkpoint = weights.load_model(checkpoint_file)
    assert catalog.names == CATALOG.names and checkpoint.tensors_sha256 is None
    message = str(caught[0].message)
    assert str(checkpoint_file) in message and "no tensor hash" in message
    assert "kprism.weights.save_checkpoint" in message and "\n" not in message

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # verify reports it in its message instead
        ok, verdict = weights.verify_model(checkpoint_file)
    assert ok and "carries no tensor hash" in verdict and "save_checkpoint" in verdict


def test_reexport_adds_the_tensor_hash_and_keeps_everything_else(checkpoint_file, tmp_path):
    _without_tensor_hash(checkpoint_file)
    with safe_open(checkpoint_file, framework="pt") as f:
        old_metadata, old_tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    target = tmp_path / "rehashed.safetensors"

    sha = weights.reexport_checkpoint(checkpoint_file, target)

    assert sha == hashlib.sha256(target.read_bytes()).hexdigest()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checkpoint = weights.read_checkpoint(target)
    assert checkpoint.tensors_sha256 == weights.tensors_sha256(old_tensors)
    with safe_open(target, framework="pt") as f:
        assert {k: v for k, v in f.metadata().items() if k != "tensors_sha256"} == old_metadata
    assert checkpoint.state_dict.keys() == old_tensors.keys()
    assert all(torch.equal(checkpoint.state_dict[name], tensor) for name, tensor in old_tensors.items())


def test_reexport_refuses_a_file_whose_recorded_hash_does_not_match(checkpoint_file):
    _flip_last_data_byte(checkpoint_file)
    before = checkpoint_file.read_bytes()
    with pytest.raises(WeightsError, match="do not match the sha256 recorded"):
        weights.reexport_checkpoint(checkpoint_file)
    assert checkpoint_file.read_bytes() == before


def test_file_hash_is_recomputed_for_a_same_size_rewrite_with_the_same_mtime(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 64)
    first = weights.file_sha256(path)
    stat = path.stat()
    replacement = tmp_path / "g.bin"
    replacement.write_bytes(b"b" * 64)
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(replacement, path)  # what every atomic writer does: a new inode, maybe within one timestamp tick

    assert weights.file_sha256(path) == hashlib.sha256(b"b" * 64).hexdigest() != first


# --- bounded download ----------------------------------------------------------------------------


def test_a_hub_request_that_never_returns_is_abandoned_at_the_deadline(manifest, monkeypatch):
    """Socket timeouts do not bound a hanging name lookup: the wall-clock deadline does."""
    release = threading.Event()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", lambda url, **kwargs: release.wait(30))
    monkeypatch.setattr(weights, "HUB_TIMEOUT_S", 0.1)
    monkeypatch.setattr(weights, "HUB_LOOKUP_MARGIN_S", 0.2)

    started = time.monotonic()
    try:
        with pytest.raises(WeightsError) as error:
            weights.download_model("kprism-tiny")
    finally:
        release.set()  # lets the abandoned request thread end
    assert time.monotonic() - started < 5
    message = str(error.value)
    assert "Download of model 'kprism-tiny'" in message and "no answer within 0.3 s" in message
    assert "HF_HUB_ETAG_TIMEOUT" in message
    assert "--model PATH" in message and "HF_HUB_OFFLINE=1" in message and "\n" not in message


def test_hf_hub_etag_timeout_set_by_the_user_replaces_the_short_timeout(manifest, monkeypatch, hub_answers, checkpoint_file):
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *args, **kwargs: str(checkpoint_file))
    weights.download_model("kprism-tiny")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_ETAG_TIMEOUT", 45)
    weights.download_model("kprism-tiny")
    assert [request["timeout"] for request in hub_answers] == [weights.HUB_TIMEOUT_S, 45.0]


def test_a_refused_download_names_the_cause_on_one_line(manifest, monkeypatch):
    import httpx2
    from huggingface_hub.errors import RepositoryNotFoundError

    def not_found(url, **kwargs):
        response = httpx2.Response(404, request=httpx2.Request("HEAD", url))
        raise RepositoryNotFoundError("404 Client Error.\n\nRepository Not Found for url: " + url, response=response)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", not_found)
    with pytest.raises(WeightsError) as error:
        weights.download_model("kprism-tiny")
    message = str(error.value)
    assert "failed: RepositoryNotFoundError: 404 Client Error." in message and "\n" not in message


def test_publish_bundles_only_files_that_record_their_tensor_hash(manifest, checkpoint_file, stand_in, tmp_path):
    from kprism.train.publish import publish

    target = publish(checkpoint_file)

    assert target == weights.BUNDLED_DIR / "kprism-tiny.safetensors" and target.read_bytes() == checkpoint_file.read_bytes()
    info = weights.get_model_info("kprism-tiny")
    assert info.sha256 == hashlib.sha256(target.read_bytes()).hexdigest() and list(info.classes) == CATALOG.names
    assert sorted(p.name for p in target.parent.iterdir()) == ["kprism-tiny.safetensors"]  # no temporaries

    older = tmp_path / "older.safetensors"
    shutil.copyfile(checkpoint_file, older)
    _without_tensor_hash(older)
    with pytest.warns(weights.MissingTensorHashWarning), pytest.raises(WeightsError, match="re-export it first"):
        publish(older)
    assert target.read_bytes() == checkpoint_file.read_bytes()
