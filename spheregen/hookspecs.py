"""The public plugin API: one hook per kind, each receiving a ``register`` callback.

A plugin module implements any of these with the ``spheregen.hookimpl`` marker::

    @spheregen.hookimpl
    def spheregen_register_tokenizers(register):
        register("my-tokenizer", build_my_tokenizer, MyTokenizerConfig)

``register(name, factory, config_cls)``: ``name`` is kebab-case and unique per kind,
``factory(cfg, ctx)`` builds the component, ``config_cls`` is a frozen attrs class.
These names and this signature are stable.
"""

import pluggy

hookspec = pluggy.HookspecMarker("spheregen")
hookimpl = pluggy.HookimplMarker("spheregen")


@hookspec
def spheregen_register_tokenizers(register):
    """Register tokenizers: images <-> latents."""


@hookspec
def spheregen_register_denoisers(register):
    """Register denoiser networks."""


@hookspec
def spheregen_register_samplers(register):
    """Register samplers."""


@hookspec
def spheregen_register_metrics(register):
    """Register metrics."""


@hookspec
def spheregen_register_methods(register):
    """Register trainable methods."""


@hookspec
def spheregen_register_datasets(register):
    """Register data sources."""


# kind -> hook name; the order is the order `spheregen list` prints.
HOOKS = {
    "method": "spheregen_register_methods",
    "tokenizer": "spheregen_register_tokenizers",
    "denoiser": "spheregen_register_denoisers",
    "sampler": "spheregen_register_samplers",
    "metric": "spheregen_register_metrics",
    "dataset": "spheregen_register_datasets",
}
