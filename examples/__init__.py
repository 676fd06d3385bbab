"""Training scripts for a model of one's own, pruned with flipout_jax (see README.md here)."""
