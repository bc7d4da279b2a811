"""sphere_latent plugin (in progress)."""
