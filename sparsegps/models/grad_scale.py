"""Gradient scaling for the sparse U-Net, the one part of a bf16 run that computes in fp16.

Why: spconv has no bf16 kernels, so under bf16 training the U-Net runs under an fp16 autocast
(`SpUNet._precision_context`) while the rest of the model runs in bf16, and nothing scales the loss
(bf16 has fp32's range and needs no scaling). Every loss is a mean over the global batch, so the
gradient reaching one voxel's features is about 1 / (voxels in the global batch). On a demo export
at 8 scenes per step (0.15 m voxels, 36k voxels) the gradient at the U-Net's output has a median of
1.2e-6: 97% of its elements lie below fp16's smallest normal (6.1e-5), where precision thins out,
and 6.8% below its smallest subnormal (6e-8), where they round to zero. The gradient falls as
1 / global batch: at 64 and 512 scenes 33% and 69% of it is lost (`sparsegps bench grad-underflow`).

What: `BackboneGradScaler` multiplies the gradient entering the U-Net by S (at its fp32 output,
before the cast to fp16 in backward), so the fp16 backward carries S times larger numbers, and
divides by S on the way out: in each parameter's gradient (a tensor hook, so the gradient is
unscaled before it is accumulated, reduced across ranks or clipped) and in the gradient of the
input features. S is a power of two, so the scaling and unscaling are exact wherever nothing
over- or underflows: in fp32 the gradients are bit-equal with and without it.

Overflow: a non-finite gradient on the way out means that some fp16 value of the backward exceeded
65504. From then until the end of the optimizer step every backbone gradient is returned as zero,
and when the overflowing backward pass ends (an autograd callback) the backbone gradients already
in `.grad` are zeroed too: the backbone skips the step, the rest of the model still steps. DeepSpeed
moves gradients out of `.grad` into its own buffers (after each backward pass, or during it under
ZeRO 2 and 3); what it took before the overflow appeared (earlier micro-batches of the step, and
under ZeRO 2 and 3 the layers nearest the output) is finite and exact, and is kept. `finish_step`,
once per optimizer step, updates S: in `dynamic` mode it halves after an overflow on any rank
(never below 1) and doubles after `growth_interval` steps without one; in `constant` mode it stays.

Scaling acts only where the backbone runs in fp16: a forward under a CUDA autocast (bf16 or fp16).
On CPU and in fp32 it does nothing, unless `always` is set (tests and measurements).

S and the count of clean steps are persistent buffers (`scale`, `clean_steps`), so checkpoints and
exports carry them; a state dict written before they existed loads, keeping the current values.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Literal, get_args

import torch
from torch import nn

GradScaleMode = Literal["none", "constant", "dynamic"]
GRAD_SCALE_MODES: tuple[str, ...] = get_args(GradScaleMode)
MAX_SCALE = 2.0 ** 64  # far above any useful S; keeps S finite in fp32 whatever happens
BUFFERS = ("scale", "clean_steps")


def is_power_of_two(value: float) -> bool:
    return value > 0 and math.isfinite(value) and math.frexp(value)[0] == 0.5


class MapGradient(torch.autograd.Function):
    """The identity in forward; in backward the gradient becomes `fn(gradient)`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        ctx.fn = fn
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.fn(grad), None


