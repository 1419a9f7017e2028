"""Images per second of the training input pipeline (JPEG on disk -> uint8 batches), by workers.

Reads a training folder (--train-dir) or, by default, a small synthetic GSV-Cities set it writes
to a temporary folder, and times `train_pipeline.make_train_iterator` for each worker count:
decode + resize + RandAugment + batching, as in training (no accelerator involved).

  python scripts/bench_pipeline.py                                   # tiny smoke run
  python scripts/bench_pipeline.py --workers 0,2,4,8,16 --num-batches 50 \
      --source-size 480,640 --synthetic-places 200 --output bench.json
  python scripts/bench_pipeline.py --train-dir /data/gsv_cities --layout gsv_cities \
      --cities London,Boston --places-per-batch 100 --workers 16 --num-batches 30

The first batch of each run (worker start-up) and --warmup-batches more are not timed.
"""

import argparse
import math
import os
import platform
import sys
import tempfile
import time

from absl import flags

_SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_SCRIPTS))
sys.path.insert(0, _SCRIPTS)

# pylint: disable=g-import-not-at-top,wrong-import-position
import bench_common
from vpr_jax.configs import default
from vpr_jax.data import gsv_cities
from vpr_jax.data import synthetic
from vpr_jax.data import train_pipeline
# pylint: enable=g-import-not-at-top,wrong-import-position


def _workers(text):
  try:
    values = [int(v) for v in text.split(',') if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected comma-separated integers, got {text!r}') from None
  if not values or min(values) < -1:
    raise argparse.ArgumentTypeError(f'worker counts must be >= 0 (or -1), got {text!r}')
  return values


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--train-dir', default='',
                      help='training folder; empty: write a synthetic GSV-Cities set to a temp dir')
  parser.add_argument('--layout', default='gsv_cities', choices=gsv_cities.LAYOUTS)
  parser.add_argument('--cities', default='',
                      help='comma-separated cities; empty: every city in --train-dir')
  parser.add_argument('--workers', type=_workers, default=[0, 1, 2],
                      help='comma-separated grain worker counts to time (-1: one per core)')
  parser.add_argument('--num-batches', type=int, default=3, help='timed batches per run')
  parser.add_argument('--warmup-batches', type=int, default=1,
                      help='untimed batches after the first one')
  parser.add_argument('--places-per-batch', type=int, default=8)
  parser.add_argument('--images-per-place', type=int, default=4)
  parser.add_argument('--image-size', type=bench_common.parse_hw, default=(224, 224),
                      help='H,W fed to the model')
  parser.add_argument('--augment', default='randaugment', choices=('randaugment', 'none'))
  parser.add_argument('--prefetch', type=int, default=2, help='batches prefetched per worker')
  parser.add_argument('--synthetic-places', type=int, default=16,
                      help='places of the synthetic set')
  parser.add_argument('--source-size', type=bench_common.parse_hw, default=(240, 320),
                      help='H,W of the synthetic JPEGs (GSV-Cities images are 480,640)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--output', default='', help='also write the results to this JSON file')
  args = parser.parse_args(argv)
  if args.num_batches <= 0 or args.warmup_batches < 0:
    parser.error('--num-batches must be positive and --warmup-batches >= 0')
  return args


def time_pipeline(index, config, num_workers, num_batches, warmup_batches, seed=0):
  """Runs one iterator; returns its start-up time and timed images per second."""
  images_per_batch = config.data.places_per_batch * config.data.images_per_place
  startup, it, seconds = bench_common.time_iterator(
      lambda: train_pipeline.make_train_iterator(index, config, seed, num_workers=num_workers),
      warmup_batches, num_batches)
  return {
      'workers': it.num_workers,
      'startup_seconds': round(startup, 3),
      'seconds': round(seconds, 3),
      'batches': num_batches,
      'images': num_batches * images_per_batch,
      'images_per_second': round(num_batches * images_per_batch / seconds, 1),
  }


def run(args, train_dir):
  """Indexes `train_dir` and times every worker count; returns the JSON report."""
  cities = ([c for c in args.cities.split(',') if c] if args.cities
            else gsv_cities.available_cities(train_dir, args.layout))
  index = gsv_cities.build_place_index(train_dir, args.layout, cities, args.images_per_place)
  config = default.get_config()
  config.image_size = args.image_size
  data = config.data
  data.cities = tuple(cities)
  data.places_per_batch = args.places_per_batch
  data.images_per_place = args.images_per_place
  data.min_img_per_place = args.images_per_place
  data.augment = args.augment
  data.prefetch_buffer_size = args.prefetch
  steps = train_pipeline.steps_per_epoch(index, config)
  config.num_epochs = math.ceil((1 + args.warmup_batches + args.num_batches) / steps)
  print(gsv_cities.format_stats(index, args.places_per_batch, args.images_per_place))
  print()
  results = []
  for workers in args.workers:
    result = time_pipeline(index, config, workers, args.num_batches, args.warmup_batches,
                           args.seed)
    results.append(result)
    print(f'workers {result["workers"]:>3}: {result["images_per_second"]:10.1f} img/s '
          f'(start-up {result["startup_seconds"]:.1f} s)', flush=True)
  return {
      'train_dir': train_dir,
      'layout': args.layout,
      'synthetic': not args.train_dir,
      'source_size': list(args.source_size) if not args.train_dir else None,
      'num_places': index.num_places,
      'num_images': index.num_images,
      'image_size': list(args.image_size),
      'places_per_batch': args.places_per_batch,
      'images_per_place': args.images_per_place,
      'augment': args.augment,
      'num_batches': args.num_batches,
      'cpu_count': os.cpu_count(),
      'platform': platform.platform(),
      'results': results,
  }


def format_table(report):
  lines = [f'{"workers":>8} | {"img/s":>10} | {"start-up s":>10}', '-' * 34]
  for r in report['results']:
    lines.append(f'{r["workers"]:>8} | {r["images_per_second"]:>10.1f} | '
                 f'{r["startup_seconds"]:>10.1f}')
  return '\n'.join(lines)


def main(argv=None):
  args = parse_args(argv)
  # grain's worker processes read absl flags; this script parses its own arguments.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with tempfile.TemporaryDirectory(prefix='vpr_jax_bench_') as tmp:
    train_dir = args.train_dir
    if not train_dir:
      if args.layout != 'gsv_cities':
        raise SystemExit('--layout gsv_xs needs --train-dir (the synthetic set is GSV-Cities).')
      needed = args.places_per_batch
      places = max(args.synthetic_places, needed)
      start = time.perf_counter()
      summary = synthetic.make_training_places(
          tmp, seed=args.seed, num_train_places=places, images_per_place=args.images_per_place,
          image_size=args.source_size, layouts=('gsv_cities',))
      train_dir = summary['gsv_cities_dir']
      print(f'Wrote {summary["num_images"]} synthetic {args.source_size[0]}x'
            f'{args.source_size[1]} JPEGs in {time.perf_counter() - start:.1f} s.')
    report = run(args, train_dir)
  print()
  print(format_table(report))
  if args.output:
    bench_common.write_json(args.output, report)
  return report


if __name__ == '__main__':
  main()
