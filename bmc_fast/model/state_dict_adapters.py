"""State-dict adapters: one per outside format, each a pair of pure functions ``to_<format>`` / ``from_<format>``
(torchtitan's ``StateDictAdapter``: ``to_hf`` / ``from_hf``).

bmc-fast's own names are the full model's (``BMCLongCLIP.state_dict()`` on torch layers):

- ``visual.*``: open_clip's ``VisionTransformer`` names (``conv1``, ``class_embedding``, ``transformer.resblocks.{i}
  .{ln_1,attn.in_proj_*,attn.out_proj,ln_2,mlp.c_fc,mlp.c_proj}``, ``ln_post``, ``proj``);
- ``text.transformer.*``: a Hugging Face ``ModernBertModel``; ``text.proj.{0,2}.weight``: the MLP projection;
- ``logit_scale``, and ``logit_bias`` where the model has one (the sigmoid loss's): shape (1,).

Formats:

- ``OpenClip``: open_clip's ``CLIP`` with an ``HFTextEncoder`` text tower, what ``bmc_fast.checkpoint.export``
  writes (the same names; ``logit_scale`` and ``logit_bias`` are () there); an image tower alone (``conv1.weight``
  at the top) or a whole open_clip CLIP (DFN-2B ships one) for the image weights.
- ``Timm``: timm's ``vit_large_patch14_clip_224`` layout (the inverse of timm's ``_convert_openai_clip``).
- ``ModernBert``: ``ModernBertModel`` names, or ``ModernBertForMaskedLM``'s (``model.``; its MLM head dropped).
- ``TransformerEngine``: the model with ``te_precision`` set (``bmc_fast.model.te_layers``): each block's norm and
  first linear fused into ``LayerNormLinear``, norm + MLP into ``LayerNormMLP``; ModernBERT's bias-free norms get
  a zero ``layer_norm_bias``; TE's FP8 ``_extra_state`` is dropped on the way back.

Every function takes and returns ``dict[str, Tensor]`` without copying tensors (reshapes are views), so a
round trip (``from_x(to_x(state))``) gives the same tensors; ``tests/test_state_dict_adapters.py`` checks it
and each format against its library.
"""
from __future__ import annotations

import torch

State = dict[str, torch.Tensor]


def _with_prefix(state: State, prefix: str) -> State:
    return {prefix + k: v for k, v in state.items()}


def _under(state: State, prefix: str) -> State:
    """The entries of ``state`` under ``prefix``, with it removed."""
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------------------------------------
# open_clip
# --------------------------------------------------------------------------------------------------------
class OpenClip:
    """open_clip ``CLIP`` (ViT + ``HFTextEncoder`` over ModernBERT) <-> bmc-fast: the same names, the logit scale
    and bias () there and (1,) here."""

    SCALARS = ("logit_scale", "logit_bias")

    @staticmethod
    def to_open_clip(state: State) -> State:
        return {k: v.reshape(()) if k in OpenClip.SCALARS else v for k, v in state.items()}

    @staticmethod
    def from_open_clip(state: State) -> State:
        """A whole open_clip CLIP, or an image tower alone (``conv1.weight`` at the top: prefixed ``visual.``)."""
        if "conv1.weight" in state and not any(k.startswith("visual.") for k in state):
            return _with_prefix(state, "visual.")
        return {k: v.reshape(1) if k in OpenClip.SCALARS else v for k, v in state.items()}


# --------------------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------------------
# timm name -> bmc-fast (open_clip) name inside the image tower, applied in order to each key.
_TIMM_TO_OURS = (
    ("patch_embed.proj.", "conv1."),
    ("blocks.", "transformer.resblocks."),
    ("norm_pre.", "ln_pre."),
    (".norm1.", ".ln_1."),
    (".norm2.", ".ln_2."),
    (".attn.qkv.", ".attn.in_proj_"),
    (".attn.proj.", ".attn.out_proj."),
    (".mlp.fc1.", ".mlp.c_fc."),
    (".mlp.fc2.", ".mlp.c_proj."),
)


class Timm:
    """timm ``VisionTransformer`` (CLIP layout: ``class_token``, ``pre_norm``, ``head`` = the projection) <->
    bmc-fast's ``visual.*``. timm's head has a bias, a CLIP projection none: ``to_timm`` writes zeros and
    ``from_timm`` returns a non-zero one under ``head.bias`` for the caller to refuse."""

    @staticmethod
    def to_timm(state: State) -> State:
        out = {}
        for key, value in _under(state, "visual.").items():
            if key == "class_embedding":
                out["cls_token"] = value.reshape(1, 1, -1)
            elif key == "positional_embedding":
                out["pos_embed"] = value.reshape(1, *value.shape)
            elif key == "proj":
                out["head.weight"] = value.T
                out["head.bias"] = value.new_zeros(value.shape[1])
            elif key.startswith("ln_post."):
                out["norm." + key.removeprefix("ln_post.")] = value
            else:
                for theirs, ours in reversed(_TIMM_TO_OURS):
                    key = key.replace(ours, theirs)
                out[key] = value
        return out

    @staticmethod
    def from_timm(state: State) -> State:
        out = {}
        for key, value in state.items():
            if key == "cls_token":
                out["class_embedding"] = value.reshape(-1)
            elif key == "pos_embed":
                out["positional_embedding"] = value.reshape(value.shape[-2], value.shape[-1])
            elif key == "head.weight":
                out["proj"] = value.T
            elif key == "head.bias":
                if bool(value.abs().max() > 0):
                    out["head.bias"] = value  # not ours: the loader names it
            elif key.startswith("norm."):
                out["ln_post." + key.removeprefix("norm.")] = value
            else:
                for theirs, ours in _TIMM_TO_OURS:
                    key = key.replace(theirs, ours)
                out[key] = value
        return _with_prefix(out, "visual.")


