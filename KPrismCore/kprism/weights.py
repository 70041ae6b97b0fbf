"""Model weights: the checkpoint file format, the manifest of known models, and finding weights.

A checkpoint is one safetensors file whose header metadata carries everything needed to rebuild
the model (config, class catalog), so a file is usable on its own, without the manifest.

Weights are looked for in a fixed order: an explicit file, the copy bundled with the package, the
Hugging Face Hub cache, and only when asked (and not offline) a download. Nothing but the last
step touches the network, so a missing file fails fast instead of waiting on connection retries.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import secrets
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import huggingface_hub
import torch
from huggingface_hub.utils import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from kprism.catalog import ClassCatalog
from kprism.model.config import KPrismConfig

FORMAT_NAME = "kprism"
FORMAT_VERSION = "1"
DEFAULT_MODEL = "kprism-tiny"

# Real directories, not just importable resources: safetensors memory-maps the file by path.
MANIFEST_PATH = Path(str(importlib.resources.files("kprism") / "models.json"))
BUNDLED_DIR = Path(str(importlib.resources.files("kprism") / "weights"))

_DOWNLOAD_ADVICE = "Run `kprism models download {name}` when online, or pass a local file with --model PATH."


class WeightsError(RuntimeError):
    """Weights that cannot be found, read or trusted; the message says which file and what to do."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file's contents, and where it came from."""

    state_dict: dict[str, torch.Tensor] = field(repr=False)
    config: KPrismConfig
    catalog: ClassCatalog
    training: dict[str, Any]
    path: Path
    sha256: str


@dataclass(frozen=True)
class ModelInfo:
    """One entry of `models.json`."""

    name: str
    description: str
    repo_id: str  # Hugging Face Hub model repository
    filename: str
    sha256: str  # empty until the released file is known
    licence: str
    classes: tuple[str, ...]
    input_size: int
    bundled: bool  # shipped inside the package at kprism/weights/<filename>

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelInfo":
        names = [f.name for f in fields(cls)]
        if sorted(values) != sorted(names):
            raise WeightsError(
                f"Manifest entry {values.get('name')!r} in {MANIFEST_PATH} must have exactly the fields "
                f"{names}; it has {sorted(values)}."
            )
        return cls(**{**values, "classes": tuple(values["classes"])})


# ---------------------------------------------------------------------------------------------
# Hashing


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, remembered per (path, mtime, size) so repeated loads do not rehash."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = _hash_file(path)
    return _HASH_CACHE[key]


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_sha256(path: Path, expected: str, name: str = "NAME") -> str:
    actual = file_sha256(path)
    if actual != expected.lower():
        raise WeightsError(
            f"sha256 mismatch for {path}: expected {expected.lower()}, got {actual}. The file is corrupt, "
            f"incomplete or another version: re-download it (`kprism models download {name}`) or check "
            f"it with `kprism models verify {name}`."
        )
    return actual


# ---------------------------------------------------------------------------------------------
# Checkpoint files


@contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """A temporary sibling of `path` to write; on success it replaces `path` in one step.

    Readers, and a crash mid-write, then never see a half-written file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _savable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as CPU, contiguous tensors, none sharing memory, as safetensors requires.

    Tied weights are written once per name (cloned), so the file loads with strict=True into a
    freshly built model, which ties them again itself.
    """
    tensors: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen_storages:
            tensor = tensor.clone()
        seen_storages.add(storage)
        tensors[name] = tensor
    return tensors


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    config: KPrismConfig,
    catalog: ClassCatalog,
    training: dict[str, Any] | None = None,
) -> str:
    """Write `model` with its config and classes to one safetensors file; returns its sha256."""
    path = Path(path)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(config.to_dict()),
        "classes": json.dumps(catalog.to_list()),
    }
    if training is not None:
        metadata["training"] = json.dumps(training)
    with _atomic_path(path) as tmp:
        save_file(_savable_state_dict(model), tmp, metadata=metadata)
    return file_sha256(path)


def _parse_metadata(metadata: dict[str, str] | None, path: Path) -> tuple[KPrismConfig, ClassCatalog, dict[str, Any]]:
    if not metadata or metadata.get("format") != FORMAT_NAME:
        raise WeightsError(
            f"{path} is a safetensors file but not a KPrism checkpoint (its metadata lacks "
            f"format={FORMAT_NAME!r}). Convert it with kprism.weights.save_checkpoint."
        )
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise WeightsError(
            f"{path} uses KPrism checkpoint format version {version!r}, but this kprism reads only "
            f"version {FORMAT_VERSION!r}. Install the kprism version that wrote it, or re-export it."
        )
    try:
        config = KPrismConfig.from_dict(json.loads(metadata["config"]))
        catalog = ClassCatalog.from_list(json.loads(metadata["classes"]))
        training = json.loads(metadata.get("training", "{}"))
    except (KeyError, TypeError, ValueError) as error:
        raise WeightsError(
            f"{path} has damaged KPrism metadata ({type(error).__name__}: {error}). Re-export or re-download it."
        ) from error
    return config, catalog, training


