"""FLOPs per image, parameter counts and throughput.

Two FLOPs conventions (SPEC A10, F):

* ``true``: every op torch's ``FlopCounterMode`` counts (2·m·n·k per matmul, convs),
  attention matmuls included;
* ``paper``: the Sphere Latent Encoder paper's "GFLOPs": 2 × multiply-adds **excluding
  attention matmuls** (fvcore skips ``scaled_dot_product_attention``), with every
  classifier-free-guidance pass counted. Here: ``true`` minus the attention FLOPs.

Attention is booked where it is called (``F.scaled_dot_product_attention``, or
``F.multi_head_attention_forward`` for ``nn.MultiheadAttention``), not by whichever
kernel the dispatcher picks, because FlopCounterMode sees different things per device:
on CPU the fused ``_scaled_dot_product_flash_attention_for_cpu`` has no FLOP formula
(counted 0), on ``meta`` SDPA decomposes into two ``bmm`` (counted as plain matmuls),
on CUDA the flash/efficient kernels carry their own formula. :func:`count_flops` takes
back what the counter saw inside each attention call and books the analytic
2·B·Sq·Sk·(Dqk + Dv) as ``attention``, so the numbers agree on every device. Attention
written by hand as ``softmax(q @ kᵀ) @ v`` is ordinary matmuls to the counter and is
therefore *not* excluded by ``paper``; models should call SDPA.

Counting works on the ``meta`` device, so paper-scale models (≈1B parameters) are
counted with no memory and no compute: build the model under ``with
torch.device("meta"):`` and count one sampling call at batch 1.
:func:`count_sampling_flops` passes ``generator=None`` so the count never touches the
caller's RNG stream (with torch 2.14 a CPU generator does drive meta random ops, but
older releases refused). What cannot run on meta is host synchronisation: a sampler
that calls ``.item()`` or branches on tensor values must be counted on a real device.
"""

from __future__ import annotations

import itertools

import math
import statistics
import time
import weakref
from collections import Counter
from typing import Any, Callable, Literal, Sequence

import attrs
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten
ATTENTION = "attention"
Convention = Literal["true", "paper"]

# Kernels an attention call may run, as FlopCounterMode names them: the fused ones of
# each device, and the batched matmuls of the math path (meta) and of MHA's explicit
# path (need_weights=True).
_ATTENTION_OPS = frozenset(
    str(op)
    for op in (
        aten._scaled_dot_product_flash_attention_for_cpu,
        aten._scaled_dot_product_flash_attention,
        aten._scaled_dot_product_efficient_attention,
        aten._scaled_dot_product_cudnn_attention,
        aten._flash_attention_forward,
        aten._efficient_attention_forward,
        aten.bmm,
        aten.baddbmm,
    )
)


@attrs.frozen(kw_only=True)
class FlopCount:
    """FLOPs of one call, divided by the number of images it produced.

    ``total``: true FLOPs (attention included); ``attention``: the part spent in
    attention calls; ``by_op``: true FLOPs per op name (``aten.mm``,
    ``aten.convolution``, ..., and ``attention``).
    """

    total: int
    attention: int
    by_op: dict[str, int]
    images: int = 1

    @property
    def paper(self) -> int:
        """2 × multiply-adds excluding attention matmuls (SPEC A10)."""
        return self.total - self.attention

    def flops(self, convention: Convention = "true") -> int:
        if convention == "true":
            return self.total
        if convention == "paper":
            return self.paper
        raise ValueError(f"unknown FLOPs convention {convention!r}; choose 'true' or 'paper'")

    def gflops(self, convention: Convention = "true") -> float:
        return self.flops(convention) / 1e9


def sdpa_flops(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int]) -> int:
    """2·m·n·k for QKᵀ and for AV with batch and head dims folded:
    2·B·Sq·Sk·(Dqk + Dv), B = prod(query_shape[:-2]) (grouped-query heads included)."""
    batch = math.prod(query_shape[:-2])
    s_q, d_qk = query_shape[-2:]
    return 2 * batch * s_q * key_shape[-2] * (d_qk + value_shape[-1])


