"""Image editing with a trained Sphere Encoder: pure functions, tensors in and out.

Images are B×C×H×W in [-1, 1]; every function returns images in (-1, 1) and runs
without gradients. Call ``method.eval()`` first so labels are not dropped.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from spheregen_plugins.sphere_encoder.sphere import spherify


@torch.no_grad()
def reconstruct(method: Any, images: Tensor, labels: Tensor | None = None) -> Tensor:
    """D(f(E(x))) with no noise; labels None = the null class (the official rFID setup)."""
    return method.decode(method.encode(images, labels), labels)


def slerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation between latents a and b (same norm), per sample.

    a, b: B×...; t: T -> T×B×... . Falls back to lerp where a and b are (anti)parallel."""
    af, bf = a.flatten(1).double(), b.flatten(1).double()
    cos = (af * bf).sum(1) / (af.norm(dim=1) * bf.norm(dim=1))
    omega = torch.arccos(cos.clamp(-1.0, 1.0))[None, :]
    tt = t.double()[:, None]
    sin = torch.sin(omega)
    safe = sin.abs() > 1e-6
    wa = torch.where(safe, torch.sin((1 - tt) * omega) / sin.where(safe, torch.ones_like(sin)), 1 - tt)
    wb = torch.where(safe, torch.sin(tt * omega) / sin.where(safe, torch.ones_like(sin)), tt)
    out = wa[..., None] * af[None] + wb[..., None] * bf[None]
    return out.to(a.dtype).view(t.shape[0], *a.shape)


@torch.no_grad()
def interpolate(
    method: Any,
    images_a: Tensor,
    images_b: Tensor,
    num: int = 8,
    mode: Literal["slerp", "lerp"] = "slerp",
    labels: Tensor | None = None,
) -> Tensor:
    """Walk between f(E(a)) and f(E(b)) on the sphere and decode each point.

    ``lerp``: f((1-t)·v_a + t·v_b) (linear, then back onto the sphere); ``slerp``: along
    the great circle. Returns B×num×C×H×W (t = 0 gives a's reconstruction)."""
    if num < 2:
        raise ValueError(f"num must be >= 2 interpolation points, got {num}")
    va, vb = method.encode(images_a, labels), method.encode(images_b, labels)
    t = torch.linspace(0.0, 1.0, num, device=va.device)
    if mode == "slerp":
        path = slerp(va, vb, t)
    elif mode == "lerp":
        tt = t.view(-1, *([1] * va.ndim)).to(va.dtype)
        path = (1 - tt) * va[None] + tt * vb[None]
    else:
        raise ValueError(f"mode must be 'slerp' or 'lerp', got {mode!r}")
    steps, b = path.shape[:2]
    flat = spherify(path.flatten(0, 1))
    rep = None if labels is None else labels.repeat(steps)
    images = method.decode(flat, rep)
    return images.view(steps, b, *images.shape[1:]).transpose(0, 1)


@torch.no_grad()
def manipulate_class(
    method: Any,
    images: Tensor,
    classes: Tensor,
    source_labels: Tensor | None = None,
) -> Tensor:
    """Re-decode each image's latent under other classes.

    The latent is f(E(x, source_labels)) (null class when None); it is decoded once per
    entry of ``classes`` (int64 K). Returns B×K×C×H×W."""
    if not method.conditional:
        raise ValueError("class manipulation needs a class-conditional Sphere Encoder")
    v = method.encode(images, source_labels)
    b, k = v.shape[0], classes.shape[0]
    lat = v[:, None].expand(b, k, *v.shape[1:]).flatten(0, 1)
    lab = classes.to(v.device).repeat(b)
    out = method.decode(lat, lab)
    return out.view(b, k, *out.shape[1:])
