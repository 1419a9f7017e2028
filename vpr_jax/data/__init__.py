"""Training places, benchmark sets, augmentation, grain pipelines and synthetic data."""
