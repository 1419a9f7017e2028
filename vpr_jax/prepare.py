"""`python -m vpr_jax.prepare`: runs `vpr_jax.cli.prepare` (see there for the flags)."""

from vpr_jax.cli import prepare

if __name__ == '__main__':
  prepare.run()
