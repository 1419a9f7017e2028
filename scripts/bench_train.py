"""Training speed: vpr_jax's train step against the PyTorch reference, and the input feeding it.

Runs several modes in one process (--modes, comma-separated; default compute), so that the
data modes report their ratio to the compute-only rate measured in the same run. Each mode is a
script of its own, with the same flags (but --modes), which runs it alone:
  compute     bench_train_compute.py     the train step on device-resident random batches
              (FLOPs, memory, convolutions, --num_devices scaling) against the PyTorch reference
              (bench_train_reference.py: AMP fp16 eager, channels_last, + torch.compile)
  end_to_end  bench_train_end_to_end.py  JPEG files or prepared records -> grain -> prefetch ->
              the same step, as the training loop feeds it (also threaded: --threaded_prefetch)
  pipeline    bench_train_pipeline.py    the grain train iterator alone, no device
  augment     bench_train_augment.py     device RandAugment alone, on device-resident batches
  eval        bench_train_eval.py        descriptor extraction from prepared records
Their flags, defaults and the data they read: bench_train_common.py, bench_train_data.py.

  python scripts/bench_train.py --tiny                          # CPU smoke run (CI): all modes
  python scripts/bench_train.py --output bench_train.json       # compute: both recipes
  python scripts/bench_train.py --modes end_to_end,pipeline --configs configs/mixvpr.py \\
      --sources original,prepared --augment device --workers 16 --output e2e.json

Prints tables (config, batch, vpr_jax img/s, reference img/s, ratio; end-to-end against
compute-only) and writes everything to --output as JSON.
"""

import functools
import os
import sys

_SCRIPTS = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_SCRIPTS)
for _path in (_REPO, _SCRIPTS):
  if _path not in sys.path:
    sys.path.insert(0, _path)

# pylint: disable=g-import-not-at-top,wrong-import-position
import bench_train_augment
import bench_train_common
import bench_train_compute
import bench_train_data
import bench_train_end_to_end
import bench_train_eval
import bench_train_pipeline
# pylint: enable=g-import-not-at-top,wrong-import-position

MODES = bench_train_common.MODES
# The data modes run per config x source in this order, sharing one prepared copy.
_SOURCE_RUNS = (('pipeline', bench_train_pipeline.run_source),
                ('end_to_end', bench_train_end_to_end.run_source),
                ('eval', bench_train_eval.run_source))


def mode_runners(modes) -> list:
  """The runners of `modes`: compute, augment, then the data modes in one loop.

  Compute runs first because the data modes report their ratio to its rate.
  """
  runners = []
  if 'compute' in modes:
    runners.append(bench_train_compute.run)
  if 'augment' in modes:
    runners.append(bench_train_augment.run)
  source_runs = [run_source for mode, run_source in _SOURCE_RUNS if mode in modes]
  if source_runs:
    runners.append(functools.partial(bench_train_data.run, source_runs=source_runs))
  return runners


def parse_args(argv=None):
  """The command line: --modes and every flag of the mode scripts."""
  return bench_train_common.parse_args(argv, description=__doc__)


def main(argv=None) -> dict:
  """Parses the command line, runs the modes, prints their tables, writes --output."""
  args = parse_args(argv)
  return bench_train_common.run(args, mode_runners(args.modes))


if __name__ == '__main__':
  main()
