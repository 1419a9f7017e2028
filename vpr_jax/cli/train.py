r"""Trains a VPR model: `python -m vpr_jax.train --config mixvpr --workdir runs/x`.

Any config field can be overridden on the command line, e.g.
  python -m vpr_jax.train --config mixvpr --config.optim.learning_rate=1e-3 \
      --data_root /data/vpr --workdir runs/mixvpr_lr1e-3

Running the same command again with the same --workdir resumes where it stopped (parameters,
optimiser, RNG and data order). Without --workdir a new folder
`<runs>/<config file stem>_<YYYYmmdd-HHMMSS>` is used, with <runs> = $VPR_RUNS_DIR or ./runs.

Several hosts: start one process per host with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID (or under SLURM / Open MPI), all with the same --workdir on a shared file system.
"""

import datetime
import os
import signal

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from vpr_jax import config_fields
from vpr_jax import parallel
from vpr_jax.checkpoints import runs
from vpr_jax.cli import common
from vpr_jax.training import loop

FLAGS = flags.FLAGS

flags.DEFINE_string(
    'workdir', None,
    'Run folder for checkpoints, metrics.jsonl and TensorBoard files; an existing one is resumed. '
    'Default: <$VPR_RUNS_DIR or ./runs>/<config stem>_<timestamp>.')
flags.DEFINE_string('data_root', None, 'Overrides config.data.root (default: $VPR_DATA_ROOT).')
config_flags.DEFINE_config_file(
    'config', None, 'Training configuration: a packaged config name (demo, mixvpr, gem, ...) or '
    'a configs/*.py file.', lock_config=True)
flags.mark_flags_as_required(['config'])


def default_workdir(config_path: str) -> str:
  """<runs dir>/<config file stem>_<YYYYmmdd-HHMMSS>."""
  stem = os.path.splitext(os.path.basename(config_path))[0] or 'run'
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  return os.path.join(runs.default_runs_dir(), f'{stem}_{stamp}')


def main(argv, hooks=()):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  # Before any other JAX call: joins the other processes of a multi-host launch.
  parallel.maybe_initialize_distributed()
  config = FLAGS.config
  config_fields.split_comma_separated(config)  # --config.data.cities=Bangkok,Barcelona
  if FLAGS.data_root is not None:
    config.data.root = FLAGS.data_root
  workdir = FLAGS.workdir
  if not workdir:
    if jax.process_count() > 1:
      raise app.UsageError('--workdir is required with several processes (they must share it).')
    workdir = default_workdir(config_flags.get_config_filename(FLAGS['config']))
  logging.info('JAX %s: process %d of %d, devices: %s', jax.__version__, jax.process_index(),
               jax.process_count(), jax.devices())
  if jax.process_index() == 0:
    print(f'Workdir: {workdir} (rerun with --workdir {workdir} to resume)', flush=True)
  # train_and_evaluate writes config.json into the workdir once it has checked that an existing
  # checkpoint there belongs to this configuration.
  summary = common.report_user_errors(loop.train_and_evaluate, config, workdir, hooks=hooks)
  if summary['stopped_by']:
    # Stopped by a signal, after saving: the shell's convention for a job ended by it.
    common.exit_with_status_after_a_signal(128 + signal.Signals[summary['stopped_by']].value)


def run():
  """Console entry point: accepts dashed flag names and config names, then runs `main`."""
  # The first SIGTERM / Ctrl-C saves and stops (training.preemption); this line is for a second
  # Ctrl-C, or one before the loop has started.
  common.run(main, interrupted='stopped at once, without saving; run the same command to resume '
             'from the last checkpoint.')


if __name__ == '__main__':
  run()
