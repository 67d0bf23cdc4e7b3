"""Model architecture configs: JSON presets loaded into typed, validated dataclasses.

Architectures are data (open_clip's ``model_configs/*.json``): a preset is a JSON file in
``bmc_fast/model/presets/``; behaviour never switches on a preset's name. Loading rejects unknown keys
and wrong types, naming the field and the file.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bmc_fast.cli import read_json_object
from bmc_fast.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"

# The legal values of the model's switches; the trainer's flags take their choices from here.
ATTN_BACKENDS = ("auto", "fa4", "torch_flash", "flash", "sdpa", "eager")  # both towers: bmc_fast.model.attn_backend
TE_PRECISIONS = ("none", "bf16", "fp8")  # Transformer Engine layers (CUDA only)
IMAGE_PROJECTIONS = ("pretrained", "linear")  # with image weights: keep their projection, or a fresh one


@dataclass
class VisionConfig:
    """Pre-norm CLIP ViT (open_clip ``VisionTransformer`` layout), class-token pooled."""

    image_size: int = 224  # square input resolution in pixels
    patch_size: int = 14  # square patch side; image_size must be a multiple
    width: int = 1024  # residual stream width
    layers: int = 24  # transformer blocks
    heads: int = 16  # attention heads; width must be a multiple
    mlp_ratio: float = 4.0  # MLP hidden = mlp_ratio * width
    act: str = "gelu"  # "gelu" or "quick_gelu" (OpenAI / DFN checkpoints)
    ln_eps: float = 1e-5  # LayerNorm epsilon
    grad_checkpointing: bool = False  # recompute each block's activations in the backward
    # stochastic depth (timm's drop_path_rate, the paper fork's timm_drop_path): the last block's rate, ramped
    # linspace(0, drop_path, layers) over the blocks as timm does; training only
    drop_path: float = 0.0

    def __post_init__(self) -> None:
        _check_positive(self, "image_size", "patch_size", "width", "layers", "heads", "mlp_ratio")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"vision.drop_path must be in [0, 1), got {self.drop_path}: 0.1 is the paper's")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision.image_size {self.image_size} is not a multiple of "
                              f"vision.patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ConfigError(f"vision.width {self.width} is not a multiple of vision.heads {self.heads}")
        if self.act not in ("gelu", "quick_gelu"):
            raise ConfigError(f"vision.act must be 'gelu' or 'quick_gelu', got {self.act!r}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    def drop_path_rates(self) -> list[float]:
        """Each block's drop-path rate: timm's ``calculate_drop_path_rates(drop_path, layers)``."""
        import torch

        return [x.item() for x in torch.linspace(0, self.drop_path, self.layers, device="cpu")]  # never on meta


# ModernBertConfig's defaults, which a text config without token ids gets (ModernBERT's tokenizer's ids).
MODERNBERT_DEFAULT_IDS = {"pad_token_id": 50283, "cls_token_id": 50281, "sep_token_id": 50282}


@dataclass
class TextConfig:
    """Hugging Face ``ModernBertModel`` hyper-parameters (names as in ``ModernBertConfig``)."""

    hidden_size: int = 768
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    intermediate_size: int = 1152  # GeGLU: Wi projects to 2 * intermediate_size
    local_attention: int = 128  # sliding-window width of local layers
    global_attn_every_n_layers: int = 3  # layer i is global when i % n == 0
    max_position_embeddings: int = 8192
    norm_eps: float = 1e-5
    hidden_activation: str = "gelu"  # activation of the GeGLU MLP (exact GELU, as HF's "gelu")
    grad_checkpointing: bool = False  # recompute each layer's activations in the backward
    # Token ids come from the tokenizer (None until resolved by `ModelConfig.with_tokenizer`).
    vocab_size: int | None = None
    pad_token_id: int | None = None
    cls_token_id: int | None = None
    sep_token_id: int | None = None

    def __post_init__(self) -> None:
        _check_positive(self, "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                        "local_attention", "global_attn_every_n_layers", "max_position_embeddings")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"text.hidden_size {self.hidden_size} is not a multiple of "
                              f"text.num_attention_heads {self.num_attention_heads}")
        self._check_special_token_ids(set_only=True)  # unset ones may still come from a tokenizer

    def _check_special_token_ids(self, set_only: bool) -> None:
        if self.vocab_size is None:
            return
        for name, token_id in self.special_token_ids().items():
            unset = getattr(self, name) is None
            if not 0 <= token_id < self.vocab_size and not (set_only and unset):
                value = f"{token_id} (unset: ModernBERT default {token_id})" if unset else str(token_id)
                raise ConfigError(f"text.{name} {value} is not below text.vocab_size {self.vocab_size}: set the "
                                  "special-token ids with the vocabulary, or resolve the config with its tokenizer "
                                  "(ModelConfig.with_tokenizer)")

    def special_token_ids(self) -> dict[str, int]:
        """[PAD], [CLS] and [SEP] ids, ModernBERT's defaults (``ModernBertConfig``) where unset."""
        return {name: default if getattr(self, name) is None else getattr(self, name)
                for name, default in MODERNBERT_DEFAULT_IDS.items()}

    def to_hf_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``transformers.ModernBertConfig``."""
        if self.vocab_size is None:
            raise ConfigError("text.vocab_size is unset: resolve the config with a tokenizer first "
                              "(ModelConfig.with_tokenizer)")
        self._check_special_token_ids(set_only=False)
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "grad_checkpointing"}
        ids = {k: kwargs.pop(k) for k in ("pad_token_id", "cls_token_id", "sep_token_id")}
        kwargs.update({k: v for k, v in ids.items() if v is not None})
        if ids["cls_token_id"] is not None:
            kwargs["bos_token_id"] = ids["cls_token_id"]
        if ids["sep_token_id"] is not None:
            kwargs["eos_token_id"] = ids["sep_token_id"]
        return kwargs


TEXT_CLEANS = ("none", "whitespace")  # bmc_fast.data.text_tokenizer.clean_caption


@dataclass
class ModelConfig:
    """BMC-LongCLIP: ViT image tower + ModernBERT text tower, mean-pooled, projected to embed_dim."""

    embed_dim: int = 768  # shared embedding width
    context_length: int = 512  # text tokens kept per caption, [CLS] and [SEP] included (77 / 154 / 512)
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    text_pooling: str = "mean"  # masked mean over real tokens (the paper's choice)
    # caption cleaning before tokenisation: "whitespace" as open_clip's HFTokenizer (ftfy, HTML entities, spaces;
    # the presets'), "none" (runs before it existed: a config without the field keeps its behaviour)
    text_clean: str = "none"
    init_logit_scale: float = math.log(1 / 0.07)  # learnable log temperature, CLIP init (SigLIP: log 10)
    # a learnable logit bias, open_clip's init_logit_bias: the sigmoid loss's (SigLIP init -10); None: no bias
    init_logit_bias: float | None = None
    max_logit_scale: float = math.log(100)  # clamp: exp(logit_scale) <= 100
    text_unpad: bool = True  # pack the batch's real tokens (no compute on padding); False: padded SDPA
    attn_backend: str = "auto"  # both towers: one of ATTN_BACKENDS (bmc_fast.model.attn_backend)
    te_precision: str = "none"  # Transformer Engine layers: "none", "bf16", "fp8" (CUDA only)
    image_proj: str = "pretrained"  # with image weights: keep their projection, or "linear" (fresh init)

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = _from_dict(VisionConfig, self.vision, "vision")
        if isinstance(self.text, dict):
            self.text = _from_dict(TextConfig, self.text, "text")
        _check_positive(self, "embed_dim", "context_length")
        if self.context_length < 3:
            raise ConfigError(f"context_length {self.context_length} leaves no room for text between "
                              "[CLS] and [SEP]; use 77, 154 or 512")
        if self.context_length > self.text.max_position_embeddings:
            raise ConfigError(f"context_length {self.context_length} > text.max_position_embeddings "
                              f"{self.text.max_position_embeddings}: lower --context-length")
        if self.text_pooling != "mean":
            raise ConfigError(f"text_pooling must be 'mean', got {self.text_pooling!r}")
        for name, allowed in (("attn_backend", ATTN_BACKENDS), ("te_precision", TE_PRECISIONS),
                              ("image_proj", IMAGE_PROJECTIONS), ("text_clean", TEXT_CLEANS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.init_logit_scale > self.max_logit_scale:
            raise ConfigError(f"init_logit_scale {self.init_logit_scale} > max_logit_scale {self.max_logit_scale}")

    def with_tokenizer(self, tokenizer) -> ModelConfig:
        """Fill the text tower's vocabulary and special-token ids from a Hugging Face tokenizer."""
        text = self.text
        vocab = len(tokenizer)
        if text.vocab_size is not None and vocab > text.vocab_size:
            raise ConfigError(f"the tokenizer has {vocab} ids but text.vocab_size is {text.vocab_size}: "
                              "use the tokenizer the text tower was trained with")
        ids = {}
        for name in ("pad", "cls", "sep"):
            token_id = getattr(tokenizer, f"{name}_token_id")
            if token_id is None:
                raise ConfigError(f"the tokenizer has no {name} token; the text tower needs [CLS], [SEP] and [PAD]")
            ids[f"{name}_token_id"] = token_id
        text = dataclasses.replace(text, vocab_size=text.vocab_size or vocab, **ids)
        return dataclasses.replace(self, text=text)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> ModelConfig:
        return _from_dict(cls, data, source)


