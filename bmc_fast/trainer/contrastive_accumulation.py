"""Contrastive accumulation (GradCache, Gao et al. 2021): one contrastive loss over K micro batches with
the activation memory of one.

Plain gradient accumulation contrasts each micro batch only with itself (micro × ranks pairs per loss);
the paper's objective contrasts all K × micro × ranks pairs of a step. The loss depends on the towers'
parameters only through the features, so it is taken in three passes:

1. embed every micro batch without a graph, keeping its features (b, E) and its RNG state;
2. compute the loss once over the concatenated features (negatives gathered from every rank by the loss
   function) and its gradients with respect to the features and the logit scale (and bias, for the sigmoid loss);
3. re-embed each micro batch with a graph, its RNG state restored, and backpropagate the surrogate
   ⟨image_k, ∂L/∂image_k⟩ + ⟨text_k, ∂L/∂text_k⟩ + (⟨scale, ∂L/∂scale⟩ + ⟨bias, ∂L/∂bias⟩) / K, whose parameter
   gradient is micro batch k's share of ∂L/∂θ. Summed over k (gradient accumulation) they give exactly ∂L/∂θ.

Cost: one extra forward per micro batch; memory: one micro batch's activations plus K × b × E features.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

Features = tuple[torch.Tensor, ...]  # image (b, E), text (b, E), logit scale () [, logit bias ()]


class RngState:
    """The CPU and (on a GPU) the device's torch RNG state, to replay a forward's randomness exactly."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def contrastive_accumulation_step(forward: Callable[[Any], Features], micro_batches: Sequence[Any],
                                  loss_fn: Callable[..., torch.Tensor], backward: Callable[[torch.Tensor], None],
                                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's gradients for the loss over all ``micro_batches``; returns (loss, logit scale), detached.

    ``forward(batch)`` embeds one micro batch: (image, text, scale) or (image, text, scale, bias);
    ``loss_fn(image, text, scale[, bias])`` is the (distributed) contrastive loss; ``backward(surrogate)``
    accumulates parameter gradients (``engine.backward`` without DeepSpeed's 1/K scaling, or
    ``surrogate.backward()``). Every rank must call this with as many batches.
    """
    states, images, texts, scalars = [], [], [], ()
    with torch.no_grad():
        for batch in micro_batches:
            states.append(RngState(device))
            image, text, *scalars = forward(batch)
            images.append(image)
            texts.append(text)
    image_all = torch.cat(images).requires_grad_()  # (K·b, E)
    text_all = torch.cat(texts).requires_grad_()
    scalar_leaves = [scalar.detach().requires_grad_() for scalar in scalars]  # scale () [, bias ()]
    loss = loss_fn(image_all, text_all, *scalar_leaves)
    grad_image, grad_text, *grad_scalars = torch.autograd.grad(loss, (image_all, text_all, *scalar_leaves))
    sizes = [image.shape[0] for image in images]
    for batch, state, g_image, g_text in zip(micro_batches, states, grad_image.split(sizes),
                                            grad_text.split(sizes)):
        state.restore()
        image, text, *scalars = forward(batch)
        # at least fp32: a bf16 dot product of b·E terms would round the surrogate away
        acc = torch.promote_types(image.dtype, torch.float32)
        surrogate = ((image.to(acc) * g_image.to(acc)).sum() + (text.to(acc) * g_text.to(acc)).sum()
                     + sum((x.to(acc) * g.to(acc)).sum() for x, g in zip(scalars, grad_scalars)) / len(micro_batches))
        backward(surrogate)
    return loss.detach(), scalar_leaves[0].detach()
