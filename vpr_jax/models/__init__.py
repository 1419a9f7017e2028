"""Backbones, aggregators and the full VPR model."""
