"""`python -m vpr_jax.localize`: runs `vpr_jax.cli.localize` (see there for the flags)."""

from vpr_jax.cli import localize

if __name__ == '__main__':
  localize.run()
