"""What open_clip 3.3 lacks to run a ModernBERT text tower, in two places of its ``HFTextEncoder``:

- it reads the text width and its default pooler from ``open_clip.hf_configs.arch_dict[model_type]``,
  which knows roberta, xlm-roberta, mt5, bert and m2m_100 only (``KeyError: 'modernbert'``);
- it builds every encoder with ``AutoModel.from_config(config, add_pooling_layer=...)``, a BERT argument
  ``ModernBertModel`` does not take (``TypeError: ... unexpected keyword argument 'add_pooling_layer'``).

``register_modernbert()`` adds the ``arch_dict`` entry and gives ``open_clip.hf_model`` an ``AutoModel``
that drops ``add_pooling_layer`` for ModernBERT configs only (mean pooling never uses HF's pooler); it is
idempotent and changes nothing for other models or outside open_clip.
``bmc_fast.load_model`` and ``bmc_fast.export`` call it, and so must code that loads an export with
open_clip directly::

    import bmc_fast.checkpoint.open_clip_compat; bmc_fast.checkpoint.open_clip_compat.register_modernbert()
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:OUT_DIR")
"""
from __future__ import annotations

import logging

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


def register_modernbert() -> None:
    """Teach open_clip's ``HFTextEncoder`` the ``modernbert`` model type (idempotent)."""
    from open_clip import hf_configs, hf_model

    if "modernbert" not in hf_configs.arch_dict:
        hf_configs.arch_dict["modernbert"] = MODERNBERT
    if not isinstance(hf_model.AutoModel, _AutoModelForOpenClip):
        hf_model.AutoModel = _AutoModelForOpenClip(hf_model.AutoModel)
        _logger.info("open_clip: ModernBERT text towers enabled (arch_dict entry; add_pooling_layer dropped)")


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
