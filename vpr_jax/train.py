"""`python -m vpr_jax.train`: runs `vpr_jax.cli.train` (see there for the flags)."""

# First: a worker process that this command spawns imports this module, and leaves Ctrl-C to
# the command from here on.
from vpr_jax.cli import spawned

spawned.leave_ctrl_c_to_the_command(__name__)

from vpr_jax.cli import train  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == '__main__':
  train.run()
