"""BMC-LongCLIP: a CLIP ViT image tower and a ModernBERT text tower trained contrastively."""
from __future__ import annotations

import contextlib
import logging
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bmc_fast.errors import ConfigError
from bmc_fast.model.config import ModelConfig, load_model_config
from bmc_fast.model.te_layers import TELayers, TEResidualAttentionBlock, use_fp8
from bmc_fast.model.text_tower import TextTower
from bmc_fast.model.vision_tower import ResidualAttentionBlock, VisionTransformer

_logger = logging.getLogger(__name__)


class BMCLongCLIP(nn.Module):
    """``forward(pixels, input_ids, attention_mask)`` -> (image (B, E), text (B, E), scale ()), and the logit bias
    () fourth where ``cfg.init_logit_bias`` is set (the sigmoid loss's; open_clip returns the same tuple).

    Features come out L2-normalised; ``scale`` is ``exp(logit_scale)`` clamped to
    ``exp(max_logit_scale)`` (the clamp is in the forward, so it holds under every ZeRO stage).

    ``lock_image`` / ``lock_text`` freeze a tower as open_clip's ``lock_image_tower`` / ``lock_text_tower`` do
    (``bmc_fast.model.tower_groups``); a tower with nothing left to train runs as in evaluation (no graph, no
    drop-path), whatever ``train()`` says.

    The constructor builds the layers ``cfg`` names and reads no files: torch layers, or Transformer Engine ones
    where ``cfg.te_precision`` is set (``te_layers``: the TE modules to build with, by default TE itself). Weights
    load afterwards: ``create_model`` (tower checkpoints), ``bmc_fast.load_model`` (a trained model);
    ``text_weights_follow``: the text transformer's will, so its init draws nothing from the global RNG
    (``TextTower``).
    """

    def __init__(self, cfg: ModelConfig, te_layers: TELayers | None = None, text_weights_follow: bool = False):
        super().__init__()
        self.cfg = cfg
        if cfg.te_precision == "none":
            te_layers = None
        elif te_layers is None:
            te_layers = TELayers.load(cfg.te_precision)
        block = ResidualAttentionBlock if te_layers is None else partial(TEResidualAttentionBlock, layers=te_layers)
        self.visual = VisionTransformer(cfg.vision, cfg.embed_dim, cfg.attn_backend, block=block)
        self.text = TextTower(cfg.text, cfg.embed_dim, unpad=cfg.text_unpad, attn_backend=cfg.attn_backend,
                              te_layers=te_layers, weights_follow=text_weights_follow)
        # Shape (1,), not open_clip's (): DeepSpeed's parameter broadcast cannot view a 0-d tensor as bytes.
        self.logit_scale = nn.Parameter(torch.full((1,), float(cfg.init_logit_scale)))
        if cfg.init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.full((1,), float(cfg.init_logit_bias)))
        self.frozen = {"image": False, "text": False}  # a tower without trainable parameters (lock_*)
        self.autocast = contextlib.nullcontext  # FP8: Transformer Engine's autocast (te_layers.use_fp8)
        self.fp8_row_multiple = 1
        if te_layers is not None:
            if cfg.te_precision == "fp8":
                use_fp8(self, te_layers)
            _logger.info("Transformer Engine layers in both towers (%s)", cfg.te_precision)

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        rows = pixels.shape[0] * (self.cfg.vision.grid_size ** 2 + 1)
        if rows % self.fp8_row_multiple:
            raise ValueError(f"FP8 needs batch × tokens ({pixels.shape[0]} × {self.cfg.vision.grid_size ** 2 + 1}) to "
                             f"be a multiple of {self.fp8_row_multiple}: use a batch that is a multiple of "
                             f"{self.fp8_row_multiple}")
        with self.autocast(), _no_grad_if(self.frozen["image"]):
            features = self.visual(pixels)  # (B, E)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = False,
                    project: bool = True) -> torch.Tensor:
        _check_text_inputs(input_ids, attention_mask, self.cfg)
        with self.autocast(), _no_grad_if(self.frozen["text"]):
            features = self.text(input_ids, attention_mask, project=project)  # (B, E) or (B, H) unprojected
        return F.normalize(features, dim=-1) if normalize else features

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=self.cfg.max_logit_scale).exp().squeeze(0)  # ()

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        image = self.encode_image(pixels, normalize=True)
        text = self.encode_text(input_ids, attention_mask, normalize=True)
        if self.cfg.init_logit_bias is None:
            return image, text, self.scale()
        return image, text, self.scale(), self.logit_bias.squeeze(0)

    def lock_image(self, unlocked_groups: int = 0, flag: str = "unlocked_groups") -> None:
        """Freeze the image tower but its last ``unlocked_groups`` lock groups (open_clip's ``lock_image_tower``,
        whose groups freeze the projection too: one unlocked group is the projection alone)."""
        from bmc_fast.model.tower_groups import image_lock_groups, lock

        trainable = lock(image_lock_groups(self.visual), unlocked_groups, flag)
        self._set_frozen("image", self.visual, trainable == 0)

    def lock_text(self, unlocked_layers: int = 0, flag: str = "unlocked_layers") -> None:
        """Freeze the text tower but its last ``unlocked_layers`` lock groups: projection, final norm, layers from
        the top (``bmc_fast.model.tower_groups``)."""
        from bmc_fast.model.tower_groups import lock, text_lock_groups

        trainable = lock(text_lock_groups(self.text), unlocked_layers, flag)
        self._set_frozen("text", self.text, trainable == 0)

    def _set_frozen(self, tower: str, module: nn.Module, frozen: bool) -> None:
        self.frozen[tower] = frozen
        module.train(self.training and not frozen)

    def train(self, mode: bool = True) -> BMCLongCLIP:
        super().train(mode)
        for tower, module in (("image", self.visual), ("text", self.text)):
            if self.frozen[tower]:
                module.eval()  # nothing in it learns: no drop-path either
        return self


