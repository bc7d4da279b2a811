"""Errors a user can act on. The CLI prints them without a traceback and exits with
their ``exit_code``: 2 for everything a user must fix, 75 for a preempted run."""


class SpheregenError(Exception):
    """Base of every error whose message tells the user what to fix."""

    exit_code = 2


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


class StaleError(SpheregenError):
    """A stage's input was produced from another config (weights, samples, results):
    the message names the file, what differs, and the stage to re-run."""


class Preempted(SpheregenError):
    """Training stopped on SIGTERM / SIGHUP / SIGINT after saving a checkpoint.

    Exit code 75 (EX_TEMPFAIL, "try again") tells a cluster script to requeue and run
    ``--resume`` (README, "Preemption"); 130 for a Ctrl-C (SIGINT), as shells expect."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        import signal

        self.exit_code = 130 if signum == signal.SIGINT else 75
