"""Transformer Engine layers in both towers: ``te_precision = "bf16" | "fp8"`` (CUDA only; NOT VERIFIED ON GPU).

Written against Transformer Engine's documented PyTorch API (checked against v2.18 source): the
modules ``te.Linear``, ``te.LayerNormLinear``, ``te.LayerNormMLP`` (parameters ``weight``/``bias``,
``layer_norm_weight``/``layer_norm_bias``, ``fc1_*``/``fc2_*``, all in nn.Linear's (out, in) layout;
for gated activations fc1's first half is activated and its second half is the linear factor, as
ModernBERT's ``Wi`` is), ``te.autocast(enabled, recipe)`` (``te.fp8_autocast(enabled, fp8_recipe)``
before TE 2.9) and the recipes ``DelayedScaling`` (Hopper) and ``MXFP8BlockScaling`` (Blackwell).

What is swapped, weights copied:

- image block: ``ln_1`` + ``attn.in_proj`` → ``LayerNormLinear``; ``attn.out_proj`` → ``Linear``;
  ``ln_2`` + ``mlp`` → ``LayerNormMLP`` (``gelu`` or ``qgelu``); the attention core stays ours.
- ModernBERT layer: ``attn_norm`` + ``attn.Wqkv`` → ``LayerNormLinear`` (layer 0 has no norm:
  ``Linear``); ``attn.Wo`` → ``Linear``; ``mlp_norm`` + ``mlp`` → ``LayerNormMLP`` (``geglu``). The
  bias-free norms get a zero, frozen ``layer_norm_bias``.

Numerics: TE's ``gelu`` is the tanh approximation; the exact-GELU towers (ViT ``act="gelu"``,
ModernBERT ``hidden_activation="gelu"``) therefore change by up to ~5e-4 per activation;
``quick_gelu`` and ``gelu_pytorch_tanh`` map exactly. FP8 GEMMs need the rows of every input to be a
multiple of 16 (32 for MXFP8): the packed text sequence is padded with a pad-token segment to that
multiple (excluded from pooling), and the image batch must make batch × tokens a multiple of it.
"""
from __future__ import annotations

import logging
from types import ModuleType

import torch
from torch import nn

from bmc_fast.model_config import TE_PRECISIONS

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


# --------------------------------------------------------------------------------------------------------
# Weight mapping: torch modules <-> TE parameter names (pure functions, testable without TE).
# --------------------------------------------------------------------------------------------------------
def layernorm_linear_state(norm: nn.LayerNorm | None, linear: nn.Linear) -> dict[str, torch.Tensor]:
    """State of a TE ``LayerNormLinear`` (or ``Linear`` when ``norm`` is None) equal to linear(norm(x))."""
    state = {"weight": linear.weight.detach()}
    if linear.bias is not None:
        state["bias"] = linear.bias.detach()
    if norm is not None:
        state["layer_norm_weight"] = norm.weight.detach()
        state["layer_norm_bias"] = (norm.bias.detach() if norm.bias is not None
                                    else torch.zeros_like(norm.weight.detach()))
    return state


def layernorm_mlp_state(norm: nn.LayerNorm, fc1: nn.Linear, fc2: nn.Linear) -> dict[str, torch.Tensor]:
    """State of a TE ``LayerNormMLP`` equal to fc2(act(fc1(norm(x))))."""
    state = {"layer_norm_weight": norm.weight.detach(),
             "layer_norm_bias": norm.bias.detach() if norm.bias is not None else torch.zeros_like(norm.weight),
             "fc1_weight": fc1.weight.detach(), "fc2_weight": fc2.weight.detach()}
    if fc1.bias is not None:
        state["fc1_bias"] = fc1.bias.detach()
    if fc2.bias is not None:
        state["fc2_bias"] = fc2.bias.detach()
    return state


