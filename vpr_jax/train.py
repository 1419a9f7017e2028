"""`python -m vpr_jax.train`: runs `vpr_jax.cli.train` (see there for the flags)."""

from vpr_jax.cli import train

if __name__ == '__main__':
  train.run()
