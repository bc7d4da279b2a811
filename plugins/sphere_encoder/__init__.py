"""sphere_encoder plugin (in progress)."""
