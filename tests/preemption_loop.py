"""A stand-in training loop for the preemption tests: steps that print, a save that writes a marker.

  python -m tests.preemption_loop MARKER_DIR [--slow_save] [--signal_self_at=PROCESS:STEP]
      [--check_every_steps=N]

Each step prints `begin <k>`, works for 0.1 s and prints `end <k>`. When `StopRequest.should_stop`
says so, the "save" writes MARKER_DIR/process_<i>.txt = `saved at step <k>` (after 60 s with
--slow_save, to leave time for a second signal) and the program returns normally. With several
JAX processes (scripts/launch_multihost_local.py), process PROCESS sends itself SIGTERM during
step STEP.
"""

import argparse
import os
import signal
import sys
import time

from vpr_jax import parallel
from vpr_jax.training import preemption

MAX_STEPS = 600


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('marker_dir')
  parser.add_argument('--slow_save', action='store_true')
  parser.add_argument('--signal_self_at', default='')
  parser.add_argument('--check_every_steps', type=int, default=1)
  args = parser.parse_args()
  parallel.maybe_initialize_distributed()
  import jax  # pylint: disable=g-import-not-at-top
  process = jax.process_index()
  signal_process, signal_step = (map(int, args.signal_self_at.split(':')) if args.signal_self_at
                                 else (-1, -1))
  with preemption.StopRequest(check_every_steps=args.check_every_steps) as stop:
    for step in range(1, MAX_STEPS + 1):
      print(f'begin {step}', flush=True)
      if process == signal_process and step == signal_step:
        os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.1)
      print(f'end {step}', flush=True)
      if stop.should_stop(step):
        if args.slow_save:
          print('saving', flush=True)
          time.sleep(60)
        with open(os.path.join(args.marker_dir, f'process_{process}.txt'), 'w') as f:
          f.write(f'saved at step {step}')
        print(f'Stopped by {stop.signal_name} after step {step}.', flush=True)
        return
  print('finished', flush=True)


if __name__ == '__main__':
  sys.exit(main())
