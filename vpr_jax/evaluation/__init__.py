"""Evaluation: descriptors, search + Recall@N, one benchmark set, result files, the eval command."""
