"""Data worker processes: worker counts, exit with the parent, shared memory, reused batch slots."""
