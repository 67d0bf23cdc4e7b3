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
from helpers import RunsCode

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


def _compare(model, tokenizer, cfg, out, image_size):
    """open_clip's tokens, image and text embeddings (fp32) against bmc-fast's, within 1e-5 relative."""
    oc_model, preprocess, oc_tokenizer = _open_clip(out)
    ids = oc_tokenizer(CAPTIONS)  # (2, context), padded to the context as open_clip does
    ours = tokenizer(CAPTIONS, padding="max_length", max_length=cfg.context_length, truncation=True,
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


def test_tiny_export_loads_in_open_clip_offline_with_the_same_embeddings(modernbert_tokenizer, tmp_path):
    from bmc_fast.data.transforms import image_transform

    cfg = load_model_config("tiny").with_tokenizer(modernbert_tokenizer)
    model = BMCLongCLIP(cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.1)  # not the init: the value must travel
    out = export(model, modernbert_tokenizer, cfg, tmp_path / "export")
    assert {p.name for p in out.iterdir()} >= {CONFIG_NAME, WEIGHTS_NAME, "config.json", "tokenizer.json"}
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))  # safetensors only
    oc_model, preprocess = _compare(model, modernbert_tokenizer, cfg, out, cfg.vision.image_size)
    assert type(oc_model.text).__name__ == "HFTextEncoder"

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 70, 3), dtype=np.uint8))
    torch.testing.assert_close(preprocess(image), image_transform(cfg.vision.image_size, train=False)(image))


@pytest.mark.slow  # ~0.45 B parameters built twice
def test_paper_architecture_exports_key_for_key(modernbert_tokenizer, tmp_path):
    cfg = load_model_config("bmc-longclip-l14-512").with_tokenizer(modernbert_tokenizer)
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
