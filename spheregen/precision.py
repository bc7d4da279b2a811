"""Precision and speed switches of a run, each off by default.

``[train]``: ``tf32`` (TF32 matmuls on CUDA while the method trains and samples),
``compile`` (torch.compile of the training step), ``activation_checkpointing`` (blocks
recompute their activations in the backward pass) and ``fused_adamw`` (one fused AdamW
kernel). ``[eval] mixed_precision = "bf16"``: sampling and feature extraction under bf16
autocast. See docs/scale.md for what each buys and what it changes.
"""

from __future__ import annotations

import contextlib
import contextvars
import types
from typing import Any, Iterable, Iterator

import torch
import torch.utils.checkpoint
from torch import nn

from spheregen.errors import ConfigError
from spheregen.interfaces import CheckpointableBlocks, require

# the torch.compile backend of ``train.compile``; tests compile with "eager" (no C compiler)
COMPILE_BACKEND = "inductor"


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 tensor-core matmuls and cuDNN convolutions on CUDA while the block runs, the
    flags restored afterwards; ``enabled=False`` leaves torch's defaults (fp32 matmuls;
    cuDNN convolutions already allow TF32 by torch's own default). Only the CUDA
    backends' flags are set (the legacy ``allow_tf32`` API, as accelerate and the GPU
    tests use: torch refuses a mix of the legacy and the ``fp32_precision`` API), so CPU
    matmuls (oneDNN) stay fp32: on a CPU it changes nothing."""
    if not enabled:
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def autocast(device: torch.device | str, mode: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on ``device``'s type for ``mode = "bf16"`` (``[eval]
    mixed_precision``), nothing for ``"no"``. Works on CPU and CUDA alike."""
    if mode == "no":
        return contextlib.nullcontext()
    if mode == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    raise ValueError(f"mixed_precision must be 'no' or 'bf16', got {mode!r}")


# train.tf32 of the method being sampled: set around its sampling (:func:`sampling_tf32`)
# and applied only inside :func:`sampling`, so the metrics that score the samples in
# between (guidance selection) extract features, and fill shared caches, without it
_SAMPLING_TF32: contextvars.ContextVar[bool] = contextvars.ContextVar("spheregen_sampling_tf32", default=False)


@contextlib.contextmanager
def sampling_tf32(enabled: bool) -> Iterator[None]:
    """Within the block, :func:`sampling` draws with TF32 when ``enabled`` (the sampled
    method's ``train.tf32``: it samples in the numerics it trained in)."""
    token = _SAMPLING_TF32.set(enabled)
    try:
        yield
    finally:
        _SAMPLING_TF32.reset(token)


@contextlib.contextmanager
def sampling(device: torch.device | str, mode: str) -> Iterator[None]:
    """What one batch of samples is drawn under: :func:`autocast` of ``mode`` (``[eval]
    mixed_precision``, as the sample set's identity records it) and TF32 where
    :func:`sampling_tf32` asks for it."""
    with autocast(device, mode), tf32(_SAMPLING_TF32.get()):
        yield


def compile_module(module: nn.Module, backend: str | None = None) -> nn.Module:
    """``module`` with its call compiled by torch.compile, in place
    (``nn.Module.compile``): the object, its parameter names and its state-dict keys stay
    what they were, without the ``_orig_mod.`` prefix that wrapping it in
    ``torch.compile(module)`` adds, so checkpoints and final weights load into an
    uncompiled model. ``backend`` defaults to :data:`COMPILE_BACKEND`."""
    module.compile(backend=backend or COMPILE_BACKEND)
    return module


def checkpoint_blocks(method: Any, needed_by: str) -> list[nn.Module]:
    """The blocks ``method`` lists for activation checkpointing
    (:class:`~spheregen.interfaces.CheckpointableBlocks`), or a ConfigError naming
    ``needed_by`` and the capability. Called on a method built on the meta device, it is
    the load-time check."""
    require(method, CheckpointableBlocks, needed_by,
            "Set train.activation_checkpointing = false for this method ([methods.train]), or give it "
            "checkpoint_blocks()")
    try:
        blocks = list(method.checkpoint_blocks())
    except ConfigError as exc:  # the method's own refusal (a denoiser without blocks, a JVP)
        raise ConfigError(f"{needed_by}: {exc}") from exc
    if not blocks or not all(isinstance(b, nn.Module) for b in blocks):
        raise ConfigError(f"{needed_by}: checkpoint_blocks() of {type(method).__name__} must list nn.Modules, "
                          f"got {blocks!r}")
    return blocks


def checkpoint_activations(blocks: Iterable[nn.Module]) -> None:
    """Make each block recompute its activations in the backward pass instead of keeping
    them (``torch.utils.checkpoint``, ``use_reentrant=False``, the RNG state replayed), so
    the loss and the gradients are those of a plain forward. A checkpointing ``forward``
    is bound on each instance: parameter names, state dict and hooks stay the same, and
    a deep copy rebinds to the copy. Without autograd (sampling) a block runs as before."""
    for block in blocks:
        block.forward = types.MethodType(_checkpointed_forward, block)


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    forward = type(self).forward.__get__(self)
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def adamw(groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], weight_decay: float,
          fused: bool) -> torch.optim.AdamW:
    """AdamW over ``groups``. ``fused``: torch's fused kernel (torch 2.14 has it for
    floating-point tensors on CPU, CUDA, MPS and XPU), one kernel for every parameter
    instead of torch's default (``foreach`` kernels on CUDA, a per-parameter loop on a
    CPU). On this project's 2-core CPU, for the tiny Sphere Encoder's 2.7M parameters at
    2 threads, alone: 12.9 / 11.9 / 4.0 ms (loop / foreach / fused); inside its training
    step no measurable difference (0.996 of the loop's step time, 96.5% interval
    0.96-1.05: after the backward the moments are out of cache either way;
    benchmarks/README.md). Refused with a ConfigError for
    parameters that are not floating point, before torch would fail at the first step."""
    if not fused:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    bad = sorted({str(p.dtype) for g in groups for p in g["params"] if not torch.is_floating_point(p)})
    if bad:
        raise ConfigError(f"train.fused_adamw = true, but torch's fused AdamW takes floating-point parameters only "
                          f"and this method trains {', '.join(bad)} ones; set fused_adamw = false")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
