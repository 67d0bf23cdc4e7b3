"""Paths and small utilities shared by the tests (tests/ is on sys.path under pytest; the repo root is
deliberately not, so that the ``kernels/`` folder can never be imported as a top-level ``kernels``)."""
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
MODERNBERT_TOKENIZER = SHARED_DATA / "tokenizers" / "modernbert"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
