"""metrics plugin (in progress)."""
