import json

import pytest

from bmc_fast.errors import ConfigError
from bmc_fast.model.config import ModelConfig, load_model_config


def test_tiny_preset_loads_typed():
    cfg = load_model_config("tiny")
    assert isinstance(cfg, ModelConfig)
    assert cfg.vision.image_size % cfg.vision.patch_size == 0
    assert cfg.text.vocab_size is None  # filled from the tokenizer


def test_overrides_merge_nested_and_replace_top_level():
    cfg = load_model_config("tiny", context_length=77, text={"num_hidden_layers": 2})
    assert cfg.context_length == 77
    assert cfg.text.num_hidden_layers == 2
    assert cfg.text.hidden_size == load_model_config("tiny").text.hidden_size


def test_unknown_field_is_an_error_naming_it(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"embed_dim": 8, "vision": {"widht": 8}}))
    with pytest.raises(ConfigError, match=r"bad.json.vision: unknown field\(s\) \['widht'\]"):
        load_model_config(str(path))


def test_wrong_type_is_an_error_naming_the_field(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"context_length": "512"}))
    with pytest.raises(ConfigError, match=r"context_length: expected int, got '512'"):
        load_model_config(str(path))


def test_context_longer_than_text_positions_is_rejected():
    with pytest.raises(ConfigError, match="context_length 1024 > text.max_position_embeddings 512"):
        load_model_config("tiny", context_length=1024)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"--preset 'nope'.*'tiny'"):
        load_model_config("nope")


def test_inconsistent_vision_shape_is_rejected():
    with pytest.raises(ConfigError, match="vision.image_size 65 is not a multiple of vision.patch_size 16"):
        load_model_config("tiny", vision={"image_size": 65})


def test_with_tokenizer_fills_vocab_and_special_ids(small_data):
    tokenizer = small_data["tokenizer"]
    cfg = load_model_config("tiny").with_tokenizer(tokenizer)
    assert cfg.text.vocab_size == len(tokenizer)
    assert (cfg.text.pad_token_id, cfg.text.cls_token_id, cfg.text.sep_token_id) == (
        tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id)
    small_vocab = load_model_config("tiny", text={"vocab_size": 10})
    with pytest.raises(ConfigError, match=f"tokenizer has {len(tokenizer)} ids but text.vocab_size is 10"):
        small_vocab.with_tokenizer(tokenizer)


def test_special_token_ids_outside_the_vocabulary_are_named():
    """Unset ids are ModernBERT's (50283 ...), which a small vocabulary cannot hold: torch's own error would be an
    assertion deep inside nn.Embedding."""
    unresolved = load_model_config("tiny", text={"vocab_size": 1024})  # ids may still come from a tokenizer
    with pytest.raises(ConfigError, match=r"text.pad_token_id 50283 \(unset: ModernBERT default 50283\) is not "
                                          r"below text.vocab_size 1024"):
        unresolved.text.to_hf_kwargs()  # what building the model asks for
    with pytest.raises(ConfigError, match="text.sep_token_id 1024 is not below"):
        load_model_config("tiny", text={"vocab_size": 1024, "pad_token_id": 0, "cls_token_id": 1, "sep_token_id": 1024})
    ids = {"pad_token_id": 0, "cls_token_id": 1, "sep_token_id": 2}
    assert load_model_config("tiny", text={"vocab_size": 1024, **ids}).text.special_token_ids() == ids
