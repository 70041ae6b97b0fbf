"""Model weights: the checkpoint file format, the manifest of known models, and finding weights.

A checkpoint is one safetensors file whose header metadata carries everything needed to rebuild
the model (config, class catalog), so a file is usable on its own, without the manifest.

Every file records the sha256 of its tensor data (metadata key `tensors_sha256`), checked on each
read, so a damaged or modified file is refused wherever it comes from, even without a manifest entry.

Weights are looked for in a fixed order: an explicit file, the copy bundled with the package, the
Hugging Face Hub cache, and only when asked (and not offline) a download. Nothing but the last
step touches the network, so a missing file fails fast instead of waiting on connection retries;
the download itself gives up within seconds when the Hub does not answer.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import threading
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import huggingface_hub
import huggingface_hub.constants  # a submodule: `huggingface_hub.constants` is not importable as an attribute
import torch
from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from kprism.atomic import atomic_path
from kprism.catalog import ClassCatalog
from kprism.model.config import KPrismConfig

try:  # huggingface_hub 1.x and later talk HTTP through httpx2, whose errors are not OSErrors
    from httpx2 import HTTPError as _HubTransportError
    from httpx2 import TimeoutException as _HubTimeout
except ImportError:  # older huggingface_hub uses requests, whose errors are OSErrors
    _HubTransportError, _HubTimeout = OSError, TimeoutError

# What a failed Hub request raises: HfHubHTTPError and OfflineModeIsEnabled are OSErrors.
_HUB_ERRORS: tuple[type[Exception], ...] = (OSError, EntryNotFoundError, _HubTransportError)

FORMAT_NAME = "kprism"
FORMAT_VERSION = "1"
DEFAULT_MODEL = "kprism-tiny"
TENSORS_SHA256_KEY = "tensors_sha256"  # metadata key of the tensor-data hash, see `tensors_sha256`

# One Hub request before a download, with this connect/read timeout and no retries (HF_HUB_ETAG_TIMEOUT,
# when set, replaces it); a clock bounds the whole request, name lookup included, at the timeout plus
# HUB_LOOKUP_MARGIN_S. So without a network a download fails in seconds, not minutes.
HUB_TIMEOUT_S = 3.0
HUB_LOOKUP_MARGIN_S = 2.0

# Real directories, not just importable resources: safetensors memory-maps the file by path.
MANIFEST_PATH = Path(str(importlib.resources.files("kprism") / "models.json"))
BUNDLED_DIR = Path(str(importlib.resources.files("kprism") / "weights"))

_DOWNLOAD_ADVICE = "Run `kprism models download {name}` when online, or pass a local file with --model PATH."

T = TypeVar("T")


class WeightsError(RuntimeError):
    """Weights that cannot be found, read or trusted; the message says which file and what to do."""


class MissingTensorHashWarning(UserWarning):
    """A checkpoint written before kprism recorded tensor hashes: it loads, but damage goes unnoticed."""


class _DeadlinePassed(TimeoutError):
    """A Hub request still running when its wall-clock deadline passed."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file's contents, and where it came from."""

    state_dict: dict[str, torch.Tensor] = field(repr=False)
    config: KPrismConfig
    catalog: ClassCatalog
    training: dict[str, Any]
    path: Path
    sha256: str  # of the whole file
    tensors_sha256: str | None = None  # recorded in the file and checked; None in files older than the hash


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


