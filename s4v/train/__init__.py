"""Training: DeepSpeed engine around the side network, the loop, checkpoints, metrics, Slurm."""