def _no_grad_if(frozen: bool):
    return torch.no_grad() if frozen else contextlib.nullcontext()


def _check_text_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: ModelConfig) -> None:
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be (batch, length); got "
                         f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
    if input_ids.shape[1] > cfg.context_length:
        raise ValueError(f"text of length {input_ids.shape[1]} exceeds context_length {cfg.context_length}: "
                         "tokenize with truncation to the model's context length")
    vocab = cfg.text.vocab_size
    bad = (input_ids < 0) | (input_ids >= vocab)
    if bool(bad.any()):  # one host sync per batch: cheap next to a tower's forward
        raise ValueError(f"token id {int(input_ids[bad][0])} is outside the text tower's vocabulary [0, {vocab}): "
                         "use the tokenizer the text tower was built for")


def create_model(preset_or_json: str, image_weights: str | Path | None = None, text_weights: str | Path | None = None,
                 **overrides: Any) -> BMCLongCLIP:
    """Build ``BMCLongCLIP`` from a preset name or JSON path, then load local tower weights where given.

    ``image_weights``: an open_clip or timm ViT checkpoint file; ``text_weights``: a ModernBERT ``save_pretrained``
    directory (``bmc_fast.model.weights``). ``overrides`` replace config fields (``context_length=154``,
    ``text_unpad=False``, ``vision={"grad_checkpointing": True}`` ...). A random-init text tower needs
    ``text.vocab_size`` (the presets for real checkpoints set it; ``ModelConfig.with_tokenizer`` fills it from a
    tokenizer).
    """
    cfg = load_model_config(preset_or_json, **overrides)
    if cfg.text.vocab_size is None:
        raise ConfigError(f"preset {preset_or_json!r} sets no text.vocab_size: pass text={{'vocab_size': N}} or build "
                          "the config with ModelConfig.with_tokenizer(tokenizer)")
    return model_from_config(cfg, image_weights, text_weights)


def model_from_config(cfg: ModelConfig, image_weights: str | Path | None = None,
                      text_weights: str | Path | None = None) -> BMCLongCLIP:
    """Build ``BMCLongCLIP(cfg)``, then load whichever tower checkpoints are given (``bmc_fast.model.weights``)."""
    model = BMCLongCLIP(cfg, text_weights_follow=text_weights is not None)
    if image_weights is not None or text_weights is not None:
        from bmc_fast.model.weights import load_image_weights, load_text_weights

        if image_weights is not None:
            load_image_weights(model, image_weights)
        if text_weights is not None:
            load_text_weights(model, text_weights)
    return model
