"""`python -m vpr_jax.convert`: runs `vpr_jax.cli.convert` (see there for the flags)."""

from vpr_jax.cli import convert

if __name__ == '__main__':
  convert.run()
