"""Ctrl-C in the worker processes of a command: left to the command, which stops them.

A terminal sends Ctrl-C (SIGINT) to every process of the foreground group: the command and the
worker processes it started (grain's decoding workers, prepare's encoders). The command stops
on it with one line (`common.run`) and ends its workers; a worker that handled it too would
print a KeyboardInterrupt traceback of its own, or die before it is asked to stop.

multiprocessing's 'spawn' start method begins every worker by importing the command's main
module under the name `__mp_main__`. Each `python -m vpr_jax.X` module calls
`leave_ctrl_c_to_the_command(__name__)` before importing anything else, so that a worker
ignores SIGINT from its first import on, whichever thread of the command started it.
"""

import signal


def leave_ctrl_c_to_the_command(module_name: str) -> None:
  """In a worker spawned by a command (`module_name == '__mp_main__'`): ignore SIGINT."""
  if module_name == '__mp_main__':
    signal.signal(signal.SIGINT, signal.SIG_IGN)