def load_model_config(preset_or_json: str, **overrides: Any) -> ModelConfig:
    """Load a preset by name (``tiny``) or a JSON file path; ``overrides`` replace top-level fields.

    Nested dicts merge: ``text={"num_hidden_layers": 2}`` changes one text field.
    """
    path = Path(preset_or_json)
    if path.suffix != ".json":
        path = PRESET_DIR / f"{preset_or_json}.json"
    names = sorted(p.stem for p in PRESET_DIR.glob("*.json"))
    if not path.is_file():
        raise ConfigError(f"--preset {preset_or_json!r}: no such preset or JSON file; presets: {names}")
    where = f"--preset {preset_or_json!r}" + (f" ({str(path)!r})" if str(path) != preset_or_json else "")
    data = read_json_object(path, where, f"write a JSON object of ModelConfig fields, as the presets in "
                                         f"{str(PRESET_DIR)!r} are, or pass a preset: {names}")
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return ModelConfig.from_dict(data, source=str(path))


def _check_positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ConfigError(f"{type(obj).__name__}.{name} must be positive, got {value}")


def _from_dict(cls: type, data: dict[str, Any], source: str):
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types are errors naming the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            kwargs[key] = _from_dict(hint, value, f"{source}.{key}")
            continue
        kwargs[key] = _check_type(value, hint, f"{source}.{key}")
    return cls(**kwargs)


def _check_type(value: Any, hint: Any, where: str) -> Any:
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    allowed = typing.get_args(hint) if is_union else (hint,)
    for t in allowed:
        if t is type(None) and value is None:
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t in (str, bool) and isinstance(value, t):
            return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"{where}: expected {names}, got {value!r} ({type(value).__name__})")
