"""The Hugging Face Hub: weights and tokenizers named by Hub id, and an export's model card and upload
(``python -m bmc_fast.export ... --push-to-hub``).

``resolve(spec, kind, flag)`` turns ``--image-weights``, ``--text-weights``, ``--tokenizer`` or ``--pretrained`` into
a local path: a path that exists is used as it is; ``ORG/NAME``, ``ORG/NAME@REVISION`` or open_clip's
``hf-hub:ORG/NAME`` is fetched into huggingface_hub's cache (``HF_HOME`` / ``HF_HUB_CACHE``; ``HF_HUB_OFFLINE=1``
reads the cache only; ``HF_ENDPOINT`` and ``HF_TOKEN`` honoured) and the cached path returned. A revision pins a
commit, branch or tag.

The card (``README.md`` in the export) says what the model is, the paper, what it was trained on, its context
length, the evaluation its run logged last, and how to load it with open_clip and with bmc-fast. The upload is
``huggingface_hub``'s: ``HfApi.create_repo(exist_ok=True)`` then ``HfApi.upload_folder`` (the token is the
user's: ``HF_TOKEN`` or ``huggingface-cli login``; ``HF_ENDPOINT`` is honoured).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from bmc_fast.errors import ConfigError
from bmc_fast.model.config import ModelConfig

_logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
HUB_ID = re.compile(r"^(?:hf-hub:)?(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
# What each kind of --flag fetches: image weights, one file (the first the repository has, in this order); text
# weights and tokenizers, the files of a save_pretrained directory
IMAGE_FILES = ("open_clip_model.safetensors", "model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin")
TEXT_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", "pytorch_model.bin"]
TOKENIZER_PATTERNS = ["tokenizer*", "special_tokens_map.json", "vocab*", "merges.txt", "*.model", "config.json"]
# a whole model (--pretrained): an export's files (bmc_fast.checkpoint.export)
MODEL_PATTERNS = ["open_clip_config.json", "open_clip_model.safetensors", "bmc_fast_config.json", *TOKENIZER_PATTERNS]


def resolve(spec: str, kind: str, flag: str) -> str:
    """The local path of ``spec`` (a path, or a Hub id fetched into the cache); ``kind``: ``image``, ``text``,
    ``tokenizer`` or ``model`` (an export, for ``--pretrained``). A spec that is neither an existing path nor a Hub
    id comes back unchanged, for the caller's own check to name."""
    match = HUB_ID.match(spec)
    if Path(spec).exists() or match is None:
        return spec
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    repo, revision = match["repo"], match["revision"]
    try:
        if kind == "image":
            for name in IMAGE_FILES:
                try:
                    path = hf_hub_download(repo, name, revision=revision)
                    break
                except (EntryNotFoundError, LocalEntryNotFoundError):
                    continue
            else:
                raise ConfigError(f"{flag} {spec!r}: the repository holds none of {list(IMAGE_FILES)}"
                                  + _offline_hint())
        else:
            patterns = {"text": TEXT_PATTERNS, "tokenizer": TOKENIZER_PATTERNS, "model": MODEL_PATTERNS}[kind]
            path = snapshot_download(repo, revision=revision, allow_patterns=patterns)
    except ConfigError:
        raise
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as error:
        raise ConfigError(f"{flag} {spec!r} could not be fetched from the Hub ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}){_offline_hint()}; a gated or private "
                          "repository needs HF_TOKEN (huggingface-cli login), or pass a local path") from error
    _logger.info("%s %s: %s", flag, spec, path)
    return str(path)


def _offline_hint() -> str:
    from huggingface_hub import constants

    return (" (HF_HUB_OFFLINE=1: only the cache is read, and it does not hold it)" if constants.HF_HUB_OFFLINE
            else "")

PAPER = "https://arxiv.org/abs/2510.03978"


