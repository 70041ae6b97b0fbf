"""Reliability round 2, weights (project issue 10, item 7): weights are verifiable, downloads fail fast.

W02  a weights file records the sha256 of its tensor data; a changed byte is refused on load and by
     `kprism models verify`, wherever the file comes from.
W05  `kprism models download` runs in a fresh process (it once died on `huggingface_hub.constants`).
W05b with the network unreachable a download fails within 10 s with a one-line message, instead of
     retrying for minutes. Tested against servers on 127.0.0.1 only: nothing leaves this machine.

All data are generated under tmp_path from the bundled weights and samples.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_reliability import run_kprism

from kprism import weights

BUNDLED = weights.BUNDLED_DIR / "kprism-tiny.safetensors"
CARD = weights.BUNDLED_DIR / "kprism-tiny.md"
CHEST_XRAY = Path(weights.__file__).parent / "samples" / "chest_xray" / "MCUCXR_0001_0.png"
DOWNLOAD_BOUND_S = 10  # the bound for a download without a network
RUN_KPRISM = "import sys; from kprism.cli import main; sys.exit(main(sys.argv[1:]))"


def data_section_start(path: Path) -> int:
    """Offset of the first tensor byte: after the 8-byte header length and the JSON header."""
    (header_length,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + header_length


def copy_with_flipped_data_byte(tmp_path: Path) -> Path:
    """The bundled weights with one bit flipped in the middle of the tensor data: still a valid file."""
    data = bytearray(BUNDLED.read_bytes())
    start = data_section_start(BUNDLED)
    data[start + (len(data) - start) // 2] ^= 0x01
    path = tmp_path / "flip_data.safetensors"
    path.write_bytes(bytes(data))
    return path


# ----------------------------------------------------------------------------------------------- W02


def test_W02_flipped_data_byte_is_refused_by_load_segment_and_verify(tmp_path, capsys):
    flipped = copy_with_flipped_data_byte(tmp_path)
    refusal = f"{flipped}: its tensor data do not match the sha256 recorded in it: corrupt or modified"

    with pytest.raises(weights.WeightsError, match="do not match the sha256 recorded") as error:
        weights.load_model(flipped)
    assert str(error.value).startswith(refusal) and "\n" not in str(error.value)

    out = tmp_path / "W2.png"
    code, _, err = run_kprism(capsys, "segment", CHEST_XRAY, "--classes", "lung", "--model", flipped, "--out", out,
                              "--device", "cpu", "--threads", "1")
    assert code == 1 and refusal in err and "re-download or re-export" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()

    code, out_text, _ = run_kprism(capsys, "models", "verify", flipped)
    assert code == 1 and out_text.startswith(refusal) and len(out_text.strip().splitlines()) == 1


def test_W02_bundled_weights_record_their_tensor_hash_and_every_citation_matches():
    with safe_open(BUNDLED, framework="pt") as f:
        recorded = f.metadata()["tensors_sha256"]
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    file_sha = hashlib.sha256(BUNDLED.read_bytes()).hexdigest()

    assert weights.tensors_sha256(tensors) == recorded
    assert weights.get_model_info("kprism-tiny").sha256 == file_sha
    card = CARD.read_text(encoding="utf-8")
    assert f"sha256 `{file_sha}`" in card and f"tensor data sha256 `{recorded}`" in card
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no MissingTensorHashWarning for the shipped file
        ok, message = weights.verify_model("kprism-tiny")
    assert ok and "tensor data match the sha256 recorded in the file" in message
    assert "file sha256 matches the manifest" in message


def test_W02_older_file_without_tensor_hash_loads_with_a_warning_and_verify_says_so(tmp_path, capsys):
    with safe_open(BUNDLED, framework="pt") as f:
        metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    del metadata["tensors_sha256"]
    older = tmp_path / "older.safetensors"
    save_file(tensors, older, metadata=metadata)

    with pytest.warns(weights.MissingTensorHashWarning) as caught:
        model, catalog, _ = weights.load_model(older)
    message = str(caught[0].message)
    assert str(older) in message and "carries no tensor hash" in message and "\n" not in message
    assert "kprism.weights.save_checkpoint" in message
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in tensors.items())
    assert catalog.names == list(weights.get_model_info("kprism-tiny").classes)

    code, out, _ = run_kprism(capsys, "models", "verify", older)
    assert code == 0 and "OK, 290 tensors, 80 classes" in out and "carries no tensor hash" in out

    weights.reexport_checkpoint(older)  # the remedy the warning names
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert weights.read_checkpoint(older).tensors_sha256 == weights.read_checkpoint(BUNDLED).tensors_sha256


# ----------------------------------------------------------------------------------------------- W05, W05b


class SilentServer:
    """Accepts connections on 127.0.0.1 and never answers; stops itself after `lifetime` seconds."""

    def __init__(self, lifetime: float = 30.0):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.deadline = time.monotonic() + lifetime
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set() and time.monotonic() < self.deadline:
            try:
                self.accepted.append(self.listener.accept()[0])
            except socket.timeout:
                continue
        for connection in self.accepted:
            connection.close()
        self.listener.close()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(5)


@pytest.fixture
def silent_server():
    server = SilentServer()
    yield server
    server.stop()


def closed_loopback_port() -> int:
    """A port on 127.0.0.1 with nothing listening: connections to it are refused at once."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]


