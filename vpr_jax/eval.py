"""`python -m vpr_jax.eval`: runs `vpr_jax.cli.eval` (see there for the flags)."""

from vpr_jax.cli import eval

if __name__ == '__main__':
  eval.run()
