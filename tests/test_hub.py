"""Weights and tokenizers named by Hub id (``ORG/NAME``, ``@REVISION``, open_clip's ``hf-hub:``), read from a
huggingface_hub cache filled beforehand, with ``HF_HUB_OFFLINE=1``, and fetched into an empty cache from a local
stand-in of the Hub at ``HF_ENDPOINT`` (``helpers.ShardServer``): no network. The cache is laid out as
huggingface_hub writes it (``models--ORG--NAME/snapshots/<commit>/``, ``refs/main``); the models are random inits
of the real classes (``ModernBertModel``, bmc-fast's ViT in open_clip's names)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import REPO, ShardServer

TEXT = {"vocab_size": 1024, "pad_token_id": 3, "cls_token_id": 1, "sep_token_id": 2}


def _snapshot(cache, repo: str, source_dir) -> str:
    """Put the files of ``source_dir`` in ``cache`` as the snapshot of ``repo`` that ``refs/main`` names; its
    commit id."""
    commit = hashlib.sha1(repo.encode()).hexdigest()
    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(source_dir, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    return commit


RESOLVE = """
import json, sys
import torch
from bmc_fast.checkpoint.hub import resolve
from bmc_fast.errors import ConfigError
from bmc_fast.model.clip import create_model

text_cfg = json.loads(sys.argv[1])
local_text, local_image, commit, local_export = sys.argv[2:6]
paths = {"text": resolve("lab/tiny-text", "text", "--text-weights"),
         "pinned": resolve(f"lab/tiny-text@{commit}", "text", "--text-weights"),
         "image": resolve("hf-hub:lab/tiny-clip", "image", "--image-weights"),
         "tokenizer": resolve("lab/tiny-text", "tokenizer", "--tokenizer"),
         "local": resolve(local_text, "text", "--text-weights")}
torch.manual_seed(0)  # the projections the checkpoints do not hold start alike
by_id = create_model("tiny", image_weights=paths["image"], text_weights=paths["pinned"], text=text_cfg).state_dict()
torch.manual_seed(0)
by_path = create_model("tiny", image_weights=local_image, text_weights=local_text, text=text_cfg).state_dict()
paths["same"] = by_id.keys() == by_path.keys() and all(torch.equal(by_id[k], by_path[k]) for k in by_id)
from bmc_fast.trainer.warm_start import pretrained_state  # --pretrained hf-hub:ORG/NAME: a whole export
paths["model"] = resolve("hf-hub:lab/tiny-export", "model", "--pretrained")
by_id, by_path = pretrained_state(paths["model"]), pretrained_state(local_export)
paths["model_same"] = by_id.keys() == by_path.keys() and all(torch.equal(by_id[k], by_path[k]) for k in by_id)
try:
    resolve("lab/absent", "text", "--text-weights")
except ConfigError as error:
    paths["error"] = str(error)
print(json.dumps(paths))
"""


def test_hub_ids_load_the_weights_of_their_local_files_offline_and_from_hf_endpoint(small_data, tmp_path):
    import torch
    import transformers
    from safetensors.torch import save_file

    from bmc_fast.model.clip import create_model
    from bmc_fast.model.config import load_model_config
    from bmc_fast.model.state_dict_adapters import OpenClip

    cfg = load_model_config("tiny", text=TEXT)
    text_dir, image_dir = tmp_path / "text", tmp_path / "image"
    torch.manual_seed(7)
    transformers.ModernBertModel(transformers.ModernBertConfig(**cfg.text.to_hf_kwargs())).save_pretrained(text_dir)
    for name in os.listdir(small_data["tokenizer_dir"]):
        shutil.copy(os.path.join(small_data["tokenizer_dir"], name), text_dir)
    image_dir.mkdir()
    source = create_model("tiny", text=TEXT)
    save_file({k: v.contiguous() for k, v in OpenClip.to_open_clip(source.state_dict()).items()},
              str(image_dir / "open_clip_model.safetensors"))
    from bmc_fast.checkpoint.export import export
    from bmc_fast.data.text_tokenizer import load_tokenizer

    export(source, load_tokenizer(small_data["tokenizer_dir"]), source.cfg, tmp_path / "export")
    cache = tmp_path / "hub"
    commit = _snapshot(cache, "lab/tiny-text", text_dir)
    image_commit = _snapshot(cache, "lab/tiny-clip", image_dir)
    export_commit = _snapshot(cache, "lab/tiny-export", tmp_path / "export")

    offline = {"HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}
    _check_resolved(_resolve_in_child(offline, text_dir, image_dir, commit, tmp_path), cache, commit, image_commit,
                    text_dir, offline=True)

    # The same ids from a local server at HF_ENDPOINT into an empty cache, as huggingface_hub fetches them
    server = ShardServer(tmp_path)
    server.models = {"lab/tiny-text": (commit, text_dir), "lab/tiny-clip": (image_commit, image_dir),
                     "lab/tiny-export": (export_commit, tmp_path / "export")}
    online = {"HF_HUB_CACHE": str(tmp_path / "hub-online"), "HF_HOME": str(tmp_path / "hf-home"),
              "HF_ENDPOINT": server.url, "HF_HUB_DISABLE_TELEMETRY": "1"}
    try:
        got = _resolve_in_child(online, text_dir, image_dir, commit, tmp_path)
    finally:
        server.close()
    _check_resolved(got, tmp_path / "hub-online", commit, image_commit, text_dir, offline=False)
    assert ("/api/models/lab/tiny-text/revision/main", None) in server.requests


def _resolve_in_child(env: dict, text_dir, image_dir, commit: str, cwd) -> dict:
    env = {**{k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}, **env}
    proc = subprocess.run([sys.executable, "-c", RESOLVE, json.dumps(TEXT), str(text_dir),
                           str(image_dir / "open_clip_model.safetensors"), commit, str(cwd / "export")], cwd=cwd,
                          env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def _check_resolved(got: dict, cache, commit: str, image_commit: str, text_dir, offline: bool) -> None:
    snapshot = str(cache / "models--lab--tiny-text" / "snapshots" / commit)
    assert got["text"] == got["pinned"] == got["tokenizer"] == snapshot
    assert got["image"] == str(cache / "models--lab--tiny-clip" / "snapshots" / image_commit /
                               "open_clip_model.safetensors")
    assert got["local"] == str(text_dir)  # a path that exists is a path
    assert got["same"]  # by id, the weights of the same files by path
    assert got["model"].startswith(str(cache / "models--lab--tiny-export" / "snapshots")) and got["model_same"]
    assert "--text-weights 'lab/absent' could not be fetched" in got["error"]
    assert ("HF_HUB_OFFLINE=1" in got["error"]) == offline, got["error"]


@pytest.mark.parametrize("spec,is_id", [("org/name", True), ("org/name@v1.0", True), ("hf-hub:timm/vit_b.x", True),
                                       ("runs/x/y/z", False), ("name", False), ("/abs/path", False)])
def test_what_counts_as_a_hub_id(spec, is_id):
    from bmc_fast.checkpoint.hub import HUB_ID

    assert (HUB_ID.match(spec) is not None) == is_id


def test_the_train_cli_names_the_flag_of_an_id_it_cannot_fetch(small_data, tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "bmc_fast/train.py", "--train-data", small_data["train"], "--tokenizer",
                           "nobody/no-tokenizer", "--output-dir", str(tmp_path / "run")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: --tokenizer 'nobody/no-tokenizer' could not be fetched from the Hub" in proc.stderr
