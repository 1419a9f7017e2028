"""Descriptor extraction speed from prepared records: grain decode -> `make_embed_fn`.

The prepared TFDS records of the training images (--sources prepared; see `bench_train_data.py`
for where they come from) decoded by grain (--workers processes) in batches of
--eval_batch_size and embedded by `descriptors.make_embed_fn`; the first batch compiles, then
--eval_batches timed ones. (scripts/bench_eval.py times the eval forward on device-resident
batches, and FAISS search.)

  python scripts/bench_train_eval.py --configs configs/mixvpr.py --workers 16 --output eval.json

The same as `bench_train.py --modes eval`: same flags (but --modes), lines and JSON.
"""

import os
import sys
import time

_SCRIPTS = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_SCRIPTS)
for _path in (_REPO, _SCRIPTS):
  if _path not in sys.path:
    sys.path.insert(0, _path)

# pylint: disable=g-import-not-at-top,wrong-import-position
import grain
import jax
import numpy as np

import bench_common
import bench_train_common
import bench_train_data
from vpr_jax.evaluation import descriptors
from vpr_jax.models import vpr_model
# pylint: enable=g-import-not-at-top,wrong-import-position


def _record_batches(source, batch_size: int, workers: int, num_batches: int):
  """An iterator of `num_batches` + 1 decoded batches of the records (cycled if too few)."""
  needed = (1 + num_batches) * batch_size
  records = np.arange(needed) % len(source)
  dataset = (grain.MapDataset.source(records.tolist()).map(source.load_array)
             .batch(batch_size, drop_remainder=True))
  iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=2,
                                                           prefetch_buffer_size=2))
  if workers > 0:
    iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=2))
  return iter(iter_dataset)


def bench_eval_prepared(config, source, batch_size: int, workers: int, num_batches: int,
                        seed: int = 0) -> dict:
  """img/s of descriptor extraction reading prepared records (decode in grain workers)."""
  model = vpr_model.build_model(config)
  variables = jax.device_put(vpr_model.init_variables(model, jax.random.PRNGKey(seed)),
                             jax.local_devices()[0])
  embed = descriptors.make_embed_fn(model)
  iterator = _record_batches(source, batch_size, workers, num_batches)
  try:
    start = time.perf_counter()
    bench_common.block(embed(variables, next(iterator)))
    first_seconds = time.perf_counter() - start
    start = time.perf_counter()
    outs = [embed(variables, batch) for batch in iterator]
    bench_common.block(outs)
    seconds = time.perf_counter() - start
  finally:
    close = getattr(iterator, 'close', None)
    if close is not None:
      close()
  images = len(outs) * batch_size
  return {'img_per_s': images / seconds, 'images': images, 'batch': batch_size,
          'workers': workers, 'first_batch_seconds': first_seconds,
          'dtype': str(np.dtype(vpr_model.resolve_dtype(config.model.dtype)))}


def run_source(args, results, job) -> None:
  """The eval mode on one config x source: a row of results['eval'] (prepared records only)."""
  if job.source_name != 'prepared':
    return
  out = bench_eval_prepared(job.config, job.source, args.eval_batch_size, args.workers,
                            args.eval_batches, args.seed)
  results['eval'].append({'label': f'{job.name} prepared eval/{args.workers}w',
                          'config': job.name, **out})
  print(f'{job.name}: descriptors from prepared records '
        f'{bench_common.format_rate(out["img_per_s"])} img/s', flush=True)


def run(args, results, workdir) -> None:
  """The eval mode alone, on every config x source."""
  bench_train_data.run(args, results, workdir, [run_source])


def main(argv=None) -> dict:
  """Parses the command line, runs the eval mode, prints its lines, writes --output."""
  args = bench_train_common.parse_args(argv, mode='eval', description=__doc__)
  return bench_train_common.run(args, [run])


if __name__ == '__main__':
  main()