def _sdpa_formula(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flops(query_shape, key_shape, value_shape)


class _AttentionTally(TorchFunctionMode):
    """Sees attention calls before dispatch and books them as attention.

    For ``F.scaled_dot_product_attention`` the FLOPs are analytic; for
    ``F.multi_head_attention_forward`` (nn.MultiheadAttention, nn.Transformer*) they are
    what the counter saw for attention kernels inside the call. Either way the
    counter's own entries for those kernels are taken back (``booked``), so nothing is
    counted twice. Calls nested inside these functions never reach this mode.
    """

    def __init__(self, counter: FlopCounterMode):
        super().__init__()
        self.counter = counter
        self.attention = 0
        self.booked: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention and func is not F.multi_head_attention_forward:
            return func(*args, **kwargs)
        before = self._counts()
        out = func(*args, **kwargs)
        delta = {op: n - before.get(op, 0) for op, n in self._counts().items() if op in _ATTENTION_OPS}
        self.booked.update(delta)
        if func is F.scaled_dot_product_attention:
            q, k, v = (kwargs[n] if n in kwargs else args[i] for i, n in enumerate(("query", "key", "value")))
            self.attention += sdpa_flops(q.shape, k.shape, v.shape)
        else:
            self.attention += sum(delta.values())
        return out

    def _counts(self) -> dict[str, int]:
        return {str(op): int(n) for op, n in self.counter.flop_counts.get("Global", {}).items()}


def count_flops(fn: Callable[[], Any], images: int = 1) -> FlopCount:
    """Run ``fn()`` once under FlopCounterMode (no grad) and return its FLOPs per image.

    ``images`` is how many images ``fn`` produces (1 for the usual batch of 1). Works
    with meta tensors: nothing is computed, only shapes propagate.
    """
    if images < 1:
        raise ValueError(f"images must be >= 1, got {images}")
    # the CPU fused SDPA kernel has no formula in torch; give it one so attention inside
    # nn.MultiheadAttention on CPU is counted too
    counter = FlopCounterMode(display=False, custom_mapping={aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_formula})
    tally = _AttentionTally(counter)
    with torch.no_grad(), counter, tally:
        fn()
    by_op = Counter({str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()})
    by_op.subtract(tally.booked)
    by_op[ATTENTION] += tally.attention
    per_image = {op: n // images for op, n in sorted(by_op.items()) if n}
    return FlopCount(
        total=sum(per_image.values()), attention=per_image.get(ATTENTION, 0), by_op=per_image, images=images
    )


def count_sampling_flops(
    sampler: Any,
    method: Any,
    steps: int,
    guidance: float = 1.0,
    label: int = 0,
    device: torch.device | str | None = None,
) -> FlopCount:
    """FLOPs per image of one whole ``sampler.sample`` call at batch 1.

    Every network pass the sampler makes is counted (encoder, denoiser, decoder, each
    CFG pass). ``device`` defaults to the method's parameters' device (``meta`` when it
    was built under ``torch.device("meta")``). The generator is None so meta works.
    """
    if device is None:
        device = _module_device(method)
    labels = torch.full((1,), label, dtype=torch.long, device=device)
    return count_flops(lambda: sampler.sample(method, labels, steps, guidance, generator=None))


def _module_device(module: Any) -> torch.device:
    params = getattr(module, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")


@attrs.frozen(kw_only=True)
class ParamCount:
    total: int
    trainable: int


def count_params(module: torch.nn.Module) -> ParamCount:
    """Parameters of ``module`` (shared tensors once; meta tensors work)."""
    params = list(module.parameters())
    return ParamCount(
        total=sum(p.numel() for p in params), trainable=sum(p.numel() for p in params if p.requires_grad)
    )


@attrs.frozen(kw_only=True)
class Throughput:
    """``latency_s``: median seconds per call; ``images_per_s``: batch / latency_s;
    ``times_s``: every timed call."""

    images_per_s: float
    latency_s: float
    batch: int
    times_s: tuple[float, ...]


def measure_throughput(
    fn: Callable[[], Any],
    batch: int,
    warmup: int = 2,
    repeats: int = 5,
    device: torch.device | str | None = None,
) -> Throughput:
    """Time ``fn()`` (which makes ``batch`` images) ``repeats`` times after ``warmup``
    untimed calls, under no_grad. On CUDA each call is bracketed by a synchronize so
    the time covers the kernels, not their launch. The median resists the noise of a
    shared machine."""
    if batch < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need batch >= 1, repeats >= 1, warmup >= 0; got {batch}, {repeats}, {warmup}")
    device = torch.device(device) if device is not None else None
    sync = (lambda: torch.cuda.synchronize(device)) if device is not None and device.type == "cuda" else (lambda: None)
    times = []
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        sync()
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
    latency = statistics.median(times)
    return Throughput(images_per_s=batch / latency, latency_s=latency, batch=batch, times_s=tuple(times))


def experiment_flops(ws: Any, names: Sequence[str] | None = None,
                     steps: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """GFLOPs per image of every method of a workspace at each of its step counts (or
    ``steps``), both conventions, counted on ``meta``: no weights, data or memory needed.

    One dict per method × steps: method, sampler, steps, nfe, gflops_true, gflops_paper,
    params (of the whole method, tokenizer included)."""
    rows = []
    for entry in ws.exp.methods:
        if names and entry.name not in names:
            continue
        method, sampler = ws.build_architecture(entry)
        params = count_params(method).total
        for k, w in itertools.product(steps or ws.exp.steps_for(entry), ws.exp.guidances_for(entry)):
            count = count_sampling_flops(sampler, method, k, w, device="meta")
            rows.append({
                "method": entry.name, "sampler": ws.sampler_name(entry, method), "steps": k,
                "guidance": w, "nfe": sampler.nfe(k, w),
                "gflops_true": count.total / 1e9, "gflops_paper": count.paper / 1e9, "params": params,
            })
    return rows


def format_flops_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of :func:`experiment_flops` rows."""
    head = f"{'method':<22} {'steps':>5} {'NFE':>4} {'guidance':>8} {'GFLOPs (true)':>14} {'GFLOPs (paper)':>15} {'params (M)':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<22} {r['steps']:>5} {r['nfe']:>4} {r['guidance']:>8.2f} {r['gflops_true']:>14.2f} "
                     f"{r['gflops_paper']:>15.2f} {r['params'] / 1e6:>11.1f}")
    return "\n".join(lines)


class _LiveTensorBytes(TorchDispatchMode):
    """Follows every storage an op creates (weakly, so freeing it is seen) and keeps
    the peak of the live total; storages that existed before (weights) are added by
    :meth:`add`. Views share their base's storage and cost nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.current = 0
        self.peak = 0

    def add(self, tensor: Any) -> None:
        if not isinstance(tensor, torch.Tensor):
            return
        st = tensor.untyped_storage()
        if st in self.seen:
            return
        n = st.nbytes()
        self.seen[st] = weakref.finalize(st, self._free, n)
        self.current += n
        self.peak = max(self.peak, self.current)

    def _free(self, n: int) -> None:
        self.current -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.add(t)
        return out


def measure_peak_memory(fn: Callable[[], Any], module: torch.nn.Module | None = None,
                        device: torch.device | str | None = None) -> int:
    """Peak bytes of tensor memory on ``device`` while ``fn()`` runs under no_grad,
    ``module``'s parameters and buffers included.

    CUDA: the allocator's peak during the call above what was allocated before it, plus
    the module's parameters and buffers (``max_memory_allocated``, reset first). Other devices
    (CPU, meta): a dispatch mode that follows every tensor storage ops create, so the
    number is the tensors' live bytes, not the process RSS that the allocator, the
    Python heap and the libraries inflate."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        # the allocator counts everything on the device (feature networks, other
        # models): keep the growth during the call and add this module's own tensors
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with torch.no_grad():
            fn()
        torch.cuda.synchronize(device)
        own = sum(t.untyped_storage().nbytes() for t in {*module.parameters(), *module.buffers()}) if module else 0
        return int(torch.cuda.max_memory_allocated(device) - before + own)
    tracker = _LiveTensorBytes()
    if module is not None:
        for t in (*module.parameters(), *module.buffers()):
            tracker.add(t)
    with torch.no_grad(), tracker:
        fn()
    return tracker.peak


def count_training_flops(method: Any, image_shape: Sequence[int], num_classes: int, batch: int = 4) -> FlopCount:
    """FLOPs per image of one training step's forward and backward (optimizer update not
    counted), at ``batch`` random images of ``image_shape`` (C, H, W) on the method's
    device (losses log floats, so this runs for real: one small step). A method on a
    frozen tokenizer (:class:`~spheregen.interfaces.LatentMethod`) trains on cached
    latents, so its step is ``latent_loss`` on latents; encoding them once is a separate
    cost. The method's gradients are cleared afterwards."""
    from spheregen.interfaces import LatentMethod, has

    device = _module_device(method)
    labels = torch.arange(batch, device=device) % max(1, num_classes)
    if has(method, LatentMethod) and not getattr(method.tokenizer, "trainable", True):
        inputs = torch.randn(batch, *method.tokenizer.latent_shape, device=device)
        step = lambda: method.latent_loss(inputs, labels)  # noqa: E731
    else:
        inputs = torch.rand(batch, *image_shape, device=device) * 2 - 1
        step = lambda: method.loss(inputs, labels)  # noqa: E731
    counter = FlopCounterMode(display=False, custom_mapping={aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_formula})
    was_training = method.training
    method.train()
    try:
        with torch.enable_grad(), counter:
            loss, _ = step()
            loss.backward()
    finally:
        method.zero_grad(set_to_none=True)
        method.train(was_training)
    total = sum(int(n) for n in counter.get_flop_counts().get("Global", {}).values())
    return FlopCount(total=total // batch, attention=0, by_op={}, images=batch)