_HASH_CACHE: dict[tuple[str, int, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, remembered per (path, inode, mtime, size) so repeated loads do not rehash.

    The inode is part of the key because atomic rewrites replace it: a file rewritten with the same
    size within the file system's timestamp granularity still gets a fresh hash.
    """
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_ino, stat.st_mtime_ns, stat.st_size)
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


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 of tensor data, independent of how a file lays the tensors out.

    Tensors are hashed in name order, each as the JSON text `[name, dtype, shape]` followed by its
    raw bytes, so a changed byte, name, dtype or shape changes the hash, while the header's order,
    padding and offsets do not.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        dtype = str(tensor.dtype).removeprefix("torch.")
        digest.update(json.dumps([name, dtype, list(tensor.shape)]).encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def _checked_tensor_hash(path: Path, metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The tensor hash recorded in the file, after checking it; None if the file records none."""
    recorded = metadata.get(TENSORS_SHA256_KEY)
    if recorded is not None and tensors_sha256(tensors) != recorded.lower():
        raise WeightsError(
            f"{path}: its tensor data do not match the sha256 recorded in it: corrupt or modified; "
            "re-download or re-export it."
        )
    return recorded


def _warn_missing_tensor_hash(path: Path) -> None:
    warnings.warn(
        f"{path} carries no tensor hash, so damage to its weights cannot be detected; add one by re-exporting "
        f"it with kprism.weights.save_checkpoint (or kprism.weights.reexport_checkpoint('{path}')).",
        MissingTensorHashWarning,
        stacklevel=3,
    )


# ---------------------------------------------------------------------------------------------
# Checkpoint files


def _savable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as CPU, contiguous tensors, none sharing memory, as safetensors requires.

    Tied weights are written once per name (cloned), so the file loads with strict=True into a
    freshly built model, which ties them again itself. A float32 tensor whose every value float16
    holds exactly (a foundation encoder converted from float16 weights) is stored as float16:
    lossless, and it halves the bulk of a `medsam` file; loading casts it back.
    """
    tensors: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen_storages:
            tensor = tensor.clone()
        seen_storages.add(storage)
        if tensor.dtype == torch.float32 and tensor.numel() > 1:
            half = tensor.half()
            if torch.equal(half.float(), tensor):
                tensor = half
        tensors[name] = tensor
    return tensors


def _write_checkpoint(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> str:
    """Write tensors and metadata plus their tensor hash, whole or not at all; returns the file's sha256."""
    metadata = {**metadata, TENSORS_SHA256_KEY: tensors_sha256(tensors)}
    with atomic_path(path, suffix=".safetensors") as temporary:
        save_file(tensors, temporary, metadata=metadata)
    return file_sha256(path)


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    config: KPrismConfig,
    catalog: ClassCatalog,
    training: dict[str, Any] | None = None,
) -> str:
    """Write `model` with its config, classes and tensor hash to one safetensors file; returns its sha256."""
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(config.to_dict()),
        "classes": json.dumps(catalog.to_list()),
    }
    if training is not None:
        metadata["training"] = json.dumps(training)
    return _write_checkpoint(_savable_state_dict(model), Path(path), metadata)