def read_checkpoint(path: str | os.PathLike, expected_sha256: str | None = None) -> Checkpoint:
    """Read and check a checkpoint file; tensors are loaded on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Checkpoint file {path} not found. Check the path, or see `kprism models list`.")
    sha256 = _check_sha256(path, expected_sha256) if expected_sha256 else file_sha256(path)
    try:
        with safe_open(path, framework="pt") as f:
            config, catalog, training = _parse_metadata(f.metadata(), path)
            state_dict = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as error:
        raise WeightsError(
            f"{path} is not a readable safetensors file ({error}); it is truncated, corrupt or of another "
            "format. Re-download it (`kprism models download NAME`) or export it again."
        ) from error
    return Checkpoint(state_dict, config, catalog, training, path, sha256)


def _key_mismatch_error(path: Path, missing: list[str], unexpected: list[str]) -> WeightsError:
    def sample(keys: list[str]) -> str:
        return ", ".join(keys[:5]) + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "")

    problems = []
    if missing:
        problems.append(f"missing keys: {sample(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {sample(unexpected)}")
    return WeightsError(
        f"{path} does not fit the model its config describes ({'; '.join(problems)}). It was probably "
        "written by a different kprism version; use weights exported for this version."
    )


def load_model(
    source: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    expected_sha256: str | None = None,
) -> tuple[nn.Module, ClassCatalog, Checkpoint]:
    """Build the model a checkpoint describes and load its weights strictly, in eval mode.

    `source` is a file path or a model name (see `resolve_weights`); nothing is downloaded.
    """
    # Imported on use: finding, hashing and downloading weights never need the network code, and
    # kprism.model stays free to import this module without a cycle.
    from kprism.model import build_model

    checkpoint = read_checkpoint(resolve_weights(source), expected_sha256)
    model = build_model(checkpoint.config)
    expected_keys, found_keys = set(model.state_dict()), set(checkpoint.state_dict)
    if expected_keys != found_keys:
        raise _key_mismatch_error(
            checkpoint.path, sorted(expected_keys - found_keys), sorted(found_keys - expected_keys)
        )
    try:
        model.load_state_dict(checkpoint.state_dict, strict=True)
    except RuntimeError as error:  # same keys, so a shape mismatch
        raise WeightsError(f"{checkpoint.path} does not fit the model its config describes: {error}") from error
    return model.to(device).eval(), checkpoint.catalog, checkpoint


# ---------------------------------------------------------------------------------------------
# Manifest


def _read_manifest() -> list[dict[str, Any]]:
    try:
        return json.loads(MANIFEST_PATH.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise WeightsError(f"Cannot read the model manifest {MANIFEST_PATH}: {error}. Reinstall kprism.") from error


def load_manifest() -> list[ModelInfo]:
    return [ModelInfo.from_dict(entry) for entry in _read_manifest()]


def _unknown_model_error(name: str, known: list[ModelInfo]) -> WeightsError:
    return WeightsError(
        f"Unknown model {name!r}. Known models: {', '.join(m.name for m in known) or 'none'}. "
        "To use your own weights, pass the path of a .safetensors file."
    )


def get_model_info(name: str) -> ModelInfo:
    known = load_manifest()
    for info in known:
        if info.name == name:
            return info
    raise _unknown_model_error(name, known)


def update_manifest_entry(name: str, **updates: Any) -> ModelInfo:
    """Replace fields of an existing entry (e.g. sha256, classes once weights are exported)."""
    allowed = {f.name for f in fields(ModelInfo)} - {"name"}
    if set(updates) - allowed:
        raise WeightsError(f"Cannot set {sorted(set(updates) - allowed)}; manifest fields are {sorted(allowed)}.")
    models = load_manifest()
    if name not in {m.name for m in models}:
        raise _unknown_model_error(name, models)
    updated = [ModelInfo.from_dict({**asdict(m), **updates}) if m.name == name else m for m in models]
    # Field order of ModelInfo, two-space indent: rewrites give minimal, reviewable diffs.
    text = json.dumps([asdict(m) for m in updated], indent=2, ensure_ascii=False) + "\n"
    with _atomic_path(MANIFEST_PATH) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return next(m for m in updated if m.name == name)


# ---------------------------------------------------------------------------------------------
# Finding weights


def _explicit_file(model: str | os.PathLike | None) -> Path | None:
    """`model` as an existing file; None if it is a model name; an error if it is a missing path."""
    if model is None:
        return None
    path = Path(model).expanduser()
    if path.is_file():
        return path
    text = os.fspath(model)
    looks_like_path = (
        isinstance(model, os.PathLike)
        or path.suffix == ".safetensors"
        or os.sep in text
        or bool(os.altsep and os.altsep in text)
    )
    if looks_like_path:
        raise WeightsError(
            f"Weights file {path.absolute()} not found. Check the path, or pass a model name from `kprism models list`."
        )
    return None


def _hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; this is the value its downloads obey.
    return huggingface_hub.constants.HF_HUB_OFFLINE


def _download(info: ModelInfo, cache_dir: str | os.PathLike | None) -> Path:
    try:
        return Path(huggingface_hub.hf_hub_download(info.repo_id, info.filename, cache_dir=cache_dir))
    except (EntryNotFoundError, HfHubHTTPError) as error:
        raise WeightsError(
            f"Download of {info.filename} from https://huggingface.co/{info.repo_id} failed: {error}"
        ) from error


def _locate(info: ModelInfo, allow_download: bool, cache_dir: str | os.PathLike | None) -> Path:
    tried = []
    if info.bundled:
        bundled = BUNDLED_DIR / info.filename
        if bundled.is_file():
            return bundled
        tried.append(f"bundled file {bundled}: not in this installation")

    try:
        cached = huggingface_hub.hf_hub_download(
            info.repo_id, info.filename, cache_dir=cache_dir, local_files_only=True
        )
        return Path(cached)
    except LocalEntryNotFoundError:
        cache = cache_dir or huggingface_hub.constants.HF_HUB_CACHE
        tried.append(f"Hugging Face cache {cache}: no {info.filename} from {info.repo_id}")

    offline = _hub_offline()
    if allow_download and not offline:
        try:
            return _download(info, cache_dir)
        except WeightsError as error:
            tried.append(str(error))
    elif allow_download:
        tried.append("download: skipped, Hugging Face Hub offline mode is on (HF_HUB_OFFLINE=1)")
    else:
        tried.append("download: not attempted (downloads were not allowed)")

    steps = "\n".join(f"  {i}. {step}" for i, step in enumerate(tried, 1))
    advice = _DOWNLOAD_ADVICE.format(name=info.name)
    if offline:
        advice = f"You are offline (HF_HUB_OFFLINE is set). {advice}"
    raise WeightsError(f"No weights found for model {info.name!r}. Tried, in order:\n{steps}\n{advice}")


def resolve_weights(
    model: str | os.PathLike | None = None,
    *,
    allow_download: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """The weights file for `model`: a file path, or a manifest name (default `kprism-tiny`).

    Order: (a) an existing file; (b) the bundled copy; (c) the Hugging Face Hub cache;
    (d) a download, only with `allow_download` and not offline. A named model's file is checked
    against the manifest sha256 when the manifest has one.
    """
    explicit = _explicit_file(model)
    if explicit is not None:
        return explicit
    info = get_model_info(DEFAULT_MODEL if model is None else os.fspath(model))
    path = _locate(info, allow_download, cache_dir)
    if info.sha256:
        _check_sha256(path, info.sha256, info.name)
    return path


def download_model(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Fetch a model into the Hugging Face Hub cache (a no-op if it is current) and check its hash."""
    info = get_model_info(name)
    if _hub_offline():
        raise WeightsError(
            f"Cannot download {name!r}: Hugging Face Hub offline mode is on (HF_HUB_OFFLINE is set). "
            "Unset it and retry, or pass a local file with --model PATH."
        )
    path = _download(info, cache_dir)
    if info.sha256:
        _check_sha256(path, info.sha256, info.name)
    return path


