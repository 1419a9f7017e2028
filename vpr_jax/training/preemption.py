"""Stopping a training loop cleanly on SIGTERM or SIGINT, on one process or on all of them.

SLURM, Kubernetes and preemptible GPU/TPU VMs send SIGTERM some seconds before they kill a job;
Ctrl-C sends SIGINT. Either should end the run after the current step with a checkpoint, not lose
every step since the last one. `StopRequest` records the first such signal instead of dying; the
loop asks `should_stop(step)` after each step and, when it says True, saves and returns:

  with preemption.StopRequest(check_every_steps=10) as stop:
    for step in range(start, num_steps):
      state = train_step(state, next(batches))
      if stop.should_stop(step + 1):
        save(step + 1)
        print(f'Stopped by {stop.signal_name} after step {step + 1}; ...resume with...')
        break

A second signal stops at once: the first one puts back the handlers that were installed before,
so the next one gets the signal's default action (SIGTERM ends the process, even in the middle of a
computation) or Python's SIGINT handler (KeyboardInterrupt).

Several processes: a signal usually reaches them at slightly different steps (or only some of
them), and they must all save the same step, or the checkpoint is inconsistent and the next
collective hangs. So with more than one JAX process, `should_stop` answers only every
`check_every_steps` steps, when all processes take the logical OR of their flags (one tiny
all-gather); in between it says False. One process: it answers at every step, without
communication.
"""

import signal
import sys
import threading
from typing import Any, Callable, Optional, Sequence, Union

import jax
from jax.experimental import multihost_utils
import numpy as np

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT)
Handler = Union[Callable[[int, Any], Any], int, None]


def any_process(flag: bool) -> bool:
  """The logical OR of `flag` over all JAX processes (every process must call it).

  Args:
    flag: this process's value.

  Returns:
    True if any process passed True. One process: `flag`, without communication.
  """
  if jax.process_count() == 1:
    return bool(flag)
  flags = multihost_utils.process_allgather(np.asarray([int(bool(flag))], np.int32))
  return bool(np.any(np.asarray(flags)))


class StopRequest:
  """Records the first SIGTERM / SIGINT while installed; a second one stops at once."""

  def __init__(self, check_every_steps: int = 1, signals: Sequence[int] = DEFAULT_SIGNALS,
               announce: Optional[Callable[[str], None]] = None):
    """Prepares the handlers; they are installed by `__enter__` (or `install`).

    Args:
      check_every_steps: with several processes, how often (in steps) they agree on stopping:
        the cost of one small all-gather against how many steps a stop may be delayed.
      signals: the signals to catch.
      announce: called with one line when the first signal arrives (default: print to stderr).
    """
    if int(check_every_steps) != check_every_steps or check_every_steps < 1:
      raise ValueError(f'check_every_steps must be a positive integer, got {check_every_steps!r}.')
    self.check_every_steps = int(check_every_steps)
    self.signals = tuple(signals)
    self._announce = announce or _print_to_stderr
    self._previous: dict[int, Handler] = {}
    self.signal_number: Optional[int] = None
    self.stop_step: Optional[int] = None

  @property
  def requested(self) -> bool:
    """Whether this process received a stop signal."""
    return self.signal_number is not None

  @property
  def signal_name(self) -> Optional[str]:
    """'SIGTERM' / 'SIGINT' of the first signal received (None before any)."""
    return None if self.signal_number is None else signal.Signals(self.signal_number).name

  def request(self, signal_number: int = signal.SIGTERM) -> None:
    """Asks for a stop as the signal would (a time limit, a test), without the announcement."""
    if self.signal_number is None:
      self.signal_number = int(signal_number)

  def should_stop(self, step: int) -> bool:
    """Whether the loop should save and stop after `step`; the same answer on every process.

    Call it after every step, on every process, with the same step.

    Args:
      step: the step just finished.

    Returns:
      True when a stop was requested (on any process, once they have agreed). The step is kept
      in `stop_step`.
    """
    if jax.process_count() == 1:
      stop = self.requested
    elif step % self.check_every_steps:
      stop = False
    else:
      stop = any_process(self.requested)
    if stop and self.stop_step is None:
      self.stop_step = int(step)
      if self.signal_number is None:  # Asked by another process.
        self.signal_number = int(signal.SIGTERM)
    return stop

  def install(self) -> 'StopRequest':
    """Installs the handlers (main thread only; signals ignored by the launcher stay ignored)."""
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError('StopRequest must be installed from the main thread (Python runs signal '
                         'handlers there).')
    for number in self.signals:
      previous = signal.getsignal(number)
      if previous == signal.SIG_IGN:  # e.g. SIGINT of a background job (`cmd &`, nohup).
        continue
      self._previous[number] = previous
      signal.signal(number, self._handle)
    return self

  def restore(self) -> None:
    """Puts back the handlers that were installed before."""
    previous, self._previous = self._previous, {}
    for number, handler in previous.items():
      signal.signal(number, signal.SIG_DFL if handler is None else handler)

  def __enter__(self) -> 'StopRequest':
    return self.install()

  def __exit__(self, *exc_info) -> None:
    self.restore()

  def _handle(self, number: int, frame: Any) -> None:
    del frame  # Unused.
    if self.signal_number is None:
      self.signal_number = number
    # Any further signal gets the handlers of before: the default action of SIGTERM ends the
    # process at once, even while it waits in a long computation; Python's SIGINT handler raises
    # KeyboardInterrupt.
    self.restore()
    self._announce(f'{signal.Signals(number).name} received: stopping after the current step '
                   'and saving a checkpoint (send it again to stop at once, without saving).')


def _print_to_stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)