def reexport_checkpoint(source: str | os.PathLike, target: str | os.PathLike | None = None) -> str:
    """Rewrite a checkpoint so it records its tensor hash (in place unless `target`); returns the new sha256.

    For files written before kprism recorded one. Tensors and all other metadata are copied unchanged;
    a file whose recorded hash does not match is refused rather than blessed.
    """
    source = Path(source)
    metadata, tensors = _read_safetensors(source)
    _parse_metadata(metadata, source)  # only KPrism checkpoints
    _checked_tensor_hash(source, metadata, tensors)
    return _write_checkpoint(tensors, Path(target) if target is not None else source, dict(metadata))


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


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors on the CPU) of a safetensors file, or a WeightsError saying why not."""
    if not path.is_file():
        raise WeightsError(f"Checkpoint file {path} not found. Check the path, or see `kprism models list`.")
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}, {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as error:
        raise WeightsError(
            f"{path} is not a readable safetensors file ({error}); it is truncated, corrupt or of another "
            "format. Re-download it (`kprism models download NAME`) or export it again."
        ) from error


def read_checkpoint(path: str | os.PathLike, expected_sha256: str | None = None) -> Checkpoint:
    """Read and check a checkpoint file (file hash if given, recorded tensor hash); tensors on the CPU.

    A file without a recorded tensor hash (written before kprism recorded one) still loads, with a
    MissingTensorHashWarning.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Checkpoint file {path} not found. Check the path, or see `kprism models list`.")
    sha256 = _check_sha256(path, expected_sha256) if expected_sha256 else file_sha256(path)
    metadata, state_dict = _read_safetensors(path)
    config, catalog, training = _parse_metadata(metadata, path)
    recorded = _checked_tensor_hash(path, metadata, state_dict)
    if recorded is None:
        _warn_missing_tensor_hash(path)
    return Checkpoint(state_dict, config, catalog, training, path, sha256, recorded)


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
    embedding_cache: bool | None = None,
) -> tuple[nn.Module, ClassCatalog, Checkpoint]:
    """Build the model a checkpoint describes and load its weights strictly, in eval mode.

    `source` is a file path or a model name (see `resolve_weights`); nothing is downloaded. A model on a
    foundation encoder keeps its slice embeddings in the on-disk cache (`kprism.embedding_cache`) unless
    `embedding_cache` is False or $KPRISM_EMBEDDING_CACHE is "off": a slice seen before is read, not encoded.
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
    if embedding_cache is None:
        embedding_cache = os.environ.get("KPRISM_EMBEDDING_CACHE", "").strip().lower() != "off"
    if embedding_cache and checkpoint.config.foundation:
        model.encoder.use_disk_cache()
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
    with atomic_path(MANIFEST_PATH, suffix=".json") as temporary:
        temporary.write_text(text, encoding="utf-8")
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
    # huggingface_hub reads HF_HUB_OFFLINE once, at its import; this is the value its downloads obey.
    return huggingface_hub.constants.HF_HUB_OFFLINE


def _one_line(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message (Hub errors span several)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _download_error(info: ModelInfo, cause: str) -> WeightsError:
    return WeightsError(
        f"Download of model {info.name!r} ({info.filename} from {huggingface_hub.constants.ENDPOINT}/{info.repo_id}) "
        f"failed: {cause}. Check the network and proxy settings (HTTPS_PROXY), or work without the network: "
        "pass a local file with --model PATH, or set HF_HUB_OFFLINE=1 to use local copies only."
    )


def _run_with_deadline(work: Callable[[], T], seconds: float) -> T:
    """`work()` in a daemon thread; a TimeoutError if it has not finished after `seconds`.

    Socket timeouts do not cover name lookups, so only a clock bounds a request's total time. A
    thread still running is abandoned: its own socket timeouts end it, and it never blocks exit.
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as error:  # handed to the caller, re-raised there
            outcome["error"] = error

    thread = threading.Thread(target=run, name="kprism-hub-request", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise _DeadlinePassed(f"no answer within {seconds:g} s, name lookup included")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _hub_timeout() -> float:
    """Seconds to wait for the Hub: HF_HUB_ETAG_TIMEOUT if the user set it (a slow link), else HUB_TIMEOUT_S."""
    configured = huggingface_hub.constants.HF_HUB_ETAG_TIMEOUT
    return float(configured) if configured != huggingface_hub.constants.DEFAULT_ETAG_TIMEOUT else HUB_TIMEOUT_S


def _check_hub_answers(info: ModelInfo, timeout: float) -> None:
    """One metadata request for the model file, with a short timeout and no retries.

    Done before `hf_hub_download`, which retries a failed first request up to six times with a 60 s
    timeout each (about 400 s through a proxy that never answers, 24 s when the name does not
    resolve): a Hub that cannot be reached now fails here within `timeout` + HUB_LOOKUP_MARGIN_S.
    """
    url = huggingface_hub.hf_hub_url(info.repo_id, info.filename)
    wait_longer = "set HF_HUB_ETAG_TIMEOUT to wait longer"
    try:
        # retry_on_errors stays at its default, False: one attempt only.
        _run_with_deadline(lambda: huggingface_hub.get_hf_file_metadata(url, timeout=timeout),
                           timeout + HUB_LOOKUP_MARGIN_S)
    except _DeadlinePassed as error:
        raise _download_error(info, f"{error} ({wait_longer})") from error
    except (_HubTimeout, TimeoutError) as error:
        raise _download_error(info, f"no answer within {timeout:g} s ({_one_line(error)}; {wait_longer})") from error
    except _HUB_ERRORS as error:
        raise _download_error(info, _one_line(error)) from error


def _download(info: ModelInfo, cache_dir: str | os.PathLike | None) -> Path:
    timeout = _hub_timeout()
    _check_hub_answers(info, timeout)
    try:
        downloaded = huggingface_hub.hf_hub_download(
            info.repo_id, info.filename, cache_dir=cache_dir, etag_timeout=timeout
        )
    except _HUB_ERRORS as error:
        raise _download_error(info, _one_line(error)) from error
    return Path(downloaded)


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


def _hash_notes(info: ModelInfo | None, checkpoint: Checkpoint) -> str:
    """What the hashes proved about a checkpoint that loaded."""
    if checkpoint.tensors_sha256 is None:
        tensors = ("the file carries no tensor hash, so damaged weights cannot be detected: re-export it "
                   "with kprism.weights.save_checkpoint (or kprism.weights.reexport_checkpoint) to add one")
    else:
        tensors = "tensor data match the sha256 recorded in the file"
    if info is None:
        manifest = "no manifest entry to compare the file hash with"
    elif info.sha256:
        manifest = "file sha256 matches the manifest"
    else:
        manifest = "the manifest has no sha256 yet"
    return f"{tensors}; {manifest}"


def verify_model(name_or_path: str | os.PathLike) -> tuple[bool, str]:
    """Check that a local model is intact and loads strictly: (ok, human-readable one-line message)."""
    try:
        explicit = _explicit_file(name_or_path)
        info = None if explicit is not None else get_model_info(os.fspath(name_or_path))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MissingTensorHashWarning)  # the message below says it instead
            _, catalog, checkpoint = load_model(name_or_path)
    except WeightsError as error:
        return False, str(error)
    problems = _manifest_disagreements(info, checkpoint) if info else []
    if problems:
        return False, f"{checkpoint.path} does not match manifest entry {info.name}: {'; '.join(problems)}."
    return True, (
        f"{checkpoint.path}: OK, {len(checkpoint.state_dict)} tensors, {len(catalog)} classes, "
        f"sha256 {checkpoint.sha256} ({_hash_notes(info, checkpoint)})."
    )
