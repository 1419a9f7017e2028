"""`python -m vpr_jax.index`: runs `vpr_jax.cli.index` (see there for the flags)."""

from vpr_jax.cli import index

if __name__ == '__main__':
  index.run()
