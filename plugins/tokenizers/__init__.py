"""tokenizers plugin (in progress)."""
