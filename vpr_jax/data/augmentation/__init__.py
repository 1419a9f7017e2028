"""Augmentation: RandAugment on the host (PIL) and on the accelerator, sharing one op table."""
