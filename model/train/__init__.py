"""Training FAIR: config, perturbations, objectives, batches, checkpoints, the trainer and `fair-train`."""
