"""PyTorch checkpoints of the GSV-Cities family -> Flax variables (read without torch)."""
