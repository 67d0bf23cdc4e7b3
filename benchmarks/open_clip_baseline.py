"""The paper's stack for ``bench_train.py --baseline open_clip``: open_clip 3.3 training a ViT and its
``HFTextEncoder`` over ``ModernBertModel``, as the BMC-LongCLIP code does.

- The model is open_clip's own ``CustomTextCLIP``, created by ``open_clip.create_model_and_transforms
  ("local-dir:...")`` from an export of the bmc-fast model being benchmarked (``bmc_fast.export``): the
  same architecture and the same weights, mean pooling and the ``mlp`` text projection.
- Captions are padded to the context length, as open_clip's ``HFTokenizer`` does (``padding="max_length"``);
  ``HFTextEncoder`` builds its attention mask from the pad id; ModernBERT runs padded SDPA.
- ``ClipLoss(local_loss=True, gather_with_grad=True)``; ``torch.optim.AdamW`` with open_clip's weight-decay
  split (none on gains, biases and ``logit_scale``), the DeepSpeed JSON's betas, eps and decay, the learning
  rate bmc-fast's scheduler gives the same step; gradient clipping as the JSON's; autocast to bf16 when the
  JSON trains in bf16 (open_clip's ``--precision amp_bf16``); DDP when there is more than one rank.
- ``loader`` is open_clip's webdataset + PIL path: ``decode("pilrgb")``, its ``preprocess_train`` and its
  tokenizer, batched in worker processes.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from bmc_fast.errors import ConfigError


class OpenClipStack:
    """open_clip's model, loss and optimizer, one ``step(batch, lr)`` at a time, timed by a ``StepProfile``."""

    def __init__(self, bmc_model, tokenizer, model_cfg, ds_config: dict, export_dir: Path, device: torch.device,
                 rank: int, world_size: int):
        import open_clip
        from open_clip.loss import ClipLoss

        from bmc_fast.checkpoint.export import export
        from bmc_fast.checkpoint.open_clip_compat import register_modernbert

        if (ds_config.get("fp16") or {}).get("enabled"):
            raise ConfigError("--baseline open_clip: the DeepSpeed JSON trains in fp16; the baseline runs fp32 or "
                              "bf16 autocast: pass a JSON with bf16 or neither")
        register_modernbert()
        if rank == 0:
            export(bmc_model, tokenizer, model_cfg, export_dir)
        if world_size > 1:
            torch.distributed.barrier()
        self.model, self.preprocess_train, _ = open_clip.create_model_and_transforms(f"local-dir:{export_dir}")
        self.model.to(device).train()
        self.tokenizer = open_clip.get_tokenizer(f"local-dir:{export_dir}")
        self.context_length = model_cfg.context_length
        self.pad_id = model_cfg.text.pad_token_id
        self.device = device
        bf16 = (ds_config.get("bf16") or {}).get("enabled", False)
        self.autocast = (lambda: torch.autocast(device.type, torch.bfloat16)) if bf16 else contextlib.nullcontext
        self.module = self.model
        if world_size > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=None if device.type ==
                                                                   "cpu" else [device.index])
        self.loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
        params = (ds_config.get("optimizer") or {}).get("params", {})
        self.optimizer = torch.optim.AdamW(open_clip_param_groups(self.module, params.get("weight_decay", 0.0)),
                                           lr=params.get("lr", 1e-3), betas=tuple(params.get("betas", (0.9, 0.999))),
                                           eps=params.get("eps", 1e-8))
        self.clip = ds_config.get("gradient_clipping", 0.0)

    def padded_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixels, input ids (B, context) padded with the pad id) of a bmc-fast batch, on the device."""
        ids = batch["input_ids"]
        padded = torch.full((ids.shape[0], self.context_length), self.pad_id, dtype=ids.dtype)
        padded[:, :ids.shape[1]] = torch.where(batch["attention_mask"].bool(), ids, self.pad_id)
        return batch["pixels"].to(self.device, torch.float32), padded.to(self.device)

    def step(self, pixels: torch.Tensor, ids: torch.Tensor, lr: float, profile) -> torch.Tensor:
        """One training step; returns the loss (detached)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with profile.part("forward"), self.autocast():
            image, text, scale = self.model(pixels, ids)
        with profile.part("loss"), self.autocast():
            loss = self.loss_fn(image, text, scale)
        with profile.part("backward"):
            loss.backward()
        with profile.part("optimizer"):
            if self.clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def loader(self, urls: list[str], batch: int, workers: int) -> Any:
        """open_clip's webdataset + PIL training loader over ``urls`` (repeated), yielding (pixels, ids)."""
        import webdataset as wds

        tokenize = self.tokenizer
        dataset = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).repeat()
                   .decode("pilrgb").to_tuple("jpg;png", "txt")
                   .map_tuple(self.preprocess_train, lambda text: tokenize([text])[0])
                   .batched(batch, partial=False))
        return iter(wds.WebLoader(dataset, batch_size=None, num_workers=workers))


def open_clip_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip_train.main's split: no decay on 1-d parameters, gains, biases and logit_scale."""
    def exclude(name: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay}]
