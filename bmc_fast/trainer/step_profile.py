"""Where a training step's time goes: exclusive time per part, the parts adding up to the step.

A ``StepProfile`` keeps a stack of open parts. Every transition (a part entered or left) records a clock
mark, and the time up to the next mark is charged to the part on top of the stack, or to ``other`` when
none is open: nested parts are exclusive (the image tower's forward is not also counted as ``forward``),
and the parts of a step sum to the step by construction. The named parts (all but ``other``) are
therefore checked against a step time measured independently around them (``bench_train.py``).

The clock is ``time.perf_counter`` on CPU and CUDA events on the current stream on GPU (read once, at
``end_step``, after one synchronize): on GPU a part is the device time between its marks. Parts:

- ``data``: waiting for the next batch; ``forward``: the engine's forward outside the towers (input
  copies, ZeRO-3 parameter gathers); ``image_forward`` / ``text_forward``: the towers' ``forward``
  (forward hooks; with activation checkpointing their recomputation in the backward counts here);
- ``loss``, ``backward`` (``engine.backward``), ``optimizer`` (``engine.step``: clipping, AdamW, the
  ZeRO-2 gradient partitions' all-gather);
- ``communication`` (reported as "grad reduction"): inside any of the above, DeepSpeed's gradient reduction
  (``watch_reduction``: the engine's ``allreduce_gradients`` and the ZeRO optimizer's bucket reduction,
  their flattening and copies included; on one rank the trainer skips the buckets, ``one_rank``, and only
  the epilogue is left) and every blocking ``torch.distributed`` collective
  (``watch_collectives``). An ``async_op=True`` collective's time is in its ``wait()`` and stays with the
  part that waits; NCCL work that DeepSpeed overlaps on its own streams is not separated on GPU.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

PARTS = ("data", "image_forward", "text_forward", "forward", "loss", "backward", "optimizer", "communication")
OTHER = "other"  # step time outside every named part (bookkeeping, logging)
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "reduce", "all_to_all_single", "barrier")


class StepProfile:
    """``begin_step()``, then parts as ``with profile.part("loss"):``, then ``end_step()`` -> seconds per part."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._stack: list[str] = []
        self._marks: list[tuple[object, str]] = []  # (clock mark, the part charged from this mark on)
        self._handles: list = []
        self._patched: list[tuple[object, str, object]] = []  # (object, method name, its own attribute before)

    def _clock(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _mark(self) -> None:
        if self._marks:  # between begin_step() and end_step()
            self._marks.append((self._clock(), self._stack[-1] if self._stack else OTHER))

    def enter(self, name: str) -> None:
        if name not in PARTS:
            raise ValueError(f"StepProfile part {name!r} is not one of {PARTS}")
        self._stack.append(name)
        self._mark()

    def leave(self, name: str) -> None:
        if not self._stack or self._stack[-1] != name:
            raise RuntimeError(f"StepProfile: leaving {name!r} but the open parts are {self._stack}")
        self._stack.pop()
        self._mark()

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        self.enter(name)
        try:
            yield
        finally:
            self.leave(name)

    def begin_step(self) -> None:
        self._stack.clear()
        self._marks = [(self._clock(), OTHER)]

    def end_step(self) -> dict[str, float]:
        """Seconds per part of the step since ``begin_step`` (every part and ``other``; ``step`` is their sum)."""
        self._marks.append((self._clock(), OTHER))
        marks, self._marks = self._marks, []
        if self.cuda:
            marks[-1][0].synchronize()
        seconds = dict.fromkeys((*PARTS, OTHER), 0.0)
        for (start, name), (end, _) in zip(marks, marks[1:]):
            seconds[name] += start.elapsed_time(end) / 1e3 if self.cuda else end - start
        seconds["step"] = sum(seconds[name] for name in (*PARTS, OTHER))
        return seconds

    def watch_towers(self, model: torch.nn.Module) -> None:
        """Time ``model.visual`` and ``model.text`` (a ``BMCLongCLIP``, or open_clip's ``CustomTextCLIP``)."""
        for attr, name in (("visual", "image_forward"), ("text", "text_forward")):
            module = getattr(model, attr)
            self._handles.append(module.register_forward_pre_hook(lambda *_, n=name: self.enter(n)))
            self._handles.append(module.register_forward_hook(lambda *_, n=name: self.leave(n)))

    def _charged(self, name: str, fn):
        def timed(*args, **kwargs):
            with self.part(name):
                return fn(*args, **kwargs)
        return timed

    def watch_reduction(self, engine) -> None:
        """Charge a DeepSpeed engine's gradient reduction to ``communication`` (until ``close``)."""
        for owner, method in ((engine, "allreduce_gradients"),
                              (engine.optimizer, "reduce_independent_p_g_buckets_and_remove_grads"),
                              (engine.optimizer, "reduce_ready_partitions_and_remove_grads")):
            if callable(getattr(owner, method, None)):
                self._patched.append((owner, method, vars(owner).get(method)))
                setattr(owner, method, self._charged("communication", getattr(owner, method)))

    @contextlib.contextmanager
    def watch_collectives(self) -> Iterator[None]:
        """Charge every blocking ``torch.distributed`` collective to ``communication`` while open."""
        dist = torch.distributed
        originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

        for name, fn in originals.items():
            setattr(dist, name, self._charged("communication", fn))
        try:
            yield
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for owner, method, before in self._patched:
            if before is None:
                delattr(owner, method)  # the class's method shows through again
            else:
                setattr(owner, method, before)  # one set on the instance (one_rank.skip_gradient_buckets)
        self._patched.clear()


class NoProfile:
    """The training loop's default: parts cost nothing."""

    def part(self, name: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()