# --------------------------------------------------------------------------------------------------------
# Hugging Face ModernBERT
# --------------------------------------------------------------------------------------------------------
class ModernBert:
    """``ModernBertModel`` (or ``ModernBertForMaskedLM``) <-> bmc-fast's ``text.transformer.*``."""

    MLM_HEAD = ("head.", "decoder.")  # ModernBertForMaskedLM's head: the encoder has no use for it

    @staticmethod
    def to_hf(state: State) -> State:
        return _under(state, "text.transformer.")

    @staticmethod
    def from_hf(state: State) -> State:
        if any(k.startswith("model.") for k in state):  # ModernBertForMaskedLM: the encoder is `model`
            state = {k.removeprefix("model."): v for k, v in state.items() if not k.startswith(ModernBert.MLM_HEAD)}
        return _with_prefix(state, "text.transformer.")


# --------------------------------------------------------------------------------------------------------
# Transformer Engine
# --------------------------------------------------------------------------------------------------------
# Inside one image block / one text layer: TE model name -> torch model name. None: a tensor the torch model has
# no place for (the zero bias TE's LayerNorm needs under ModernBERT's bias-free norms).
_VISION_BLOCK = {
    "ln_qkv.layer_norm_weight": "ln_1.weight", "ln_qkv.layer_norm_bias": "ln_1.bias",
    "ln_qkv.weight": "attn.in_proj_weight", "ln_qkv.bias": "attn.in_proj_bias",
    "out_proj.weight": "attn.out_proj.weight", "out_proj.bias": "attn.out_proj.bias",
    "ln_mlp.layer_norm_weight": "ln_2.weight", "ln_mlp.layer_norm_bias": "ln_2.bias",
    "ln_mlp.fc1_weight": "mlp.c_fc.weight", "ln_mlp.fc1_bias": "mlp.c_fc.bias",
    "ln_mlp.fc2_weight": "mlp.c_proj.weight", "ln_mlp.fc2_bias": "mlp.c_proj.bias",
}
_TEXT_LAYER = {
    "attn.Wqkv.layer_norm_weight": "attn_norm.weight", "attn.Wqkv.layer_norm_bias": None,
    "attn.Wqkv.weight": "attn.Wqkv.weight", "attn.Wqkv.bias": "attn.Wqkv.bias",
    "attn.Wo.weight": "attn.Wo.weight", "attn.Wo.bias": "attn.Wo.bias",
    "mlp.ln_mlp.layer_norm_weight": "mlp_norm.weight", "mlp.ln_mlp.layer_norm_bias": None,
    "mlp.ln_mlp.fc1_weight": "mlp.Wi.weight", "mlp.ln_mlp.fc1_bias": "mlp.Wi.bias",
    "mlp.ln_mlp.fc2_weight": "mlp.Wo.weight", "mlp.ln_mlp.fc2_bias": "mlp.Wo.bias",
}
_BLOCKS = (("visual.transformer.resblocks.", _VISION_BLOCK), ("text.transformer.layers.", _TEXT_LAYER))


def _in_block(name: str) -> tuple[str, str, dict] | None:
    """(block prefix + index, the name inside the block, that block's TE -> torch names), or None outside blocks."""
    for prefix, names in _BLOCKS:
        if name.startswith(prefix):
            index, _, inner = name[len(prefix):].partition(".")
            return f"{prefix}{index}.", inner, names
    return None


class TransformerEngine:
    """The model on Transformer Engine layers <-> on torch layers (a TE run evaluates on any device)."""

    @staticmethod
    def to_te(state: State) -> State:
        out = {}
        for name, value in state.items():
            block = _in_block(name)
            theirs = next((te for te, ours in block[2].items() if ours == block[1]), None) if block else None
            if theirs is None:
                out[name] = value
                continue
            out[block[0] + theirs] = value
            bias = theirs.replace("layer_norm_weight", "layer_norm_bias")
            if theirs.endswith("layer_norm_weight") and block[2][bias] is None:  # a bias-free norm: TE's bias is 0
                out[block[0] + bias] = torch.zeros_like(value)
        return out

    @staticmethod
    def from_te(state: State) -> State:
        out = {}
        for name, value in state.items():
            if name.endswith("_extra_state"):
                continue
            block = _in_block(name)
            if block is None or block[1] not in block[2]:
                out[name] = value
            elif block[2][block[1]] is not None:
                out[block[0] + block[2][block[1]]] = value
        return out
