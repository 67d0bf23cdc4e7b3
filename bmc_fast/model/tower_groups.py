"""Each tower as its layers from input to output: what ``--lock-image`` / ``--lock-text`` freeze and what
``--layer-decay`` scales.

Lock groups (the last ``unlocked`` of them stay trainable, the rest are frozen):

- image tower, open_clip's ``VisionTransformer.lock`` groups: [conv1, class_embedding, positional_embedding,
  ln_pre], resblocks 0 … L−2 one group each, [resblock L−1, ln_post], proj. ``unlocked=1`` trains the projection
  alone.
- text tower (ModernBERT; open_clip's ``HFTextEncoder.lock`` matches "LayerNorm" in names, which no ModernBERT
  module has, and never locks its projection): embeddings, layers 0 … L−1 one group each, final_norm, proj.
  ``unlocked=1`` trains the projection alone, 2 adds the final norm, 3 the last layer.

Layer ids (EVA-CLIP's ``get_num_layer_for_vit``, per tower): the stem / embeddings 0, block i → i + 1, the head
(ln_post or final_norm, and proj) L + 1. ``--layer-decay d`` scales a layer's learning rate by d^(L + 1 − id).
"""
from __future__ import annotations

from torch import nn

from bmc_fast.errors import ConfigError


def image_lock_groups(visual: nn.Module) -> list[list[nn.Parameter]]:
    """The image tower's parameters in open_clip's lock groups, input first."""
    stem = [visual.conv1.weight, visual.class_embedding, visual.positional_embedding, *visual.ln_pre.parameters()]
    blocks = [list(block.parameters()) for block in visual.transformer.resblocks]
    return [stem, *blocks[:-1], blocks[-1] + list(visual.ln_post.parameters()), [visual.proj]]


def text_lock_groups(text: nn.Module) -> list[list[nn.Parameter]]:
    """The text tower's parameters in lock groups, input first: embeddings, each layer, final norm, projection."""
    bert = text.transformer
    return [list(bert.embeddings.parameters()), *(list(layer.parameters()) for layer in bert.layers),
            list(bert.final_norm.parameters()), list(text.proj.parameters())]


def lock(groups: list[list[nn.Parameter]], unlocked: int, flag: str) -> int:
    """Freeze every parameter of ``groups`` but those of the last ``unlocked`` groups; returns how many
    parameters stay trainable. ``flag`` names ``unlocked`` in the error for a count out of range."""
    if not 0 <= unlocked <= len(groups):
        raise ConfigError(f"{flag} {unlocked}: the tower has {len(groups)} lock groups; pass 0 to {len(groups)}")
    for i, group in enumerate(groups):
        for param in group:
            param.requires_grad_(i >= len(groups) - unlocked)
    return sum(p.numel() for group in groups[len(groups) - unlocked:] for p in group)


def layer_id(name: str, image_layers: int, text_layers: int) -> tuple[str, int, int]:
    """(tower, layer id, the tower's layer count L) of the model parameter ``name``; ids run 0 … L + 1 and the
    tower is ``image``, ``text`` or ``other`` (the logit scale and bias: id 0 of L = -1, never decayed)."""
    parts = name.split(".")
    if parts[0] == "visual":
        if parts[1] in ("conv1", "class_embedding", "positional_embedding", "ln_pre"):
            return "image", 0, image_layers
        if parts[1] == "transformer":  # transformer.resblocks.{i}
            return "image", int(parts[3]) + 1, image_layers
        return "image", image_layers + 1, image_layers  # ln_post, proj
    if parts[0] == "text":
        if parts[1] == "transformer" and parts[2] == "embeddings":
            return "text", 0, text_layers
        if parts[1] == "transformer" and parts[2] == "layers":
            return "text", int(parts[3]) + 1, text_layers
        return "text", text_layers + 1, text_layers  # final_norm, proj
    return "other", 0, -1
