"""A real nqserve process on a free loopback port, serving a tiny byte-tokenizer model, for the whole module."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from nqfmt import TokenizerInfo
from nqfmt.keys import GGMLType

from bench.synthetic_model import byte_tokenizer_json
from synthetic_variants import CHATML, SPECIAL, VARIANTS, write_variant

API_KEY = "test-key-123"
CONTEXT = 1024  # room for a long stream that a client leaves early


@dataclass
class Server:
    url: str
    model_id: str
    path: Path
    process: subprocess.Popen
    log: Path
    api_key: str = API_KEY
    context: int = CONTEXT

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve_model(tmp_path_factory) -> Path:
    """A llama variant with one token per byte plus ChatML's special tokens and a 1024-token context."""
    path = tmp_path_factory.mktemp("serve") / "tiny-chat.nq"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(VARIANTS, "serve", (dict(arch="llama", context_length=CONTEXT), (40,), False, GGMLType.F16))
        write_variant(path, "serve", vocab=259, tokenizer=TokenizerInfo(byte_tokenizer_json(SPECIAL), CHATML,
                                                                        bos_id=256, eos_id=257, add_bos=False))
    return path


@pytest.fixture(scope="module")
def server(serve_model, tmp_path_factory) -> Server:
    """`python -m nqserve` with an API key and the default host (loopback)."""
    port = free_port()
    log = tmp_path_factory.mktemp("log") / "nqserve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "nqserve", str(serve_model), "--port", str(port),
                                 "--threads", "1", "--parallel", "8", "--api-key", API_KEY],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90  # the first start on a machine may compile the kernels
    while True:
        if proc.poll() is not None:
            pytest.fail(f"nqserve exited with {proc.returncode}: {log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"nqserve did not answer /health: {log.read_text()}")
        time.sleep(0.2)
    yield Server(url, serve_model.stem, serve_model, proc, log)
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
