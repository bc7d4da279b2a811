"""baselines plugin (in progress)."""
