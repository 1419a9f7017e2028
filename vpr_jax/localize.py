"""`python -m vpr_jax.localize`: runs `vpr_jax.cli.localize` (see there for the flags)."""

# First: a worker process that this command spawns imports this module, and leaves Ctrl-C to
# the command from here on.
from vpr_jax.cli import spawned

spawned.leave_ctrl_c_to_the_command(__name__)

from vpr_jax.cli import localize  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == '__main__':
  localize.run()
