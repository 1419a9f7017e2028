"""Training speed of device RandAugment alone, on device-resident batches.

`device_augment.rand_augment` (jitted, the config's RandAugment ops and magnitude) on one random
uint8 batch of the config's P x K images, kept on the device: the first call compiles, then
warm-up and timed calls ending in block_until_ready.

  python scripts/bench_train_augment.py --configs configs/mixvpr.py --output augment.json

The same as `bench_train.py --modes augment`: same flags (but --modes), lines and JSON.
"""

import functools
import os
import sys
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
from vpr_jax.data.augmentation import device_augment
# pylint: enable=g-import-not-at-top,wrong-import-position


def bench_device_augment(config, batch_size: int, warmup: int, steps: int, seed: int = 0) -> dict:
  """img/s of `device_augment.rand_augment` alone (jitted) on a device-resident batch."""
  data = config.data
  h, w = (int(s) for s in config.image_size)
  augment = jax.jit(functools.partial(
      device_augment.rand_augment, num_ops=int(data.randaugment_num_ops),
      magnitude=int(data.randaugment_magnitude),
      num_magnitude_bins=int(data.randaugment_num_magnitude_bins)))
  rng = np.random.default_rng(seed)
  images = jax.device_put(rng.integers(0, 256, (batch_size, h, w, 3), dtype=np.uint8))
  keys = [jax.random.PRNGKey(i) for i in range(2)]
  start = time.perf_counter()
  bench_common.block(augment(images, keys[0]))
  compile_seconds = time.perf_counter() - start
  for i in range(warmup):
    bench_common.block(augment(images, keys[i % 2]))
  start = time.perf_counter()
  outs = [augment(images, keys[i % 2]) for i in range(steps)]
  bench_common.block(outs)
  seconds = time.perf_counter() - start
  return {'img_per_s': batch_size * steps / seconds, 'seconds_per_batch': seconds / steps,
          'batch': batch_size, 'compile_seconds': compile_seconds,
          'num_ops': int(data.randaugment_num_ops)}


def run(args, results, workdir) -> None:
  """The augment mode: one row of results['augment'] per config."""
  del workdir  # device-resident random batches: no files
  for path in args.configs:
    name = bench_train_common.config_name(path)
    config = bench_train_common.bench_config(path, args, 'device')
    batch = bench_train_common.batch_images(config)
    out = bench_device_augment(config, batch, args.warmup, args.steps, args.seed)
    results['augment'].append({'label': name, 'config': name,
                               'image_size': list(config.image_size), **out})
    print(f'{name}: device RandAugment alone {bench_common.format_rate(out["img_per_s"])} img/s '
          f'(batch {batch})', flush=True)


def main(argv=None) -> dict:
  """Parses the command line, runs the augment mode, prints its lines, writes --output."""
  args = bench_train_common.parse_args(argv, mode='augment', description=__doc__)
  return bench_train_common.run(args, [run])


if __name__ == '__main__':
  main()
