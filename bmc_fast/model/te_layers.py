"""Transformer Engine layers in both towers: ``te_precision = "bf16" | "fp8"`` (CUDA only; NOT VERIFIED ON GPU).

Written against Transformer Engine's documented PyTorch API (checked against v2.18 source): the
modules ``te.Linear``, ``te.LayerNormLinear``, ``te.LayerNormMLP`` (parameters ``weight``/``bias``,
``layer_norm_weight``/``layer_norm_bias``, ``fc1_*``/``fc2_*``, all in nn.Linear's (out, in) layout;
for gated activations fc1's first half is activated and its second half is the linear factor, as
ModernBERT's ``Wi`` is), ``te.autocast(enabled, recipe)`` (``te.fp8_autocast(enabled, fp8_recipe)``
before TE 2.9) and the recipes ``DelayedScaling`` (Hopper) and ``MXFP8BlockScaling`` (Blackwell).

What is built (``BMCLongCLIP`` with ``te_precision`` set; weights load afterwards, in TE names through
``bmc_fast.model.state_dict_adapters.TransformerEngine``):

- image block (``TEResidualAttentionBlock``, which the ViT takes in place of its torch block): ``ln_1`` +
  ``attn.in_proj`` → ``LayerNormLinear``; ``attn.out_proj`` → ``Linear``; ``ln_2`` + ``mlp`` → ``LayerNormMLP``
  (``gelu`` or ``qgelu``); the attention core stays ours.
- ModernBERT layer (``convert_modernbert``, on the freshly built HF model): ``attn_norm`` + ``attn.Wqkv`` →
  ``LayerNormLinear`` (layer 0 has no norm: ``Linear``); ``attn.Wo`` → ``Linear``; ``mlp_norm`` + ``mlp`` →
  ``LayerNormMLP`` (``geglu``). The bias-free norms get a zero, frozen ``layer_norm_bias``.

Numerics: TE's ``gelu`` is the tanh approximation; the exact-GELU towers (ViT ``act="gelu"``,
ModernBERT ``hidden_activation="gelu"``) therefore change by up to ~5e-4 per activation;
``quick_gelu`` and ``gelu_pytorch_tanh`` map exactly. FP8 GEMMs need the rows of every input to be a
multiple of 16 (32 for MXFP8): the packed text sequence is padded with a pad-token segment to that
multiple (excluded from pooling), and the image batch must make batch × tokens a multiple of it.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from bmc_fast.model.config import VisionConfig

_logger = logging.getLogger(__name__)

_INSTALL = ("te_precision={precision!r} needs NVIDIA Transformer Engine on a CUDA machine: "
            "pip install 'transformer-engine[pytorch]' (see bmc-fast's 'gpu' extra), or set te_precision='none'")
_TEXT_ACTIVATIONS = {"gelu": "geglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu", "silu": "swiglu",
                     "relu": "reglu"}


def import_te(precision: str) -> ModuleType:
    """``transformer_engine.pytorch``, or one ImportError saying what to install."""
    try:
        import transformer_engine.pytorch as te
    except ImportError as error:
        raise ImportError(_INSTALL.format(precision=precision)) from error
    return te


@dataclass(frozen=True)
class TELayers:
    """The Transformer Engine modules both towers are built with, and where their parameters live."""

    te: ModuleType  # transformer_engine.pytorch (or a stand-in with its API: tests/reference_te.py)
    recipe: ModuleType  # transformer_engine.common.recipe
    device: str  # TE's modules take device= and params_dtype= at construction
    params_dtype: torch.dtype

    @classmethod
    def load(cls, precision: str, device: str | None = None) -> TELayers:
        """Transformer Engine itself (one ImportError saying what to install when it is missing): bf16 parameters
        on CUDA, fp32 elsewhere."""
        te = import_te(precision)
        from transformer_engine.common import recipe

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(te, recipe, device, torch.bfloat16 if device != "cpu" else torch.float32)

    def new(self, name: str, *args, **kwargs) -> nn.Module:
        return getattr(self.te, name)(*args, params_dtype=self.params_dtype, device=self.device, **kwargs)


def _torch_linear_init(weight: torch.Tensor) -> None:
    """``nn.Linear``'s own weight initialisation, so a TE block starts drawn like the torch block it stands for."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


class TEResidualAttentionBlock(nn.Module):
    """The ViT block on TE layers: x + out(attn(LN·qkv(x))), then x + LN·MLP(x); the attention core stays ours.

    Same constructor as ``vision_tower.ResidualAttentionBlock`` plus ``layers``: the tower takes either class."""

    def __init__(self, cfg: VisionConfig, attn_backend: str = "auto", drop_path: float = 0.0, *, layers: TELayers):
        from bmc_fast.model.vision_tower import DropPath

        super().__init__()
        width, hidden = cfg.width, int(cfg.width * cfg.mlp_ratio)
        self.heads, self.backend = cfg.heads, attn_backend
        self.ln_qkv = layers.new("LayerNormLinear", width, 3 * width, eps=cfg.ln_eps, bias=True,
                                 init_method=nn.init.xavier_uniform_)  # as SelfAttention's in_proj_weight
        self.out_proj = layers.new("Linear", width, width, bias=True, init_method=_torch_linear_init)
        self.ln_mlp = layers.new("LayerNormMLP", width, hidden, eps=cfg.ln_eps, bias=True,
                                 activation="qgelu" if cfg.act == "quick_gelu" else "gelu",
                                 init_method=_torch_linear_init, output_layer_init_method=_torch_linear_init)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from bmc_fast.model.vision_tower import attention_core

        x = x + self.drop_path(self.out_proj(attention_core(self.ln_qkv(x), self.heads, self.backend)))
        return x + self.drop_path(self.ln_mlp(x))


