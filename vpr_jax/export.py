"""`python -m vpr_jax.export`: runs `vpr_jax.cli.export` (see there for the flags)."""

from vpr_jax.cli import export

if __name__ == '__main__':
  export.run()
