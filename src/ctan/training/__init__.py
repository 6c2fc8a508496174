"""Training: per-task losses, multi-task loss weighting, resumable checkpoints and the training loop."""
