"""A third-party spheregen plugin, written against the public toolkit ``spheregen.api``
alone: one component of each kind a model comparison needs.

* ``haar`` (tokenizer): a one-level orthonormal Haar wavelet transform, frozen and lossless;
* ``film-conv`` (denoiser): a small conv net with only ``forward(x, noise_level, labels)``;
* ``midpoint`` (sampler): the explicit midpoint ODE solver for ``flow-matching`` methods;
* ``pixel-fd`` (metric): Fréchet distance on downsampled pixels, with its report column.

After ``pip install ./examples/third_party_plugin`` an experiment can name them::

    [eval]
    metrics = [{ name = "pixel-fd" }]

    [[methods]]
    name = "fm-haar"
    method = { name = "flow-matching", tokenizer = "haar", denoiser = { name = "film-conv", width = 32 } }
    sampler = "midpoint"
"""

from __future__ import annotations

import spheregen

from .denoiser import FilmConvConfig, FilmConvDenoiser
from .haar import HaarConfig, HaarTokenizer
from .metric import PixelFD, PixelFDConfig, frechet_distance
from .sampler import MidpointConfig, MidpointSampler

__all__ = ["HaarConfig", "HaarTokenizer", "FilmConvConfig", "FilmConvDenoiser", "MidpointConfig",
           "MidpointSampler", "PixelFDConfig", "PixelFD", "frechet_distance"]


# One hook per kind; each factory is called as factory(cfg, ctx).
@spheregen.hookimpl
def spheregen_register_tokenizers(register):
    register("haar", HaarTokenizer, HaarConfig)


@spheregen.hookimpl
def spheregen_register_denoisers(register):
    register("film-conv", FilmConvDenoiser, FilmConvConfig)


@spheregen.hookimpl
def spheregen_register_samplers(register):
    register("midpoint", MidpointSampler, MidpointConfig)


@spheregen.hookimpl
def spheregen_register_metrics(register):
    register("pixel-fd", PixelFD, PixelFDConfig)