def torch_state_from_layernorm_mlp(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``layernorm_mlp_state``, in ``{norm,fc1,fc2}.{weight,bias}`` names."""
    out = {"norm.weight": state["layer_norm_weight"], "norm.bias": state["layer_norm_bias"],
           "fc1.weight": state["fc1_weight"], "fc2.weight": state["fc2_weight"]}
    out.update({f"{k[:3]}.bias": v for k, v in state.items() if k in ("fc1_bias", "fc2_bias")})
    return out


# A swapped model's state-dict names (suffixes inside one block / layer) -> the torch model's. ``None``:
# a tensor the torch model has no place for (the zero bias of ModernBERT's bias-free norms).
_VISION_BLOCK_NAMES = {
    "ln_qkv.layer_norm_weight": "ln_1.weight", "ln_qkv.layer_norm_bias": "ln_1.bias",
    "ln_qkv.weight": "attn.in_proj_weight", "ln_qkv.bias": "attn.in_proj_bias",
    "out_proj.weight": "attn.out_proj.weight", "out_proj.bias": "attn.out_proj.bias",
    "ln_mlp.layer_norm_weight": "ln_2.weight", "ln_mlp.layer_norm_bias": "ln_2.bias",
    "ln_mlp.fc1_weight": "mlp.c_fc.weight", "ln_mlp.fc1_bias": "mlp.c_fc.bias",
    "ln_mlp.fc2_weight": "mlp.c_proj.weight", "ln_mlp.fc2_bias": "mlp.c_proj.bias",
}
_TEXT_LAYER_NAMES = {
    "attn.Wqkv.layer_norm_weight": "attn_norm.weight", "attn.Wqkv.layer_norm_bias": None,
    "attn.Wqkv.weight": "attn.Wqkv.weight", "attn.Wqkv.bias": "attn.Wqkv.bias",
    "attn.Wo.weight": "attn.Wo.weight", "attn.Wo.bias": "attn.Wo.bias",
    "mlp.ln_mlp.layer_norm_weight": "mlp_norm.weight", "mlp.ln_mlp.layer_norm_bias": None,
    "mlp.ln_mlp.fc1_weight": "mlp.Wi.weight", "mlp.ln_mlp.fc1_bias": "mlp.Wi.bias",
    "mlp.ln_mlp.fc2_weight": "mlp.Wo.weight", "mlp.ln_mlp.fc2_bias": "mlp.Wo.bias",
}
_BLOCK_PREFIXES = (("visual.transformer.resblocks.", _VISION_BLOCK_NAMES),
                   ("text.transformer.layers.", _TEXT_LAYER_NAMES))


def torch_state_from_te(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A swapped model's state dict in the torch model's names (TE's FP8 ``_extra_state`` dropped), so a
    run trained with ``te_precision`` loads into a plain ``BMCLongCLIP`` (evaluation on any device)."""
    out = {}
    for name, value in state.items():
        if name.endswith("_extra_state"):
            continue
        for prefix, names in _BLOCK_PREFIXES:
            index, _, suffix = name[len(prefix):].partition(".") if name.startswith(prefix) else ("", "", "")
            if suffix in names:
                if names[suffix] is not None:
                    out[f"{prefix}{index}.{names[suffix]}"] = value
                break
        else:
            out[name] = value
    return out


def _load(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    own = module.state_dict()
    with torch.no_grad():
        for name, value in state.items():
            if name not in own:
                raise KeyError(f"{type(module).__name__} has no parameter {name!r}; it has {sorted(own)}")
            getattr(module, name).copy_(value)
    return module


# --------------------------------------------------------------------------------------------------------
# Swapped modules.
# --------------------------------------------------------------------------------------------------------
class TEResidualAttentionBlock(nn.Module):
    """The ViT block on TE layers: x + out(attn(LN·qkv(x))), then x + LN·MLP(x)."""

    def __init__(self, block: nn.Module, te: ModuleType, params_dtype: torch.dtype, device):
        super().__init__()
        attn, width = block.attn, block.ln_1.normalized_shape[0]
        self.heads, self.backend = attn.heads, attn.backend
        self.ln_qkv = _load(te.LayerNormLinear(width, 3 * width, eps=block.ln_1.eps, bias=True,
                                               params_dtype=params_dtype, device=device),
                            {"layer_norm_weight": block.ln_1.weight.detach(),
                             "layer_norm_bias": block.ln_1.bias.detach(),
                             "weight": attn.in_proj_weight.detach(), "bias": attn.in_proj_bias.detach()})
        self.out_proj = _load(te.Linear(width, width, bias=True, params_dtype=params_dtype, device=device),
                              layernorm_linear_state(None, attn.out_proj))
        activation = "qgelu" if type(block.mlp.gelu).__name__ == "QuickGELU" else "gelu"
        self.ln_mlp = _load(te.LayerNormMLP(width, block.mlp.c_fc.out_features, eps=block.ln_2.eps, bias=True,
                                            activation=activation, params_dtype=params_dtype, device=device),
                            layernorm_mlp_state(block.ln_2, block.mlp.c_fc, block.mlp.c_proj))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from bmc_fast.vision_tower import attention_core

        x = x + self.out_proj(attention_core(self.ln_qkv(x), self.heads, self.backend))
        return x + self.ln_mlp(x)


class TEModernBertMLP(nn.Module):
    """ModernBERT's norm + GeGLU MLP as one TE ``LayerNormMLP`` (the layer's ``mlp_norm`` becomes Identity)."""

    def __init__(self, norm: nn.LayerNorm, mlp: nn.Module, activation: str, te: ModuleType,
                 params_dtype: torch.dtype, device):
        super().__init__()
        hidden, inner = mlp.Wi.in_features, mlp.Wo.in_features
        self.ln_mlp = _load(te.LayerNormMLP(hidden, inner, eps=norm.eps, bias=mlp.Wi.bias is not None,
                                            activation=activation, params_dtype=params_dtype, device=device),
                            layernorm_mlp_state(norm, mlp.Wi, mlp.Wo))
        if norm.bias is None:  # ModernBERT's norms have no bias: keep TE's at zero
            self.ln_mlp.layer_norm_bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_mlp(x)


def _swap_modernbert_layer(layer: nn.Module, activation: str, te: ModuleType, params_dtype, device) -> None:
    attn, norm = layer.attn, layer.attn_norm
    width = attn.Wqkv.in_features
    has_norm = isinstance(norm, nn.LayerNorm)
    if has_norm:
        qkv = te.LayerNormLinear(width, attn.Wqkv.out_features, eps=norm.eps, bias=attn.Wqkv.bias is not None,
                                 params_dtype=params_dtype, device=device)
        _load(qkv, layernorm_linear_state(norm, attn.Wqkv))
        if norm.bias is None:
            qkv.layer_norm_bias.requires_grad_(False)
        layer.attn_norm = nn.Identity()
    else:
        qkv = _load(te.Linear(width, attn.Wqkv.out_features, bias=attn.Wqkv.bias is not None,
                              params_dtype=params_dtype, device=device), layernorm_linear_state(None, attn.Wqkv))
    attn.Wqkv = qkv
    attn.Wo = _load(te.Linear(width, attn.Wo.out_features, bias=attn.Wo.bias is not None, params_dtype=params_dtype,
                              device=device), layernorm_linear_state(None, attn.Wo))
    layer.mlp = TEModernBertMLP(layer.mlp_norm, layer.mlp, activation, te, params_dtype, device)
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


def swap_to_transformer_engine(model: nn.Module, precision: str, te: ModuleType | None = None,
                               te_recipe: ModuleType | None = None, device=None) -> None:
    """Replace both towers' linear/norm blocks of a ``BMCLongCLIP`` by TE modules, in place.

    ``te``/``te_recipe`` default to ``transformer_engine.pytorch`` / ``transformer_engine.common.recipe``.
    """
    swapped = tuple(p for p in TE_PRECISIONS if p != "none")
    if precision not in swapped:
        raise ValueError(f"te_precision must be one of {swapped} here, got {precision!r}")
    if te is None:
        te = import_te(precision)
        from transformer_engine.common import recipe as te_recipe
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    params_dtype = torch.bfloat16 if device != "cpu" else torch.float32
    blocks = model.visual.transformer.resblocks
    for i, block in enumerate(blocks):
        blocks[i] = TEResidualAttentionBlock(block, te, params_dtype, device)
    hidden_act = model.text.transformer.config.hidden_activation
    if hidden_act not in _TEXT_ACTIVATIONS:
        raise ValueError(f"text hidden_activation {hidden_act!r} has no Transformer Engine equivalent")
    for layer in model.text.transformer.layers:
        _swap_modernbert_layer(layer, _TEXT_ACTIVATIONS[hidden_act], te, params_dtype, device)
    if precision == "fp8":
        mxfp8 = bool(getattr(te, "is_mxfp8_available", lambda: False)())
        recipe = fp8_recipe(te_recipe, mxfp8)
        model.autocast = lambda: autocast_context(te, recipe)
        model.text.pad_tokens_to = 32 if mxfp8 else 16
        model.fp8_row_multiple = 32 if mxfp8 else 16
    _logger.info("Transformer Engine layers in both towers (%s%s)", precision,
                 f", recipe {type(recipe).__name__}" if precision == "fp8" else "")

