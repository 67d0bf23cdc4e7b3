"""Export -> open_clip's own loader (``local-dir:``, offline) -> the same embeddings as bmc-fast's, against
open_clip 3.3's ``CLIP`` / ``HFTextEncoder`` / ``HFTokenizer`` and preprocess as the independent side."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from bmc_fast.checkpoint.export import CONFIG_NAME, WEIGHTS_NAME, export, export_run
from bmc_fast.errors import ConfigError
from bmc_fast.model.clip import BMCLongCLIP
from bmc_fast.model.config import load_model_config
from helpers import SHARED_DATA, RunsCode

CAPTIONS = ["Axial CT of the chest: a 2 cm spiculated nodule in the right upper lobe.",
            "H&E stain, x40: sheets of atypical cells with mitoses."]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may come from the hub
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _open_clip(out):
    import open_clip

    from bmc_fast.checkpoint.open_clip_compat import register_modernbert

    register_modernbert()
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{out}")


def _compare(model, tokenizer, cfg, out, image_size, captions=CAPTIONS):
    """open_clip's tokens, image and text embeddings (fp32) against bmc-fast's, within 1e-5 relative."""
    oc_model, preprocess, oc_tokenizer = _open_clip(out)
    ids = oc_tokenizer(captions)  # (n, context), padded to the context as open_clip does
    ours = tokenizer(captions, padding="max_length", max_length=cfg.context_length, truncation=True,
                     return_tensors="pt")
    assert torch.equal(ids, ours["input_ids"])
    pixels = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        pairs = [(model.encode_image(pixels, normalize=True), oc_model.encode_image(pixels, normalize=True)),
                 (model.encode_text(ours["input_ids"], ours["attention_mask"], normalize=True),
                  oc_model.encode_text(ids, normalize=True))]
    for mine, theirs in pairs:
        torch.testing.assert_close(theirs, mine, rtol=1e-5, atol=1e-5 * mine.abs().max().item())
    assert oc_model.logit_scale.item() == pytest.approx(model.logit_scale.item())
    return oc_model, preprocess


# What real captions hold and open_clip's tokenizer cleans: runs of spaces, tabs, newlines, edges, HTML entities
# (once and twice escaped), curly quotes, mojibake (UTF-8 read as cp1252), a non-breaking space.
MESSY = ["  Axial CT of the chest:\ta 2 cm   spiculated nodule\n in the right upper lobe.  ",
         "H&amp;E stain, x40: sheets of atypical cells &amp;amp; mitoses &lt;5 per HPF&gt;.",
         "The \u201cground-glass\u201d opacity \u2018resolved\u2019 on follow-up.",
         "Caf\u00c3\u00a9-au-lait macules \u00e2\u0080\u0094 neurofibromatosis type 1",
         "\n\nT2-weighted MRI\r\n\twith\t\tgadolinium\u00a0enhancement\n"]


def _shared_captions(n: int) -> list[str]:
    path = SHARED_DATA / "captions" / "biomed_captions.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line)["text"] for line in lines[::len(lines) // n][:n]]


def test_tiny_export_moved_elsewhere_loads_in_open_clip_offline_with_the_same_embeddings(modernbert_tokenizer,
                                                                                       tmp_path):
    """Exported, copied to another folder and the original deleted, offline: open_clip (with the shim) and
    bmc_fast.load_model tokenise every caption alike (messy ones, and ../shared/data's real ones when present)
    and embed images and texts within 1e-5; no path is written in the export."""
    import shutil

    import bmc_fast
    from bmc_fast.data.text_tokenizer import CaptionTokenizer
    from bmc_fast.data.transforms import image_transform

    cfg = load_model_config("tiny").with_tokenizer(modernbert_tokenizer)
    assert cfg.text_clean == "whitespace"  # the presets clean as open_clip does
    tokenizer = CaptionTokenizer(modernbert_tokenizer.tokenizer, cfg.text_clean, cfg.context_length)
    model = BMCLongCLIP(cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.1)  # not the init: the value must travel
    out = export(model, tokenizer, cfg, tmp_path / "first" / "export")
    assert {p.name for p in out.iterdir()} >= {CONFIG_NAME, WEIGHTS_NAME, "config.json", "tokenizer.json"}
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))  # safetensors only
    assert str(tmp_path) not in "".join(p.read_text() for p in out.glob("*.json"))  # no path anywhere
    moved = shutil.copytree(out, tmp_path / "elsewhere" / "bmc-tiny")
    shutil.rmtree(tmp_path / "first")

    captions = MESSY + _shared_captions(43)
    oc_model, preprocess = _compare(model, tokenizer, cfg, moved, cfg.vision.image_size, captions)
    assert type(oc_model.text).__name__ == "HFTextEncoder"
    loaded, loaded_tokenizer, _ = bmc_fast.load_model(moved)
    ids = loaded_tokenizer(captions)  # open_clip's way: texts only -> (n, context_length)
    import open_clip

    assert torch.equal(ids, open_clip.get_tokenizer(f"local-dir:{moved}")(captions))
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(ids, ids != loaded_tokenizer.pad_token_id, normalize=True),
                                   oc_model.encode_text(ids, normalize=True), rtol=1e-5, atol=1e-6)

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 70, 3), dtype=np.uint8))
    torch.testing.assert_close(preprocess(image), image_transform(cfg.vision.image_size, train=False)(image))


def test_captions_are_cleaned_as_open_clips_tokenizer_cleans_them():
    """``clean_caption(.., "whitespace")`` against open_clip 3.3's own cleaning function; "none" keeps the text;
    the tokenizer wrapper survives pickling (DataLoader workers)."""
    import pickle

    from open_clip.tokenizer import get_clean_fn

    from bmc_fast.data.text_tokenizer import CaptionTokenizer, clean_caption

    theirs = get_clean_fn("whitespace")
    assert [clean_caption(text, "whitespace") for text in MESSY] == [theirs(text) for text in MESSY]
    assert [clean_caption(text, "none") for text in MESSY] == MESSY
    assert clean_caption(MESSY[1], "whitespace") == "H&E stain, x40: sheets of atypical cells & mitoses <5 per HPF>."
    with pytest.raises(ConfigError, match="text_clean must be 'none' or 'whitespace', got 'lower'"):
        CaptionTokenizer(None, "lower")
    wrapped = pickle.loads(pickle.dumps(CaptionTokenizer("a stand-in", "whitespace", 77)))
    assert (wrapped.clean, wrapped.context_length, wrapped.tokenizer) == ("whitespace", 77, "a stand-in")


@pytest.mark.slow  # ~0.45 B parameters built twice
def test_paper_architecture_exports_key_for_key(modernbert_tokenizer, tmp_path):
    """The paper's widths, heads, patch and activation (depth cut: a block's keys are the same at any index)."""
    cfg = load_model_config("bmc-longclip-l14-512", vision={"layers": 2},
                            text={"num_hidden_layers": 4}).with_tokenizer(modernbert_tokenizer)
    model = BMCLongCLIP(cfg).eval()
    out = export(model, modernbert_tokenizer, cfg, tmp_path / "export")
    config = json.loads((out / CONFIG_NAME).read_text())["model_cfg"]
    assert config["quick_gelu"] is True and config["vision_cfg"]["head_width"] == 64
    _compare(model, modernbert_tokenizer, cfg, out, 224)


def test_export_refuses_what_open_clip_cannot_hold(modernbert_tokenizer, tmp_path):
    cfg = load_model_config("tiny").with_tokenizer(modernbert_tokenizer)
    model = BMCLongCLIP(cfg)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists and holds no export"):
        export(model, modernbert_tokenizer, cfg, tmp_path / "busy")
    narrow = load_model_config("tiny", embed_dim=64).with_tokenizer(modernbert_tokenizer)
    with pytest.raises(ConfigError, match="text.hidden_size 128 != embed_dim 64"):
        export(BMCLongCLIP(narrow), modernbert_tokenizer, narrow, tmp_path / "narrow")


@pytest.mark.parametrize("run_dir,out_dir,tag,message", [
    ("nowhere", "out", None, "^run_dir '.*nowhere' is not a finished run directory"),
    ("run", "out", "bogus", r"^--tag 'bogus': run_dir '.*run' has no such checkpoint; its tags are \['step0000002'\]"),
    ("run", "file", None, "out_dir '.*file' is a file"),
    ("run", "file/out", None, "out_dir '.*file/out' cannot be written: '.*file' is a file"),
])
def test_export_names_its_own_arguments_before_reading_weights(tmp_path, run_dir, out_dir, tag, message):
    """The positional ``run_dir`` by name (not retrieval's --checkpoint), --tag, and an ``out_dir`` that is a
    file or lies under one: each refused before a checkpoint is read (this run directory has none)."""
    (tmp_path / "run" / "checkpoints" / "step0000002").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step0000002")
    (tmp_path / "run" / "config.json").write_text("{}")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=message):
        export_run(tmp_path / run_dir, tmp_path / out_dir, tag)
    assert not (tmp_path / "out").exists()


def test_load_model_reads_an_export_back_exactly(modernbert_tokenizer, tmp_path):
    import bmc_fast

    cfg = load_model_config("tiny").with_tokenizer(modernbert_tokenizer)
    model = BMCLongCLIP(cfg).eval()
    out = export(model, modernbert_tokenizer, cfg, tmp_path / "export")
    loaded, tokenizer, transform = bmc_fast.load_model(out)
    assert not loaded.training and tokenizer.pad_token_id == modernbert_tokenizer.pad_token_id
    state = loaded.state_dict()
    assert not [key for key, value in model.state_dict().items() if not torch.equal(state[key], value)]
    image = Image.fromarray(np.zeros((80, 80, 3), dtype=np.uint8))
    assert transform(image).shape == (3, cfg.vision.image_size, cfg.vision.image_size)


def test_load_model_never_unpickles(modernbert_tokenizer, tmp_path):
    import bmc_fast

    cfg = load_model_config("tiny").with_tokenizer(modernbert_tokenizer)
    out = export(BMCLongCLIP(cfg), modernbert_tokenizer, cfg, tmp_path / "export")
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": RunsCode(marker)}, out / WEIGHTS_NAME)  # a pickle under the safetensors name
    with pytest.raises(ConfigError, match="is not a safetensors file .* a renamed pickle is never unpickled"):
        bmc_fast.load_model(out)
    (out / WEIGHTS_NAME).rename(out / "open_clip_pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"\['open_clip_pytorch_model.bin'\] are pickles, which can run code"):
        bmc_fast.load_model(out)
    assert not marker.exists()
    with pytest.raises(ConfigError, match="is neither an export"):
        bmc_fast.load_model(tmp_path)


def test_a_run_trained_on_transformer_engine_layers_exports_its_torch_weights(modernbert_tokenizer, tmp_path,
                                                                              monkeypatch):
    """A run with --te-precision fp8 checkpoints TE names (LayerNormLinear, LayerNormMLP, ...): export_run maps
    them back, and open_clip then embeds as the torch model holding the same weights does. The TE modules are
    tests/reference_te.py's stand-ins (TE itself is CUDA only); the run directory is written as the trainer
    writes one, its ZeRO consolidation replaced by the swapped model's state dict."""
    import dataclasses

    import reference_te

    import bmc_fast.checkpoint.zero_weights
    from bmc_fast.checkpoint.export import export_run
    from bmc_fast.model.weights import load_torch_state

    cfg = load_model_config("tiny").with_tokenizer(modernbert_tokenizer)
    original = BMCLongCLIP(cfg).eval()
    swapped = BMCLongCLIP(dataclasses.replace(cfg, te_precision="fp8"), te_layers=reference_te.layers)
    load_torch_state(swapped, original.state_dict())
    te_state = {k: v.detach().clone() for k, v in swapped.state_dict().items()}
    assert any("layer_norm_weight" in k for k in te_state)  # TE names, not torch's

    run = tmp_path / "run"
    (run / "checkpoints" / "step0000003").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step0000003")
    (run / "config.json").write_text(json.dumps({"model": dataclasses.replace(cfg, te_precision="fp8").to_dict()}))
    modernbert_tokenizer.save_pretrained(run / "tokenizer")
    monkeypatch.setattr(bmc_fast.checkpoint.zero_weights, "fp32_state_dict", lambda checkpoints, tag: te_state)
    out = export_run(run, tmp_path / "export")
    assert json.loads((out / "bmc_fast_config.json").read_text())["te_precision"] == "none"
    _compare(original, modernbert_tokenizer, cfg, out, cfg.vision.image_size)


class RecordingHfApi:
    """``huggingface_hub.HfApi`` as the push calls it, recording what would be sent: the repository made, and each
    uploaded folder's files as they were at upload time."""

    def __init__(self):
        self.repos, self.uploads = [], []

    def create_repo(self, repo_id, **kwargs):
        self.repos.append((repo_id, kwargs))

    def upload_folder(self, *, folder_path, repo_id, **kwargs):
        from pathlib import Path

        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir() if p.is_file()}
        self.uploads.append((repo_id, files, kwargs))
        return f"https://huggingface.co/{repo_id}/commit/0123abc"


