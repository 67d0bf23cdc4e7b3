"""What open_clip 3.3 lacks to run a ModernBERT text tower, in three places of its ``HFTextEncoder``:

- it reads the text width and its default pooler from ``open_clip.hf_configs.arch_dict[model_type]``,
  which knows roberta, xlm-roberta, mt5, bert and m2m_100 only (``KeyError: 'modernbert'``);
- it builds every encoder with ``AutoModel.from_config(config, add_pooling_layer=...)``, a BERT argument
  ``ModernBertModel`` does not take (``TypeError: ... unexpected keyword argument 'add_pooling_layer'``);
- it reads the text config with ``AutoConfig.from_pretrained(text_cfg.hf_model_name)``, from the Hub or a path,
  never from the ``local-dir:`` folder it is loading (only the tokenizer is looked up there).

``register_modernbert()`` adds the ``arch_dict`` entry, gives ``open_clip.hf_model`` an ``AutoModel`` that drops
``add_pooling_layer`` for ModernBERT configs only (mean pooling never uses HF's pooler), and an ``AutoConfig``
that, while ``create_model("local-dir:DIR")`` runs, reads the config named by DIR's own ``hf_model_name`` from
DIR's ``config.json``: an export loads wherever its folder is, offline (an export pushed to the Hub names its
own repository, which open_clip's ``hf-hub:`` reads without this). It is idempotent and changes nothing for
other models or outside open_clip.
``bmc_fast.load_model`` and ``bmc_fast.export`` call it, and so must code that loads an export with
open_clip directly::

    import bmc_fast.checkpoint.open_clip_compat; bmc_fast.checkpoint.open_clip_compat.register_modernbert()
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:OUT_DIR")
"""
from __future__ import annotations

import contextvars
import functools
import json
import logging
from pathlib import Path

_logger = logging.getLogger(__name__)

MODERNBERT = {
    "config_names": {  # transformers.ModernBertConfig field names
        "context_length": "max_position_embeddings",
        "vocab_size": "vocab_size",
        "width": "hidden_size",
        "heads": "num_attention_heads",
        "layers": "num_hidden_layers",
        "layer_attr": "layers",
        "token_embeddings_attr": "embeddings",
    },
    "pooler": "mean_pooler",
}


_LOADING_DIR: contextvars.ContextVar[Path | None] = contextvars.ContextVar("bmc_fast_local_dir", default=None)


def register_modernbert() -> None:
    """Teach open_clip's ``HFTextEncoder`` the ``modernbert`` model type, and ``local-dir:`` loads their folder's
    own text config (idempotent)."""
    import open_clip
    from open_clip import factory, hf_configs, hf_model

    if "modernbert" not in hf_configs.arch_dict:
        hf_configs.arch_dict["modernbert"] = MODERNBERT
    if not isinstance(hf_model.AutoModel, _AutoModelForOpenClip):
        hf_model.AutoModel = _AutoModelForOpenClip(hf_model.AutoModel)
        hf_model.AutoConfig = _AutoConfigForOpenClip(hf_model.AutoConfig)
        _logger.info("open_clip: ModernBERT text towers enabled (arch_dict entry; add_pooling_layer dropped; "
                     "local-dir: folders read their own text config)")
    if not getattr(factory.create_model, "_reads_local_dir_text_config", False):
        factory.create_model = open_clip.create_model = _noting_local_dir(factory.create_model)


def _noting_local_dir(create_model):
    """open_clip's ``create_model``, noting the folder of a ``local-dir:`` model while it is built."""
    from open_clip.factory import parse_model_name

    @functools.wraps(create_model)
    def create(model_name: str, *args, **kwargs):
        schema, identifier = parse_model_name(model_name)
        token = _LOADING_DIR.set(Path(identifier) if schema == "local-dir" else None)
        try:
            return create_model(model_name, *args, **kwargs)
        finally:
            _LOADING_DIR.reset(token)

    create._reads_local_dir_text_config = True
    return create


class _AutoConfigForOpenClip:
    """``transformers.AutoConfig`` as ``HFTextEncoder`` calls it: inside a ``local-dir:DIR`` load, the name DIR's
    ``open_clip_config.json`` gives as ``hf_model_name`` reads ``DIR/config.json``."""

    def __init__(self, auto_config):
        self._auto_config = auto_config

    def from_pretrained(self, name_or_path, **kwargs):
        folder = _LOADING_DIR.get()
        if folder is not None and (folder / "config.json").is_file():
            text_cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
            if name_or_path == text_cfg.get("hf_model_name"):
                return self._auto_config.from_pretrained(str(folder), **kwargs)
        return self._auto_config.from_pretrained(name_or_path, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._auto_config, name)


class _AutoModelForOpenClip:
    """``transformers.AutoModel`` as open_clip's ``HFTextEncoder`` calls it, minus ``add_pooling_layer`` for
    ModernBERT (which has no pooling layer to add; a request for one is refused, never ignored)."""

    def __init__(self, auto_model):
        self._auto_model = auto_model

    @staticmethod
    def _kwargs(model_type: str, kwargs: dict) -> dict:
        if model_type == "modernbert" and kwargs.pop("add_pooling_layer", False):
            raise ValueError("ModernBertModel has no pooling layer: use hf_pooler_type 'mean_pooler'")
        return kwargs

    def from_config(self, config, **kwargs):
        return self._auto_model.from_config(config, **self._kwargs(config.model_type, kwargs))

    def from_pretrained(self, name_or_path, **kwargs):
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(name_or_path).model_type
        return self._auto_model.from_pretrained(name_or_path, **self._kwargs(model_type, kwargs))
