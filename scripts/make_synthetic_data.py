"""Writes a synthetic VPR dataset (training cities and benchmark splits) for demos and tests.

Example (the CPU demo's data, a few seconds):
  python scripts/make_synthetic_data.py --out /tmp/vpr_data --num-train-places 1000 \
      --num-eval-places 50 --image-size 64 64
then train with data.root=/tmp/vpr_data, data.cities=SynthA,SynthB, val_datasets=synthetic_val.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vpr_jax.data import synthetic  # noqa: E402  pylint: disable=g-import-not-at-top


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', required=True, help='output folder (the data root)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--num-train-places', type=int, default=1000)
  parser.add_argument('--images-per-place', type=int, default=4)
  parser.add_argument('--max-images-per-place', type=int, default=None,
                      help='if set, each training place gets a random count up to this')
  parser.add_argument('--num-sparse-places', type=int, default=0,
                      help='extra training places with fewer than --images-per-place images')
  parser.add_argument('--num-eval-places', type=int, default=50)
  parser.add_argument('--eval-database-per-place', type=int, default=2)
  parser.add_argument('--eval-queries-per-place', type=int, default=1)
  parser.add_argument('--image-size', type=int, nargs=2, default=(64, 64),
                      metavar=('HEIGHT', 'WIDTH'))
  parser.add_argument('--cities', nargs='+', default=list(synthetic.DEFAULT_CITIES))
  parser.add_argument('--layouts', nargs='+', default=list(synthetic.LAYOUTS),
                      choices=synthetic.LAYOUTS)
  parser.add_argument('--benchmark-splits', nargs='+', default=list(synthetic.BENCHMARK_SPLITS))
  parser.add_argument('--jpeg-quality', type=int, default=90)
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  start = time.perf_counter()
  summary = synthetic.make_synthetic_dataset(
      args.out, seed=args.seed, num_train_places=args.num_train_places,
      images_per_place=args.images_per_place, num_eval_places=args.num_eval_places,
      eval_queries_per_place=args.eval_queries_per_place,
      eval_database_per_place=args.eval_database_per_place, image_size=tuple(args.image_size),
      cities=tuple(args.cities), layouts=tuple(args.layouts),
      benchmark_splits=tuple(args.benchmark_splits),
      max_images_per_place=args.max_images_per_place, num_sparse_places=args.num_sparse_places,
      jpeg_quality=args.jpeg_quality)
  elapsed = time.perf_counter() - start
  report = {'root': summary['root'], 'seconds': round(elapsed, 2)}
  if summary['train']:
    report['train'] = {k: summary['train'][k] for k in
                       ('cities', 'num_places', 'num_images', 'gsv_cities_dir', 'gsv_xs_dir')}
  report['benchmarks'] = {
      split: {k: info[k] for k in ('dir', 'num_database', 'num_queries')}
      for split, info in summary['benchmarks'].items()}
  print(json.dumps(report, indent=1))


if __name__ == '__main__':
  main()
