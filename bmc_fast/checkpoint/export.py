"""A trained run -> a directory open_clip loads offline with its own ``local-dir:`` scheme.

    python -m bmc_fast.export RUN_DIR OUT_DIR [--tag step0000400]

``OUT_DIR`` holds what open_clip's ``create_model_and_transforms("local-dir:OUT_DIR")`` and
``get_tokenizer("local-dir:OUT_DIR")`` read, as BMC-LongCLIP ships on the hub:

- ``open_clip_config.json``: ``model_cfg`` (the ViT as open_clip's ``vision_cfg``; the text tower as
  ``HFTextEncoder`` over ``ModernBertModel`` with ``mean_pooler`` and the bias-free ``mlp`` projection)
  and ``preprocess_cfg`` (CLIP mean/std, bicubic resize + centre crop, as ``bmc_fast``'s eval transform);
- ``open_clip_model.safetensors``: the fp32 weights (ZeRO checkpoints consolidated, Transformer Engine
  layers mapped back to torch ones);
- the tokenizer files, and the text tower's Hugging Face ``config.json``, so nothing is fetched.

Names map one to one (bmc-fast keeps open_clip's ViT names and HF's ModernBERT names); ``logit_scale``,
and ``logit_bias`` of a ``--loss siglip`` run (``init_logit_bias`` in the config), are () in open_clip and (1,)
here; open_clip has no ``max_logit_scale`` clamp (CLIP's 100 holds in both unless training pushed the scale past
it). open_clip 3.3 does not know ModernBERT:
``bmc_fast.checkpoint.open_clip_compat.register_modernbert()`` must run before open_clip loads the directory.

No path is written: ``text_cfg.hf_model_name`` and ``hf_tokenizer_name`` name the Hub repository the export is
pushed to (``hub_id``), else ``LOCAL_TEXT_CONFIG``; open_clip reads the tokenizer from a ``local-dir:`` folder
itself, and ``register_modernbert()`` reads the text config from the folder's ``config.json``. The directory
therefore loads wherever it is copied, offline. Captions are cleaned as the model was trained
(``ModelConfig.text_clean``): open_clip's ``HFTokenizer`` always cleans ``"whitespace"``, so a model trained
without cleaning (runs from before it existed) tokenises some captions differently in open_clip (logged).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from bmc_fast.checkpoint.load import BMC_CONFIG_NAME, CONFIG_NAME, WEIGHTS_NAME, check_run, load_run
from bmc_fast.cli import check_output_dir
from bmc_fast.errors import ConfigError
from bmc_fast.model.config import ModelConfig
from bmc_fast.model.state_dict_adapters import OpenClip

_logger = logging.getLogger(__name__)

# text_cfg.hf_model_name of an export not (yet) on the Hub: the text config is the folder's own config.json
LOCAL_TEXT_CONFIG = "bmc-fast/text-config-in-this-folder"


def open_clip_config(cfg: ModelConfig, text_name: str = LOCAL_TEXT_CONFIG) -> dict[str, Any]:
    """``open_clip_config.json`` for a model of ``cfg``; ``text_name``: where open_clip finds the text config and
    tokenizer outside a ``local-dir:`` folder (the export's Hub repository)."""
    from bmc_fast.data.transforms import CLIP_MEAN, CLIP_STD

    vision, text = cfg.vision, cfg.text
    if text.hidden_size != cfg.embed_dim:  # ours: hidden -> hidden -> embed; open_clip: d -> (d+e)//2 -> e
        raise ConfigError(f"export: text.hidden_size {text.hidden_size} != embed_dim {cfg.embed_dim}: open_clip's "
                          "'mlp' text projection has a (hidden + embed) // 2 wide middle layer, bmc-fast's a hidden "
                          "wide one, so the weights do not fit; only models with hidden_size == embed_dim export")
    if cfg.text_pooling != "mean":
        raise ConfigError(f"export: text_pooling {cfg.text_pooling!r}: only 'mean' maps to open_clip's mean_pooler")
    model_cfg = {
        "embed_dim": cfg.embed_dim,
        "quick_gelu": vision.act == "quick_gelu",
        "vision_cfg": {"image_size": vision.image_size, "patch_size": vision.patch_size, "width": vision.width,
                       "layers": vision.layers, "head_width": vision.width // vision.heads,
                       "mlp_ratio": vision.mlp_ratio},
        "text_cfg": {"hf_model_name": text_name, "hf_tokenizer_name": text_name,
                     "hf_model_pretrained": False, "hf_proj_type": "mlp", "hf_pooler_type": "mean_pooler",
                     "context_length": cfg.context_length},
    }
    if cfg.init_logit_bias is not None:  # the sigmoid loss's bias: open_clip builds logit_bias, the weights fill it
        model_cfg["init_logit_bias"] = cfg.init_logit_bias
    preprocess_cfg = {"mean": list(CLIP_MEAN), "std": list(CLIP_STD), "interpolation": "bicubic",
                      "resize_mode": "shortest", "size": vision.image_size}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


def export(model, tokenizer, cfg: ModelConfig, out_dir: str | Path, hub_id: str | None = None) -> Path:
    """Write ``model`` (a ``BMCLongCLIP`` on torch layers) and ``tokenizer`` as an open_clip directory; ``hub_id``:
    the Hub repository it will be pushed to (``hf-hub:`` then reads its text config and tokenizer there)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    config = open_clip_config(cfg, hub_id or LOCAL_TEXT_CONFIG)
    if cfg.text_clean != "whitespace":
        _logger.warning("export: this model was trained on captions cleaned %r; open_clip's tokenizer cleans "
                        "'whitespace' (ftfy, HTML entities, spaces), so captions those change tokenise differently "
                        "there than in bmc_fast.load_model", cfg.text_clean)
    tokenizer.save_pretrained(str(out))
    model.text.transformer.config.save_pretrained(str(out))  # config.json: what AutoConfig reads
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in OpenClip.to_open_clip(model.state_dict()).items()}
    save_file(state, str(out / WEIGHTS_NAME))
    (out / BMC_CONFIG_NAME).write_text(json.dumps(cfg.to_dict(), indent=2))
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2))  # last: its presence marks a finished export
    _logger.info("exported %.2fM parameters to %s (open_clip: local-dir:%s)",
                 sum(t.numel() for t in model.parameters()) / 1e6, out, out)
    return out


def check_out_dir(out: Path) -> None:
    """``ConfigError`` unless ``out`` can take an export: a new directory that can be created, an empty one,
    or an earlier export."""
    check_output_dir(out, "out_dir", create=False)
    if out.is_dir() and any(out.iterdir()) and not (out / CONFIG_NAME).is_file():
        raise ConfigError(f"out_dir {str(out)!r} exists and holds no export: pass a new or empty directory")


def export_run(run_dir: str | Path, out_dir: str | Path, tag: str | None = None, hub_id: str | None = None,
               private: bool = False, api=None) -> Path:
    """Export the checkpoint ``tag`` (default: ``latest``) of a training run directory; with ``hub_id``, with a
    model card, pushed to that Hub repository (``bmc_fast.checkpoint.hub``; ``api``: an ``HfApi``)."""
    from bmc_fast.checkpoint import hub

    run = check_run(run_dir, tag, flag="run_dir")  # every argument before the weights are consolidated
    check_out_dir(Path(out_dir))
    if hub_id is not None:
        hub.check_hub_id(hub_id)
    model, tokenizer, cfg = load_run(run_dir, tag=tag, flag="run_dir")
    out = export(model, tokenizer, cfg, out_dir, hub_id)
    if hub_id is not None:
        summary = json.loads(run.summary.read_text()) if run.summary.is_file() else None
        hub.write_card(out, cfg, hub_id, run.read_config(), summary)
        hub.push_export(out, hub_id, private, api)
    return out


def main(argv: list[str] | None = None) -> Path:
    """``python -m bmc_fast.export`` (``bmc_fast/export.py``, the command line's name for this module)."""
    from bmc_fast.cli import ArgumentParser

    parser = ArgumentParser(prog="python -m bmc_fast.export", description="A bmc-fast run -> an open_clip directory.")
    parser.add_argument("run_dir", help="a training run directory (config.json, checkpoints/latest)")
    parser.add_argument("out_dir", help="the directory to write (new or empty)")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the one checkpoints/latest names)")
    parser.add_argument("--push-to-hub", default=None, metavar="ORG/NAME",
                        help="also write a model card and upload the export to this Hugging Face model repository")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return export_run(args.run_dir, args.out_dir, args.tag, args.push_to_hub, args.private)

