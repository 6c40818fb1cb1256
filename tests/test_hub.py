"""The hub probe (retailklip.hub): an unreachable hub costs one request, not huggingface_hub's
retries, and weights already in the hub cache still load without network."""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from retailklip import hub

REPO = Path(__file__).resolve().parents[1]


def closed_port() -> int:
    """A local TCP port nothing listens on (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def hub_endpoint(monkeypatch):
    """Point huggingface_hub at a local endpoint, offline switch off; returns a setter."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def point(url: str) -> None:
        monkeypatch.setattr(constants, "ENDPOINT", url)
    return point


def test_probe_names_the_unreachable_endpoint(hub_endpoint):
    url = f"http://127.0.0.1:{closed_port()}"
    hub_endpoint(url)
    reason = hub.hub_unreachable()
    assert reason.startswith(f"cannot reach {url} (") and "ConnectError" in reason and "\n" not in reason


def test_probe_counts_any_http_answer_as_reachable(hub_endpoint):
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        hub_endpoint(f"http://127.0.0.1:{server.server_port}")
        assert hub.hub_unreachable() is None
    finally:
        server.shutdown()
        server.server_close()


def test_offline_switch_is_on_only_inside_the_block(hub_endpoint):
    from huggingface_hub import constants

    hub_endpoint(f"http://127.0.0.1:{closed_port()}")
    with hub.hub_or_cache("test") as reason:
        assert reason.startswith("cannot reach") and constants.HF_HUB_OFFLINE is True
    assert constants.HF_HUB_OFFLINE is False
    with pytest.raises(KeyError):
        with hub.hub_or_cache("test"):
            raise KeyError("the block failed")
    assert constants.HF_HUB_OFFLINE is False  # restored after an error too


def hub_cache_with_mobilenet(hf_home: Path, weights: Path) -> None:
    """``hf_home/hub`` holding timm's ``mobilenetv2_100`` weights as a download would leave them
    (repo ``timm/mobilenetv2_100.ra_in1k``, ``refs/main`` -> a snapshot with ``model.safetensors``)."""
    repo = hf_home / "hub" / "models--timm--mobilenetv2_100.ra_in1k"
    commit = "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    shutil.copy(weights, repo / "snapshots" / commit / "model.safetensors")


def run_catalog(tmp_path: Path, hf_home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_HUB_CACHE")}
    env.update(HF_HOME=str(hf_home), HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "catalog.cli", "--catalog", str(tmp_path / "cat"), *args],
                          check=False, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def test_unreachable_hub_fails_in_one_line_without_retries(tmp_path):
    """Without the probe this took 52-54 s and printed 44 warning lines (the hub unreachable, the
    offline switch not set: a store's machine without network)."""
    r = run_catalog(tmp_path, tmp_path / "hf", "init", "--encoder", "timm:mobilenetv2_100")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "timm:mobilenetv2_100" in lines[0] and "cannot reach http://127.0.0.1:" in lines[0]
    assert "not in the Hugging Face cache" in lines[0] and "--weights FILE" in lines[0]
    assert not (tmp_path / "cat" / "catalog.db").exists()


def test_unreachable_hub_still_loads_cached_weights(tmp_path, mobilenet_weights, iconic, monkeypatch):
    """The hub cache holds the weights: the tag loads them offline, and the catalog embeds
    exactly as one made from the same file with ``--weights``."""
    from huggingface_hub import constants

    hub_cache_with_mobilenet(tmp_path / "hf", mobilenet_weights)
    r = run_catalog(tmp_path, tmp_path / "hf", "init", "--encoder", "timm:mobilenetv2_100")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))  # this process opens it too
    from catalog import Catalog
    from retailklip.encoders import create_encoder

    cat = Catalog.open(tmp_path / "cat")
    try:
        image = iconic[0][2]
        cat.add(image, sku="golden")
        ids, skus = cat.embedding_table()
        assert skus == ["golden"]
        from_file = create_encoder("timm:mobilenetv2_100", weights=mobilenet_weights).embed([image])
        np.testing.assert_array_equal(cat.vectors(ids, 1280), from_file)
    finally:
        cat.close()
