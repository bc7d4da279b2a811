"""Configs of the ``sphere-encoder`` method and the ``sphere`` sampler.

Defaults follow the official code (repository facebookresearch/sphere-encoder, SPEC A)
except where a default would need a download or a GPU; those exceptions say so.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

from spheregen.api import acute_angle, fraction, non_negative, positive

# name -> (width, depth, heads). tiny is ours (SPEC D); the rest are the official
# SIZE_DICT. SwiGLU hidden = int(width * 8 / 3); head_dim = width / heads.
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (128, 4, 2),
    "small": (512, 8, 8),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "xlarge": (1152, 28, 16),
    "huge": (1280, 32, 16),
    "giant": (1664, 40, 16),
}

# Official patch size by image size (train.py) before the default `high` latent
# resolution halves it: 32 px -> P = 2, 256 px -> P = 8.
_OFFICIAL_PATCH = {32: 4, 64: 4, 128: 8, 256: 16, 512: 32}


def official_patch_size(image_size: int) -> int:
    if image_size not in _OFFICIAL_PATCH:
        raise ValueError(
            f"the official code has no patch size for image_size {image_size} "
            f"(it knows {sorted(_OFFICIAL_PATCH)}); set method.patch_size explicitly, "
            "e.g. patch_size = 4 for a 8×8 token grid at 32 px"
        )
    return _OFFICIAL_PATCH[image_size] // 2


def _size(_i: Any, a: attrs.Attribute, v: str) -> None:
    if v not in SIZES:
        raise ValueError(f"'{a.name}' must be one of {list(SIZES)}, got {v!r}")


@attrs.frozen(kw_only=True)
class SphereEncoderConfig:
    """Pixel-space Sphere Encoder (Yue et al.): ViT encoder/decoder around a spherical
    latent, trained with pixel reconstruction, pixel and latent consistency.

    * ``size``: encoder and decoder size, one of :data:`SIZES`.
    * ``patch_size``: None = the official rule (32 px -> 2, 256 px -> 8).
    * ``compression_ratio``: pixel dims / latent dims; latent channels per token
      d = int(C·P² / ratio) with C = the data's channels (3 in every official setup).
    * ``noise_angle``: θmax in degrees; σmax = tan θmax (official G default 85).
    * ``hard_case_prob`` / ``hard_case_fix``: mix r with harder radii up to
      tan(min(θ+5, 89))/tan θ. ``hard_case_fix = False`` reproduces the official bug
      (the mask and the value share one uniform draw, so the mixed radii only reach
      1 + p·(ratio − 1): 80.9° instead of 85° at θ = 80).
    * ``mixer_depth`` / ``mixer_affine``: MLP-Mixer blocks after the encoder head and
      before the decoder blocks; affine final RMSNorm.
    * ``head``: decoder pixel head, ``linear`` (official for 256 px) or ``conv`` (CIFAR).
    * ``conditional``: class-conditional (AdaLN-Zero) when the data has classes; on data
      with ``num_classes = 0`` the model is unconditional, as the official
      ``use_modulation = num_classes > 0``.
    * loss weights: ``dist_weight`` (smooth-L1 recon), ``perc_weight`` (LPIPS-VGG recon),
      ``con_dist_weight`` / ``con_perc_weight`` (pixel consistency), ``lat_con_weight``.
      Defaults are the CIFAR script's 1 / 0.5 / 0.1 with the perceptual terms off,
      because LPIPS needs the torchvision VGG16 weights (a download); the official
      argparse defaults are 1 / 1 / 1 / 1 / 0.1 (see experiments/paper/*.toml).
    * ``pixel_consistency``: decode v_NOISY and v_noisy (2B) and add the pix-con term;
      off: decode v_NOISY only and use it for the recon term.
    * ``encoder_lr_scale``: learning-rate multiplier of the encoder's parameters.
    """

    size: str = attrs.field(default="base", validator=_size)
    patch_size: int | None = attrs.field(default=None, validator=positive)
    compression_ratio: float = attrs.field(default=1.5, validator=positive)
    noise_angle: float = attrs.field(default=85.0, validator=acute_angle)
    hard_case_prob: float = attrs.field(default=0.1, validator=fraction)
    hard_case_fix: bool = True
    mixer_depth: int = attrs.field(default=4, validator=non_negative)
    mixer_affine: bool = True
    head: Literal["linear", "conv"] = "linear"
    conditional: bool = True
    label_dropout: float = attrs.field(default=0.1, validator=fraction)
    dist_weight: float = attrs.field(default=1.0, validator=non_negative)
    perc_weight: float = attrs.field(default=0.0, validator=non_negative)
    con_dist_weight: float = attrs.field(default=0.5, validator=non_negative)
    con_perc_weight: float = attrs.field(default=0.0, validator=non_negative)
    lat_con_weight: float = attrs.field(default=0.1, validator=non_negative)
    pixel_consistency: bool = True
    encoder_lr_scale: float = attrs.field(default=0.1, validator=positive)

    def __attrs_post_init__(self) -> None:
        if self.dist_weight == 0 and self.perc_weight == 0:
            raise ValueError("the reconstruction term needs dist_weight > 0 or perc_weight > 0")

    @classmethod
    def tiny(cls) -> "SphereEncoderConfig":
        """The CPU recipe of SPEC D: width 128, 4 layers, 2 heads, patch 4, mixer 2,
        conv head, θ = 80°, no perceptual term (2.7M parameters at 32 px)."""
        return cls(size="tiny", patch_size=4, mixer_depth=2, head="conv", noise_angle=80.0)


@attrs.frozen(kw_only=True)
class SphereSamplerConfig:
    """The official multi-step sphere loop (SPEC A9).

    * ``cfg_position``: where guidance acts: ``enc`` (latent, before f), ``dec``
      (pixels, clamped to [-1, 1]) or ``combo`` (both, each with √w).
    * ``cache_noise``: draw the refinement noise once and reuse it at every step
      (official eval default); False redraws it each step (official OF runs).
    * ``scheduler``: ``none`` = full θmax noise every step (r = 1, official default);
      ``linear`` = r = 1 − t/T.
    """

    cfg_position: Literal["enc", "dec", "combo"] = "combo"
    cache_noise: bool = True
    scheduler: Literal["none", "linear"] = "none"