def test_push_to_hub_uploads_the_export_with_its_model_card(modernbert_tokenizer, tmp_path, monkeypatch):
    """--push-to-hub ORG/NAME: the export (its open_clip config naming that repository, so hf-hub: reads the text
    config and tokenizer there) plus a model card with the context length, the run's data and logged evaluation,
    and the usage lines, sent through HfApi's create_repo and upload_folder. A malformed id stops before any
    weight is read."""
    import dataclasses

    import bmc_fast.checkpoint.zero_weights
    from bmc_fast.checkpoint.export import main

    cfg = load_model_config("tiny").with_tokenizer(modernbert_tokenizer)
    model = BMCLongCLIP(cfg)
    run = tmp_path / "run"
    (run / "checkpoints" / "step0000003").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step0000003")
    (run / "config.json").write_text(json.dumps({"model": cfg.to_dict(), "train": {
        "train_data": "shards/train/shard-{000000..000009}.tar", "max_steps": 3}, "batch": {"global_batch": 64}}))
    (run / "summary.json").write_text(json.dumps({"eval": {"t2i_r1": 67.5, "i2t_r1": 61.25}, "n_eval": 200}))
    modernbert_tokenizer.save_pretrained(run / "tokenizer")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(bmc_fast.checkpoint.zero_weights, "fp32_state_dict", lambda checkpoints, tag: state)
    with pytest.raises(ConfigError, match=r"--push-to-hub 'bmc-tiny' is not a Hub repository id: pass ORG/NAME"):
        main([str(run), str(tmp_path / "refused"), "--push-to-hub", "bmc-tiny"])
    assert not (tmp_path / "refused").exists()

    api = RecordingHfApi()
    out = export_run(run, tmp_path / "export", hub_id="my-lab/bmc-tiny", private=True, api=api)
    assert api.repos == [("my-lab/bmc-tiny", {"repo_type": "model", "private": True, "exist_ok": True})]
    [(repo, files, _)] = api.uploads
    assert repo == "my-lab/bmc-tiny"
    assert {CONFIG_NAME, WEIGHTS_NAME, "config.json", "tokenizer.json", "bmc_fast_config.json", "README.md"} <= set(
        files)
    text_cfg = json.loads(files[CONFIG_NAME])["model_cfg"]["text_cfg"]
    assert text_cfg["hf_model_name"] == text_cfg["hf_tokenizer_name"] == "my-lab/bmc-tiny"
    card = files["README.md"].decode()
    assert card == (out / "README.md").read_text()
    for expected in ("library_name: open_clip", "2510.03978", "**512 tokens**",
                     "shards/train/shard-{000000..000009}.tar", "| 67.5 | 61.2 |", "N = 200", "register_modernbert()",
                     'open_clip.create_model_and_transforms("hf-hub:my-lab/bmc-tiny")', "bmc_fast.load_model("):
        assert expected in card, expected
    assert dataclasses.asdict(cfg) == json.loads(files["bmc_fast_config.json"])
