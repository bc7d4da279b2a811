"""Errors a user can act on. The CLI prints them without a traceback and exits 2."""


class SpheregenError(Exception):
    """Base of every error whose message tells the user what to fix."""


class ConfigError(SpheregenError):
    """A config file or value is wrong: the message names the file, the key and the fix."""


class RegistryError(SpheregenError):
    """An unknown, duplicate or badly named component."""


class PluginError(SpheregenError):
    """A plugin failed to load or to register: the message names the plugin and hook."""


class DataError(SpheregenError):
    """A dataset is missing, empty, or lacks the mapped columns."""


class WeightsError(SpheregenError):
    """Pretrained weights are missing: the message names the file, where it goes, and
    the offline alternative a config can name."""


class CheckpointError(SpheregenError):
    """A checkpoint is missing, truncated or corrupt."""


class TrainingError(SpheregenError):
    """Training hit a non-finite loss or another state that must not be written on."""
