"""Shared fixtures. Triton kernels run in the interpreter here: TRITON_INTERPRET must be set before any
``@triton.jit`` function is defined, so it is set at import time of this file."""
import gc
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Two xdist workers share the cores, and each launch starts 2-3 processes of its own: one OpenMP thread a
# process keeps them from oversubscribing the cores (spinning threads of one process stall the others').
os.environ.setdefault("OMP_NUM_THREADS", "1")

import random
import sys

# The environment's own scripts first on PATH, as an activated venv has them: torch builds DeepSpeed's JIT ops
# with whichever `ninja` PATH finds, and two ninja versions (the venv's pip `ninja`, the system's) read each
# other's build logs as stale, so every process of the other kind rebuilt the ops (~1 min of g++ on both
# cores) in the folder they share.
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
from pathlib import Path

# `python -m pytest` puts the working directory (the repo root) on sys.path, where the kernels/ folder
# would import as a top-level `kernels` and shadow Hugging Face's package. Only bmc_fast.* is ours.
_REPO = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _REPO]

import pytest  # noqa: E402
import torch  # noqa: E402

# Decorate the kernels now, under the interpreter: @triton.jit reads TRITON_INTERPRET once, when the module is
# imported, and a test that sets it to 0 (the CUDA-only checks) must not be the first to import them.
import bmc_fast.kernels.contrastive_triton  # noqa: E402, F401
from helpers import MODERNBERT_TOKENIZER  # noqa: E402

# The one test far longer than any other (every example of the docs, in order: about 6 minutes of the ~14).
LONGEST = "test_docs_examples.py::test_every_example_runs_in_order"


def pytest_collection_modifyitems(config, items):
    """The longest test first, then the other slow tests (each launches processes for 30-150 s) in file order, then
    the rest: with the tests handed out one at a time (``make test``: ``--maxschedchunk 1``), one xdist worker
    runs the longest while the other takes the next ones, and both end on short tests instead of one finishing a
    long test alone."""
    items.sort(key=lambda item: (not item.nodeid.endswith(LONGEST), item.get_closest_marker("slow") is None))


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def free_dali_pipelines():
    """After the test, collect what it left in reference cycles (a loader held by an exception's traceback): a DALI
    pipeline among it would otherwise be collected in a later test's forked DataLoader worker, whose copy has no
    DALI threads, and hang or abort it there."""
    yield
    gc.collect()


@pytest.fixture(scope="session")
def modernbert_tokenizer():
    if not (MODERNBERT_TOKENIZER / "tokenizer.json").is_file():
        pytest.skip(f"ModernBERT tokenizer absent ({MODERNBERT_TOKENIZER}); it comes with ../shared/data")
    from bmc_fast.data.text_tokenizer import load_tokenizer

    return load_tokenizer(MODERNBERT_TOKENIZER)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """A small synthetic dataset (4 train shards of 64, 1 eval shard of 32) and a tokenizer trained on it."""
    from bmc_fast.data import synthetic
    from bmc_fast.data.default_data import shard_captions
    from bmc_fast.data.text_tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("small_data")
    manifest = synthetic.generate(out, seed=3, n_train=256, n_eval=32, samples_per_shard=64)
    tokenizer = train_tokenizer(shard_captions(out / "train"), out / "tokenizer", vocab_size=1024)
    return {"root": out, "train": manifest["train"], "eval": manifest["eval"], "tokenizer_dir": str(out / "tokenizer"),
            "tokenizer": tokenizer}

