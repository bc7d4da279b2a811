"""The public toolkit: everything a plugin may use from the core, in one place.

Built-in plugins import the core only through this module (or ``spheregen``, which
re-exports it), as a third-party plugin does; ``docs/architecture.md`` says what each
piece is for and which calls cross each boundary. Anything not exported here is the
core's own and may change.
"""

from spheregen.config import Component, component_field, config_hash, make_component, to_dict
from spheregen.data import to_float, to_uint8
from spheregen.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    PluginError,
    RegistryError,
    SpheregenError,
    TrainingError,
    WeightsError,
)
from spheregen.fit import FitResult, load_fitted
from spheregen.guidance import call_denoiser, cfg_mix, cfg_passes, guided
from spheregen.hookspecs import hookimpl
from spheregen.interfaces import (
    AverageVelocityMethod,
    BuildContext,
    CheckpointableBlocks,
    Column,
    DataSource,
    DataSpec,
    Denoiser,
    EditableMethod,
    ExplicitAttentionDenoiser,
    FitPhase,
    FitRecipe,
    FitSpec,
    FitStatistics,
    FittableComponent,
    LabelledMetric,
    LatentMethod,
    LosslessTokenizer,
    Method,
    Metric,
    MetricContext,
    NullMaskDenoiser,
    ReconstructingMethod,
    Sampler,
    ShardableLoss,
    ShardableMetric,
    SphereAutoencoderMethod,
    SphereDenoiserMethod,
    Tokenizer,
    TwoTimeDenoiser,
    VelocityMethod,
    accepts_keyword,
    check_steps,
    has,
    lacks,
    require,
)
from spheregen.latent import TokenizerDenoiserMethod, build_latent_denoiser, latent_data_spec
from spheregen.layers import sincos_pos_embed_2d
from spheregen.logs import to_floats
from spheregen.paths import atomic_write, atomic_write_json, atomic_write_text
from spheregen.perceptual import Perceptual, check_vgg16_weights
from spheregen.precision import autocast
from spheregen.sampling import (
    Schedule,
    decay,
    flow_time_grid,
    noise,
    noise_level_grid,
    reference_parameter,
    shift_noise_level,
)
from spheregen.sphere import spherify, stratified_unit_radii
from spheregen.validators import acute_angle, at_least_one, fraction, non_negative, positive, proper_fraction
from spheregen.weights import find_hub_file, hub_checkpoints_dir, require_hub_file

__all__ = [
    # plugin hooks and contracts
    "hookimpl", "BuildContext", "DataSpec", "MetricContext", "Column",
    "Tokenizer", "Denoiser", "Method", "Sampler", "Metric", "DataSource",
    # capabilities
    "NullMaskDenoiser", "TwoTimeDenoiser", "ExplicitAttentionDenoiser", "LosslessTokenizer",
    "LatentMethod", "ReconstructingMethod", "EditableMethod", "ShardableMetric", "LabelledMetric",
    "VelocityMethod", "AverageVelocityMethod", "SphereAutoencoderMethod", "SphereDenoiserMethod",
    "CheckpointableBlocks", "ShardableLoss", "lacks", "has", "require", "accepts_keyword", "check_steps",
    # fitting (components spheregen trains before use)
    "FittableComponent", "FitSpec", "FitPhase", "FitStatistics", "FitRecipe", "FitResult", "load_fitted",
    # configs
    "Component", "component_field", "make_component", "config_hash", "to_dict",
    "positive", "non_negative", "at_least_one", "fraction", "proper_fraction", "acute_angle",
    # errors
    "SpheregenError", "ConfigError", "DataError", "WeightsError", "RegistryError", "PluginError",
    "CheckpointError", "TrainingError",
    # models and sampling
    "call_denoiser", "guided", "cfg_mix", "cfg_passes",
    "noise", "reference_parameter", "noise_level_grid", "flow_time_grid", "shift_noise_level", "decay", "Schedule",
    "spherify", "stratified_unit_radii", "sincos_pos_embed_2d",
    "TokenizerDenoiserMethod", "build_latent_denoiser", "latent_data_spec",
    "Perceptual", "check_vgg16_weights",
    # files, weights, images, logs
    "hub_checkpoints_dir", "find_hub_file", "require_hub_file",
    "atomic_write", "atomic_write_text", "atomic_write_json",
    "to_float", "to_uint8", "to_floats", "autocast",
]
