r"""Starts several JAX processes on this machine, as a multi-host launch would start one per host.

Each process gets JAX_COORDINATOR_ADDRESS (127.0.0.1 and a free port), JAX_NUM_PROCESSES and
JAX_PROCESS_ID, which `vpr_jax.parallel.maybe_initialize_distributed` reads, and by default runs
on CPU devices (`--devices_per_process` virtual devices each; CPU collectives go through gloo):

  python scripts/launch_multihost_local.py --num_processes 2 --devices_per_process 2 -- \
      python -m vpr_jax.train --config configs/demo.py --workdir /tmp/multihost_demo

Output lines are prefixed with the process index; with --log_dir each process also writes
<log_dir>/process_<i>.log. When a process fails, the others are stopped. The exit status is that
of the first process that failed (0 when all succeed).
"""

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Optional, Sequence


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def process_env(process_id: int, num_processes: int, port: int, devices_per_process: int,
                platform: str = 'cpu', base_env: Optional[dict] = None) -> dict:
  """The environment of one process of a local multi-process launch.

  Args:
    process_id: this process's index.
    num_processes: processes in the launch.
    port: the coordinator's port on 127.0.0.1 (process 0 serves it).
    devices_per_process: virtual CPU devices per process (platform 'cpu' only).
    platform: JAX_PLATFORMS value; '' keeps the environment's.
    base_env: environment to start from (default os.environ).

  Returns:
    The environment dict.
  """
  env = dict(os.environ if base_env is None else base_env)
  env.update(JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES=str(num_processes),
             JAX_PROCESS_ID=str(process_id))
  if platform:
    env['JAX_PLATFORMS'] = platform
  if platform == 'cpu':
    flags = [f for f in env.get('XLA_FLAGS', '').split()
             if not f.startswith('--xla_force_host_platform_device_count')]
    env['XLA_FLAGS'] = ' '.join(
        flags + [f'--xla_force_host_platform_device_count={devices_per_process}'])
  return env


def _pump(stream, prefix: str, log_path: Optional[str]):
  log = open(log_path, 'w') if log_path else None
  try:
    for line in iter(stream.readline, ''):
      sys.stdout.write(prefix + line)
      sys.stdout.flush()
      if log:
        log.write(line)
        log.flush()
  finally:
    if log:
      log.close()


def launch(command: Sequence[str], num_processes: int = 2, devices_per_process: int = 2,
           platform: str = 'cpu', log_dir: Optional[str] = None, timeout: Optional[float] = None,
           cwd: Optional[str] = None, env: Optional[dict] = None) -> int:
  """Runs `command` as `num_processes` coordinated JAX processes and waits for them.

  Args:
    command: the program and its arguments, the same for every process.
    num_processes: processes to start.
    devices_per_process: virtual CPU devices per process.
    platform: JAX_PLATFORMS for the processes ('' to keep the environment's).
    log_dir: also write each process's output to <log_dir>/process_<i>.log.
    timeout: seconds before all processes are killed (None: no limit).
    cwd: working directory of the processes.
    env: base environment (default os.environ).

  Returns:
    0 if every process succeeded, else the exit status of the first that failed (-9 after a
    timeout).
  """
  if num_processes < 1:
    raise ValueError(f'num_processes must be >= 1, got {num_processes}.')
  if log_dir:
    os.makedirs(log_dir, exist_ok=True)
  port = free_port()
  procs, pumps = [], []
  for i in range(num_processes):
    proc = subprocess.Popen(
        list(command), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=process_env(i, num_processes, port, devices_per_process, platform, env))
    log_path = os.path.join(log_dir, f'process_{i}.log') if log_dir else None
    pump = threading.Thread(target=_pump, args=(proc.stdout, f'[{i}] ', log_path), daemon=True)
    pump.start()
    procs.append(proc)
    pumps.append(pump)

  deadline = None if timeout is None else time.monotonic() + timeout
  status = 0
  running = list(procs)
  while running:
    for proc in list(running):
      code = proc.poll()
      if code is None:
        continue
      running.remove(proc)
      if code != 0 and status == 0:
        status = code
        # A process that failed leaves the others waiting in a collective: stop them.
        for other in running:
          other.terminate()
    if deadline is not None and time.monotonic() > deadline and running:
      for proc in running:
        proc.kill()
      status = status or -9
    time.sleep(0.1)
  for pump in pumps:
    pump.join(timeout=5)
  return status


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--num_processes', type=int, default=2)
  parser.add_argument('--devices_per_process', type=int, default=2,
                      help='Virtual CPU devices per process.')
  parser.add_argument('--platform', default='cpu',
                      help="JAX_PLATFORMS of the processes; '' keeps the environment's.")
  parser.add_argument('--log_dir', default='', help='Also write process_<i>.log files here.')
  parser.add_argument('--timeout', type=float, default=None, help='Seconds before giving up.')
  parser.add_argument('command', nargs=argparse.REMAINDER,
                      help='The command every process runs, after "--".')
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ['--'] else args.command
  if not command:
    parser.error('no command given; put it after "--".')
  return launch(command, args.num_processes, args.devices_per_process, args.platform,
                args.log_dir or None, args.timeout)


if __name__ == '__main__':
  sys.exit(main())