def download_env(tmp_path: Path, endpoint: str, proxy: str | None = None) -> dict[str, str]:
    """The environment of a download that can only reach 127.0.0.1: endpoint, proxies, an empty cache."""
    env = {k: v for k, v in os.environ.items()
           if k.upper() not in {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"} and not k.lower().endswith("_proxy")}
    env = {k: v for k, v in env.items() if k not in {"HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"}}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_ENDPOINT=endpoint, HF_HUB_DISABLE_TELEMETRY="1",
               OMP_WAIT_POLICY="PASSIVE", NO_PROXY="", no_proxy="")
    if proxy:
        env.update({name: proxy for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy")})
    return env


def run_in_fresh_process(env: dict[str, str], *args: str) -> tuple[int, str, float]:
    """`kprism ARGS` in a new Python process (huggingface_hub imported anew): (exit code, stderr, seconds)."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", RUN_KPRISM, *args], env=env, capture_output=True, text=True,
                            timeout=120)
    return result.returncode, result.stderr, time.monotonic() - started


def test_W05_download_in_a_fresh_process_offline_is_a_one_line_refusal(tmp_path):
    env = {**download_env(tmp_path, f"http://127.0.0.1:{closed_loopback_port()}"), "HF_HUB_OFFLINE": "1"}

    code, err, seconds = run_in_fresh_process(env, "models", "download", "kprism-tiny")

    assert code == 1 and "Traceback" not in err and "AttributeError" not in err
    assert err.strip().splitlines() == [
        "kprism: error: Cannot download 'kprism-tiny': Hugging Face Hub offline mode is on (HF_HUB_OFFLINE is set). "
        "Unset it and retry, or pass a local file with --model PATH."
    ]
    assert seconds < DOWNLOAD_BOUND_S


@pytest.mark.parametrize("route", ["stalled proxy", "stalled endpoint", "refused endpoint"])
def test_W05b_download_without_a_network_fails_within_10_s_with_a_one_line_message(tmp_path, silent_server, route):
    if route == "stalled proxy":  # the endpoint is loopback too: nothing can leave the machine if the proxy were skipped
        env = download_env(tmp_path, f"https://127.0.0.1:{closed_loopback_port()}", f"http://127.0.0.1:{silent_server.port}")
    elif route == "stalled endpoint":
        env = download_env(tmp_path, f"http://127.0.0.1:{silent_server.port}")
    else:
        env = download_env(tmp_path, f"http://127.0.0.1:{closed_loopback_port()}")

    code, err, seconds = run_in_fresh_process(env, "models", "download", "kprism-tiny")

    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    message = lines[0]
    assert "Download of model 'kprism-tiny'" in message and "from http" in message and "127.0.0.1" in message
    assert "--model PATH" in message and "HF_HUB_OFFLINE=1" in message
    if route == "refused endpoint":
        assert "ConnectError" in message
    else:
        assert f"no answer within {weights.HUB_TIMEOUT_S:g} s" in message and "HF_HUB_ETAG_TIMEOUT" in message
        assert silent_server.accepted, "the request never reached the local server"
    assert seconds < DOWNLOAD_BOUND_S
    assert not any((tmp_path / "hf-home").rglob("*.safetensors"))