def _manifest_disagreements(info: ModelInfo, checkpoint: Checkpoint) -> list[str]:
    problems = []
    if info.classes and list(info.classes) != checkpoint.catalog.names:
        problems.append(f"classes {checkpoint.catalog.names} differ from the manifest's {list(info.classes)}")
    if info.input_size != checkpoint.config.image_size:
        problems.append(f"input size {checkpoint.config.image_size} differs from the manifest's {info.input_size}")
    return problems


def verify_model(name_or_path: str | os.PathLike) -> tuple[bool, str]:
    """Check that a local model is intact and loads strictly: (ok, human-readable message)."""
    try:
        explicit = _explicit_file(name_or_path)
        info = None if explicit is not None else get_model_info(os.fspath(name_or_path))
        _, catalog, checkpoint = load_model(name_or_path)
    except WeightsError as error:
        return False, str(error)
    problems = _manifest_disagreements(info, checkpoint) if info else []
    if problems:
        return False, f"{checkpoint.path} does not match manifest entry {info.name}: {'; '.join(problems)}."
    if info is None:
        hash_note = "no manifest entry to compare the hash with"
    elif info.sha256:
        hash_note = "sha256 matches the manifest"
    else:
        hash_note = "the manifest has no sha256 yet, so only the file structure was checked"
    return True, (
        f"{checkpoint.path}: OK, {len(checkpoint.state_dict)} tensors, {len(catalog)} classes, "
        f"sha256 {checkpoint.sha256} ({hash_note})."
    )
