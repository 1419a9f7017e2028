"""Prepared data as TFDS datasets (training places, benchmark sets), built and read without TF."""