class BackboneGradScaler(nn.Module):
    """Scales the gradient through a backbone by a power of two S (see the module docstring).

    The owner calls `start_forward(parameters, device_type)` before its forward, wraps its input
    features in `at_input` and its fp32 output features in `at_output` when that returned True; the
    training loop calls `finish_step()` once per optimizer step, after its backward passes."""

    def __init__(self, mode: GradScaleMode = "dynamic", init_scale: float = 2.0 ** 16, growth_interval: int = 1000):
        super().__init__()
        if mode not in GRAD_SCALE_MODES:
            raise ValueError(f"grad_scale: unknown mode {mode!r}; one of {list(GRAD_SCALE_MODES)}")
        if not is_power_of_two(init_scale) or not 1 <= init_scale <= MAX_SCALE:
            raise ValueError(f"grad_scale_init: {init_scale} is not a power of two between 1 and 2**64 "
                             f"(only powers of two scale exactly)")
        if growth_interval < 1:
            raise ValueError(f"grad_scale_growth_interval: must be at least 1, got {growth_interval}")
        self.mode = mode
        self.growth_interval = growth_interval
        self.always = False  # scale on every device and precision (tests, measurements)
        self.register_buffer("scale", torch.tensor(float(init_scale)))
        self.register_buffer("clean_steps", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("found_overflow", torch.tensor(False), persistent=False)
        self._watched: list[nn.Parameter] = []
        self._hooks: list = []
        self._scaled_since_step = False

    def extra_repr(self) -> str:
        return f"mode={self.mode}, growth_interval={self.growth_interval}"

    # ------------------------------------------------------------------------------ forward

    def wanted(self, device_type: str) -> bool:
        """Whether a forward on `device_type` now runs the backbone in fp16 with gradients to scale."""
        if self.mode == "none" or not torch.is_grad_enabled():
            return False
        return self.always or (device_type == "cuda" and torch.is_autocast_enabled("cuda"))

    def start_forward(self, parameters: Iterable[nn.Parameter], device_type: str) -> bool:
        """Prepare the backward of the forward about to run: unscaling hooks on the trainable
        `parameters` when scaling is wanted (True), none otherwise (False)."""
        if not torch.is_grad_enabled():
            return False  # no backward follows: whatever a pending backward needs stays
        trainable = [p for p in parameters if p.requires_grad]
        if not (trainable and self.wanted(device_type)):
            self._unwatch()
            return False
        if not _same_objects(trainable, self._watched):
            self._unwatch()
            self._hooks = [p.register_hook(self._unscale) for p in trainable]
            self._watched = trainable
        self._scaled_since_step = True
        return True

    def at_input(self, features: torch.Tensor) -> torch.Tensor:
        """The input features, unchanged; their gradient is unscaled (1/S)."""
        return MapGradient.apply(features, self._unscale)

    def at_output(self, features: torch.Tensor) -> torch.Tensor:
        """The fp32 output features, unchanged; the gradient entering the backbone is scaled (S)."""
        return MapGradient.apply(features, self._scale_up)

    # ----------------------------------------------------------------------------- backward

    def _scale_up(self, grad: torch.Tensor) -> torch.Tensor:
        """`grad` x S; the first backbone step of a backward pass, so it books the pass's end."""
        torch.autograd.Variable._execution_engine.queue_callback(self._zero_gradients_on_overflow)
        return grad * self.scale.to(grad.dtype)

    def _unscale(self, grad: torch.Tensor) -> torch.Tensor:
        """`grad` / S in fp32, back in its dtype; zero once this step has overflowed."""
        self.found_overflow.logical_or_(~torch.isfinite(grad).all())
        unscaled = grad.float() / self.scale.float()
        return torch.where(self.found_overflow, 0.0, unscaled).to(grad.dtype)

    @torch.no_grad()
    def _zero_gradients_on_overflow(self) -> None:
        """At the end of a backward pass: after an overflow, the backbone gradients accumulated so
        far (earlier backward passes of the step, parameters done before the overflow) go too."""
        for p in self._watched:
            if p.grad is not None:
                p.grad.masked_fill_(self.found_overflow, 0.0)

    # -------------------------------------------------------------------------- optimizer step

    @torch.no_grad()
    def finish_step(self) -> None:
        """After the backward passes of one optimizer step: update S (dynamic mode) and start the
        next step's overflow check. An overflow on any rank counts on every rank, so all keep the
        same S. Nothing happens when no scaled forward ran since the last call (the same on every
        rank). No host-device synchronisation."""
        if not self._scaled_since_step:
            return
        self._scaled_since_step = False
        overflow = self._overflow_on_any_rank()
        if self.mode == "dynamic":
            grows = ~overflow & (self.clean_steps + 1 >= self.growth_interval)
            halved = (self.scale * 0.5).clamp(min=1.0)
            doubled = (self.scale * 2.0).clamp(max=MAX_SCALE)
            self.scale.copy_(torch.where(overflow, halved, torch.where(grows, doubled, self.scale)))
            self.clean_steps.copy_(torch.where(overflow | grows, 0, self.clean_steps + 1))
        self.found_overflow.zero_()

    def _overflow_on_any_rank(self) -> torch.Tensor:
        """Whether this step overflowed on some rank; one small all-reduce when there are several."""
        from sparsegps.distributed import all_reduce_sum

        return all_reduce_sum(self.found_overflow.to(torch.float32)) > 0

    # -------------------------------------------------------------------------------- state

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A state dict written before the scaler existed lacks its buffers: keep the current ones."""
        for name in BUFFERS:
            state_dict.setdefault(prefix + name, getattr(self, name))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _unwatch(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._watched = [], []

    def __getstate__(self):
        """Copies (deepcopy, pickling) start without hooks: they belong to this module's parameters."""
        return {**self.__dict__, "_watched": [], "_hooks": [], "_scaled_since_step": False}


def _same_objects(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def finish_grad_scaling_step(model: nn.Module) -> None:
    """`finish_step` of every `BackboneGradScaler` in `model`: once per optimizer step, before it."""
    for module in model.modules():
        if isinstance(module, BackboneGradScaler):
            module.finish_step()


__all__ = ["BUFFERS", "BackboneGradScaler", "GRAD_SCALE_MODES", "GradScaleMode", "MapGradient",
           "finish_grad_scaling_step", "is_power_of_two"]
