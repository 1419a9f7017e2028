"""Training speed end to end: files -> grain -> device -> the train step, as training runs.

JPEG files (or the records of a prepared TFDS dataset; --sources, see `bench_train_data.py`) ->
grain train iterator (`train_pipeline.make_train_iterator`, --workers processes) ->
`parallel.prefetch` -> the train step, as `loop.train_and_evaluate` feeds it; also with the
transfer in a background thread (--threaded_prefetch). Compared with the compute-only rate when
`bench_train.py --modes compute,end_to_end` measures both.

  python scripts/bench_train_end_to_end.py --configs configs/mixvpr.py \\
      --sources original,prepared --augment device --workers 16 --output e2e.json

The same as `bench_train.py --modes end_to_end`: same flags (but --modes), table and JSON.
"""

import os
import queue
import sys
import threading
import time

_SCRIPTS = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_SCRIPTS)
for _path in (_REPO, _SCRIPTS):
  if _path not in sys.path:
    sys.path.insert(0, _path)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np

import bench_common
import bench_train_common
import bench_train_data
from vpr_jax import parallel
# pylint: enable=g-import-not-at-top,wrong-import-position


_END = object()


class _Failure:
  """An exception of the producer thread, handed to the consumer to raise."""

  def __init__(self, error):
    self.error = error


class _Producer:
  """The background side of `threaded_prefetch`: next host batch + transfer, into a queue."""

  def __init__(self, iterator, put, size: int):
    self.items = queue.Queue(maxsize=size)
    self.stop = threading.Event()
    self._iterator = iterator
    self._put = put

  def _hand_over(self, value) -> bool:
    """Queues `value`; False once the consumer has stopped."""
    # Gives up once the consumer has stopped, so the thread never blocks on a full queue.
    while not self.stop.is_set():
      try:
        self.items.put(value, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def __call__(self):
    """The thread's body: every item of the iterator, then the end (or the failure)."""
    try:
      for item in self._iterator:
        if not self._hand_over(self._put(item)):
          return
      self._hand_over(_END)
    except BaseException as e:  # pylint: disable=broad-except
      self._hand_over(_Failure(e))


def threaded_prefetch(iterator, put, size: int = 2):
  """`parallel.prefetch` with the host side (next batch + transfer) in a background thread."""
  producer = _Producer(iterator, put, size)
  thread = threading.Thread(target=producer, daemon=True)
  thread.start()
  try:
    while True:
      value = producer.items.get()
      if value is _END:
        return
      if isinstance(value, _Failure):
        raise value.error
      yield value
  finally:
    producer.stop.set()
    thread.join(timeout=10)


def _device_batches(iterator, dp, threaded: bool):
  """The loop's own feed: flattened place batches (each with the iterator state after it)."""
  put = lambda item: dp.shard_batch(item[0])
  size = 2 if jax.default_backend() != 'cpu' else 1
  if threaded:
    return threaded_prefetch(parallel.host_batches(iterator), put, size=size)
  return parallel.prefetch(parallel.host_batches(iterator), put, size=size)


def _compiled_state(config, programs, seed: int, step_rng):
  """A fresh state after one step on a random batch: the step is compiled by then."""
  dp = programs.dp
  state = bench_train_common.initial_state(config, programs, seed)
  state, metrics = programs.train_step(
      state, dp.shard_batch(bench_train_common.random_batch(config, np.random.default_rng(seed))),
      step_rng)
  bench_common.block((state, metrics))
  return state


def bench_end_to_end(config, index, source, workers: int, warmup: int, steps: int,
                     seed: int = 0, threaded: bool = False, devices=None) -> dict:
  """img/s of training from files: grain iterator -> prefetch to device -> the train step."""
  programs = bench_train_common.step_programs(config, devices or jax.devices())
  step_rng = jax.random.PRNGKey(seed + 1)
  # Compiled before the workers start: otherwise they fill their buffers during the compile and
  # the timed steps read those instead of waiting for the pipeline.
  state = _compiled_state(config, programs, seed, step_rng)
  wait = 0.0
  with bench_train_data.train_iterator(index, config, source, workers, 1 + warmup + steps,
                                       seed) as it:
    device_batches = _device_batches(it, programs.dp, threaded)
    start = time.perf_counter()
    for _ in range(1 + warmup):
      state, metrics = programs.train_step(state, next(device_batches), step_rng)
    bench_common.block((state, metrics))
    warmup_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
      before = time.perf_counter()
      batch = next(device_batches)
      wait += time.perf_counter() - before
      state, metrics = programs.train_step(state, batch, step_rng)
    bench_common.block((state, metrics))
    seconds = time.perf_counter() - start
    device_batches.close()
  metrics = jax.device_get(programs.dp.to_host(metrics))
  images = bench_train_common.batch_images(config)
  return {
      'img_per_s': images * steps / seconds,
      'seconds_per_step': seconds / steps,
      'host_wait_seconds_per_step': wait / steps,
      'warmup_seconds': warmup_seconds,
      'warmup': warmup,
      'batch': images,
      'workers': workers,
      'augment': config.data.augment,
      'threaded_prefetch': threaded,
      'finite': float(metrics['finite']) == 1.0,
      'steps': steps,
  }


def run_source(args, results, job) -> None:
  """The end_to_end mode on one config x source (and threaded): rows of results['end_to_end']."""
  for threaded in ([False, True] if args.threaded_prefetch else [False]):
    out = bench_end_to_end(job.config, job.index, job.source, args.workers,
                           *bench_train_data.data_steps(args), args.seed, threaded=threaded,
                           devices=job.devices)
    row = bench_train_data.with_compute_ratio(
        {'label': f'{job.tag} train' + (' threaded' if threaded else ''),
         'mode': 'end_to_end', 'config': job.name, 'source': job.source_name, **out}, job)
    results['end_to_end'].append(row)
    print(f'{row["label"]}: {bench_common.format_rate(out["img_per_s"])} img/s (host wait '
          f'{out["host_wait_seconds_per_step"] * 1e3:.1f} ms/step)', flush=True)


def run(args, results, workdir) -> None:
  """The end_to_end mode alone, on every config x source."""
  bench_train_data.run(args, results, workdir, [run_source])


def main(argv=None) -> dict:
  """Parses the command line, runs the end_to_end mode, prints its table, writes --output."""
  args = bench_train_common.parse_args(argv, mode='end_to_end', description=__doc__)
  return bench_train_common.run(args, [run])


if __name__ == '__main__':
  main()