def check_hub_id(hub_id: str, flag: str = "--push-to-hub") -> str:
    """``ORG/NAME``, as the Hub names a repository; otherwise ``ConfigError`` naming ``flag``."""
    parts = hub_id.split("/")
    if len(parts) != 2 or not all(parts) or any(c.isspace() for c in hub_id):
        raise ConfigError(f"{flag} {hub_id!r} is not a Hub repository id: pass ORG/NAME, e.g. my-lab/bmc-longclip-512")
    return hub_id


def model_card(cfg: ModelConfig, hub_id: str, run: dict[str, Any] | None, summary: dict[str, Any] | None) -> str:
    """The export's ``README.md``: ``run`` is the run's ``config.json``, ``summary`` its ``summary.json`` (either may
    be missing)."""
    train = (run or {}).get("train", {})
    lines = [
        "---", "library_name: open_clip", "tags: [clip, biomedical, bmc-fast, modernbert]", "---", "",
        f"# {hub_id.split('/')[1]}", "",
        f"A long-context biomedical CLIP (BMC-LongCLIP, [No Tokens Wasted]({PAPER})) trained with bmc-fast: a ViT "
        "image tower and a ModernBERT text tower, mean-pooled text, both projected to "
        f"{cfg.embed_dim}, captions of up to **{cfg.context_length} tokens**.", "",
        "| | |", "|---|---|",
        f"| image tower | ViT {cfg.vision.layers} layers, width {cfg.vision.width}, patch {cfg.vision.patch_size}, "
        f"{cfg.vision.image_size} px |",
        f"| text tower | ModernBERT {cfg.text.num_hidden_layers} layers, hidden {cfg.text.hidden_size} |",
        f"| context length | {cfg.context_length} tokens |",
        f"| caption cleaning | {cfg.text_clean} |",
    ]
    if train:
        lines += [f"| training data | `{train.get('train_data')}` |", f"| steps | {train.get('max_steps')} |",
                  f"| global batch | {(run or {}).get('batch', {}).get('global_batch')} |"]
    evaluation = (summary or {}).get("eval") or {}
    if evaluation:
        lines += ["", f"Retrieval on the run's evaluation set (N = {(summary or {}).get('n_eval')}), Recall@K in %:",
                  "", "| " + " | ".join(evaluation) + " |", "|" + "---|" * len(evaluation),
                  "| " + " | ".join(f"{value:.1f}" for value in evaluation.values()) + " |"]
    lines += [
        "", "## Use", "", "open_clip 3.3 does not know ModernBERT yet; one line teaches it:", "", "```python",
        "import open_clip", "from bmc_fast.checkpoint.open_clip_compat import register_modernbert", "",
        "register_modernbert()",
        f'model, _, preprocess = open_clip.create_model_and_transforms("hf-hub:{hub_id}")',
        f'tokenizer = open_clip.get_tokenizer("hf-hub:{hub_id}")', "```", "",
        "With bmc-fast, from a local copy (`huggingface-cli download` or `snapshot_download`):", "", "```python",
        "import bmc_fast", "", "model, tokenizer, preprocess = bmc_fast.load_model(LOCAL_DIR)",
        'ids = tokenizer(["an axial CT image of the chest"])  # (1, context_length), as open_clip\'s',
        "text = model.encode_text(ids, ids != tokenizer.pad_token_id, normalize=True)", "```", "",
    ]
    return "\n".join(lines)


def write_card(out: Path, cfg: ModelConfig, hub_id: str, run: dict | None, summary: dict | None) -> Path:
    path = Path(out) / CARD_NAME
    path.write_text(model_card(cfg, hub_id, run, summary))
    return path


def push_export(out: Path, hub_id: str, private: bool = False, api=None) -> str:
    """Upload the export directory ``out`` to the model repository ``hub_id`` (created if missing); returns the
    commit's URL. ``api``: a ``huggingface_hub.HfApi`` (default: a new one, with the user's token)."""
    from huggingface_hub import HfApi

    api = api or HfApi()
    api.create_repo(hub_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=str(out), repo_id=hub_id, repo_type="model",
                               commit_message=f"bmc-fast export of {Path(out).name}")
    _logger.info("pushed %s to https://huggingface.co/%s", out, hub_id)
    return str(getattr(commit, "commit_url", commit))
