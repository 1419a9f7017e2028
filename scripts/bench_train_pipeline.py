"""Training speed, host pipeline alone: what the grain train iterator delivers, no device.

The training loop's grain iterator (`train_pipeline.make_train_iterator`, --workers processes)
over the original JPEGs and/or their prepared records (--sources; see `bench_train_data.py` for
where they come from), timed after warm-up batches; compared with the compute-only rate when
`bench_train.py --modes compute,pipeline` measures both.

  python scripts/bench_train_pipeline.py --configs configs/mixvpr.py --sources original,prepared \\
      --augment device --workers 16 --output pipeline.json

The same as `bench_train.py --modes pipeline`: same flags (but --modes), table and JSON.
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
import bench_common
import bench_train_common
import bench_train_data
# pylint: enable=g-import-not-at-top,wrong-import-position


def bench_pipeline(config, index, source, workers: int, warmup: int, batches: int,
                   seed: int = 0) -> dict:
  """img/s the grain train iterator delivers on the host (no device)."""
  startup, _, seconds = bench_common.time_iterator(
      functools.partial(bench_train_data.train_iterator, index, config, source, workers,
                        1 + warmup + batches, seed),
      warmup, batches)
  images = bench_train_common.batch_images(config)
  return {'img_per_s': images * batches / seconds, 'startup_seconds': startup,
          'workers': workers, 'augment': config.data.augment, 'batches': batches,
          'warmup': warmup,
          'batch': images}


def run_source(args, results, job) -> None:
  """The pipeline mode on one config x source: a row of results['end_to_end']."""
  out = bench_pipeline(job.config, job.index, job.source, args.workers,
                       *bench_train_data.data_steps(args), args.seed)
  row = bench_train_data.with_compute_ratio(
      {'label': f'{job.tag} pipeline', 'mode': 'pipeline', 'config': job.name,
       'source': job.source_name, **out}, job)
  results['end_to_end'].append(row)
  print(f'{row["label"]}: {bench_common.format_rate(out["img_per_s"])} img/s', flush=True)


def run(args, results, workdir) -> None:
  """The pipeline mode alone, on every config x source."""
  bench_train_data.run(args, results, workdir, [run_source])


def main(argv=None) -> dict:
  """Parses the command line, runs the pipeline mode, prints its table, writes --output."""
  args = bench_train_common.parse_args(argv, mode='pipeline', description=__doc__)
  return bench_train_common.run(args, [run])


if __name__ == '__main__':
  main()