class TEModernBertMLP(nn.Module):
    """ModernBERT's norm + GeGLU MLP as one TE ``LayerNormMLP`` (the layer's ``mlp_norm`` becomes Identity)."""

    def __init__(self, hidden: int, inner: int, eps: float, bias: bool, activation: str, layers: TELayers,
                 init_in, init_out):
        super().__init__()
        self.ln_mlp = layers.new("LayerNormMLP", hidden, inner, eps=eps, bias=bias, activation=activation,
                                 init_method=init_in, output_layer_init_method=init_out)
        _freeze_zero_bias(self.ln_mlp)  # ModernBERT's norms have no bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_mlp(x)


def _freeze_zero_bias(module: nn.Module) -> None:
    with torch.no_grad():
        module.layer_norm_bias.zero_()
    module.layer_norm_bias.requires_grad_(False)


def convert_modernbert(transformer: nn.Module, layers: TELayers) -> None:
    """Give a freshly built ``ModernBertModel`` TE layers, in place: HF builds its own modules, so its layers are
    converted before any weight loads (torchtitan's model converters); nothing is copied. Weights start drawn as
    ModernBERT's ``_init_weights`` draws them (truncated normal, the output layers' std scaled by 1/√(2·layers))."""
    config = transformer.config
    if config.hidden_activation not in _TEXT_ACTIVATIONS:
        raise ValueError(f"text hidden_activation {config.hidden_activation!r} has no Transformer Engine equivalent")
    activation = _TEXT_ACTIVATIONS[config.hidden_activation]
    std = config.initializer_range
    cutoff = config.initializer_cutoff_factor
    init_in = functools.partial(nn.init.trunc_normal_, std=std, a=-cutoff * std, b=cutoff * std)
    out_std = std / math.sqrt(2.0 * config.num_hidden_layers)
    init_out = functools.partial(nn.init.trunc_normal_, std=out_std, a=-cutoff * out_std, b=cutoff * out_std)
    for layer in transformer.layers:
        attn, norm = layer.attn, layer.attn_norm
        width, qkv_out, bias = attn.Wqkv.in_features, attn.Wqkv.out_features, attn.Wqkv.bias is not None
        if isinstance(norm, nn.LayerNorm):  # layer 0 has none
            attn.Wqkv = layers.new("LayerNormLinear", width, qkv_out, eps=norm.eps, bias=bias, init_method=init_in)
            _freeze_zero_bias(attn.Wqkv)
            layer.attn_norm = nn.Identity()
        else:
            attn.Wqkv = layers.new("Linear", width, qkv_out, bias=bias, init_method=init_in)
        attn.Wo = layers.new("Linear", width, attn.Wo.out_features, bias=attn.Wo.bias is not None,
                             init_method=init_out)
        mlp = layer.mlp
        layer.mlp = TEModernBertMLP(mlp.Wi.in_features, mlp.Wo.in_features, layer.mlp_norm.eps,
                                    mlp.Wi.bias is not None, activation, layers, init_in, init_out)
        layer.mlp_norm = nn.Identity()


def fp8_recipe(te_recipe: ModuleType, mxfp8: bool):
    """MXFP8 block scaling where the GPU supports it (Blackwell), else delayed scaling (Hopper)."""
    if mxfp8:
        return te_recipe.MXFP8BlockScaling()
    return te_recipe.DelayedScaling(fp8_format=te_recipe.Format.HYBRID, amax_history_len=16, amax_compute_algo="max")


def autocast_context(te: ModuleType, recipe):
    """A fresh FP8 autocast context: ``te.autocast`` (TE >= 2.9) or ``te.fp8_autocast`` before it."""
    if hasattr(te, "autocast"):
        return te.autocast(enabled=True, recipe=recipe)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe)


def use_fp8(model: nn.Module, layers: TELayers) -> None:
    """FP8 for a model built on TE layers: its forward runs under TE's autocast with the recipe the GPU supports,
    and the text tower pads its packed rows (the image batch must make its rows) to FP8's multiple."""
    mxfp8 = bool(getattr(layers.te, "is_mxfp8_available", lambda: False)())
    recipe = fp8_recipe(layers.recipe, mxfp8)
    model.autocast = lambda: autocast_context(layers.te, recipe)
    model.text.pad_tokens_to = 32 if mxfp8 else 16
    model.fp8_row_multiple = 32 if mxfp8 else 16
    _logger.info("Transformer Engine FP8 recipe %s", type(recipe).__name__)
