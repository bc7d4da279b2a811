"""Built-in data sources (in progress)."""
