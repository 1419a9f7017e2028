"""`python -m vpr_jax.datasets`: runs `vpr_jax.cli.datasets` (see there for the flags)."""

from vpr_jax.cli import datasets

if __name__ == '__main__':
  datasets.run()
