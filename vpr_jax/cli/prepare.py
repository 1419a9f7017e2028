r"""Prepares the training images once: a TFDS dataset of resized JPEGs with their places.

  python -m vpr_jax.prepare --config configs/mixvpr.py --out /data/vpr/tfds \
      [--data_root /data/vpr] [--image_size 224,224 | --short_side 256] [--quality 95] \
      [--num_workers 16]

  python -m vpr_jax.prepare --config configs/mixvpr.py --out /data/vpr/tfds \
      --benchmark sf_xs_val,tokyo_xs [--image_size 320,320]

Reads the training places of the config (data.train_dir, data.train_layout, data.cities,
data.min_img_per_place), builds them as a `vpr_training_set` TFDS dataset under --out (the TFDS
data folder; layout and fields in `vpr_jax.data.tfds`), reports images/s and prints, as
its last line, the folder of the built dataset (the one holding dataset_info.json, which
`tfds.builder_from_directory` opens). Train from it with `--config.data.prepared_dir=<folder>`.
The default size is the config's image_size, so the train transform's resize becomes a no-op.
The dataset appears only when complete (an interrupted run leaves nothing and starts over); a
dataset already built with the same settings is reused unless --overwrite.

With --benchmark, builds evaluation sets instead (`vpr_benchmark`: database and queries splits
with UTM coordinates and positives within config data.positive_radius_m), one per name or split
folder, the image files as they are unless --image_size or --short_side is given; each built
folder is printed on a line of its own, last.
"""

import os
import time
from typing import Sequence

from absl import flags
from ml_collections import config_flags

from vpr_jax import config_fields
from vpr_jax import fileio
from vpr_jax.cli import common
from vpr_jax.data.evaluation import benchmarks
from vpr_jax.data.evaluation import catalog
from vpr_jax.data.training import gsv_cities
from vpr_jax.data.imaging import images
from vpr_jax.data import roots
from vpr_jax.data.tfds import benchmark_set
from vpr_jax.data.tfds import records
from vpr_jax.data.tfds import training_set
from vpr_jax.data.multiprocess import workers
from vpr_jax.errors import ConfigError

FLAGS = flags.FLAGS
DEFAULT_RECORDS_PER_SHARD = 50_000

config_flags.DEFINE_config_file('config', None, 'Training configuration file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('out', None, 'TFDS data folder to build the dataset under (absolute, or '
                    'relative to the current directory).')
flags.DEFINE_string('data_root', None, 'Overrides config.data.root (default: $VPR_DATA_ROOT).')
flags.DEFINE_list('image_size', None, 'H,W to resize every image to (default: the config\'s '
                  'image_size).')
flags.DEFINE_integer('short_side', None, 'Resize the shorter side to this (aspect ratio kept) '
                     'instead of to a fixed H,W.')
flags.DEFINE_integer('quality', images.DEFAULT_QUALITY, 'JPEG quality (1..100).')
flags.DEFINE_enum('subsampling', '4:2:0', sorted(images.SUBSAMPLING), 'JPEG chroma subsampling.')
flags.DEFINE_integer('num_workers', -1, 'Decoding/encoding processes; -1: one per CPU core; 0: '
                     'this process only.')
flags.DEFINE_integer('records_per_shard', DEFAULT_RECORDS_PER_SHARD,
                     'Images per ArrayRecord file (at most; the files hold equal shares).')
flags.DEFINE_list('benchmark', None, 'Build these benchmark sets (registered names or split '
                  'folders) instead of the training set.')
flags.DEFINE_bool('overwrite', False, 'Build again when a dataset with the same settings is '
                  'already built under --out.')
flags.mark_flags_as_required(['config', 'out'])


def _check_side_bound(sizes, what: str) -> None:
  """Refuses a side above records.MAX_IMAGE_SIDE: every worker would hold such images whole."""
  if max(sizes) > records.MAX_IMAGE_SIDE:
    raise ConfigError(
        f'{what} must be at most {records.MAX_IMAGE_SIDE} pixels a side (the bound on prepared '
        f'images: one RGB image of that size already takes '
        f'{records.MAX_IMAGE_SIDE ** 2 * 3 / 2**20:.0f} MiB in every worker), got '
        f'{",".join(str(s) for s in sizes)}.')


def parse_image_size(values) -> tuple[int, int]:
  """['224', '224'] -> (224, 224); a ConfigError naming the value otherwise."""
  try:
    size = tuple(int(v) for v in values)
  except (TypeError, ValueError):
    size = ()
  if len(size) != 2 or min(size) <= 0:
    raise ConfigError(f'--image_size must be H,W (two positive integers), got '
                               f'{",".join(str(v) for v in values)!r}.')
  _check_side_bound(size, '--image_size')
  return size


def config_image_size(config) -> tuple[int, int]:
  """The config's image_size as (H, W); a ConfigError naming the value otherwise."""
  value = config.image_size
  try:
    size = tuple(int(v) for v in value)
  except (TypeError, ValueError):
    size = ()
  if len(size) != 2 or min(size) <= 0 or size != tuple(value):
    raise ConfigError(f'config image_size must be (H, W), two positive integers, got '
                               f'{value!r}; set it or pass --image_size / --short_side.')
  _check_side_bound(size, 'config image_size')
  return size


def check_arguments(short_side, quality, num_workers, records_per_shard) -> None:
  """Checks the numeric flags before any work; ConfigError names the flag and value."""
  if short_side is not None and short_side <= 0:
    raise ConfigError(f'--short_side must be a positive integer, got {short_side}.')
  if short_side is not None:
    _check_side_bound((short_side,), '--short_side')
  if not 1 <= quality <= 100:
    raise ConfigError(f'--quality must be in 1..100, got {quality}.')
  if num_workers < -1:
    raise ConfigError(f'--num_workers must be -1 (one per CPU core), 0 (this process '
                               f'only) or a positive number, got {num_workers}.')
  if records_per_shard <= 0:
    raise ConfigError(f'--records_per_shard must be a positive integer, got '
                               f'{records_per_shard}.')


def prepare_from_flags(argv) -> None:
  """What `main` does: checks every argument, indexes the training places, prepares them."""
  if len(argv) > 1:
    raise ConfigError(f'unexpected arguments: {" ".join(argv[1:])}.')
  config = FLAGS.config
  config_fields.split_comma_separated(config)
  if FLAGS.image_size is not None and FLAGS.short_side is not None:
    raise ConfigError('give --image_size or --short_side, not both.')
  check_arguments(FLAGS.short_side, FLAGS.quality, FLAGS.num_workers, FLAGS.records_per_shard)
  short_side = FLAGS.short_side
  image_size = None
  if FLAGS.image_size is not None:
    image_size = parse_image_size(FLAGS.image_size)
  elif short_side is None and not FLAGS.benchmark:
    image_size = config_image_size(config)
  out = fileio.check_output_folder(FLAGS.out, '--out')
  data_root = roots.resolve_data_root(
      FLAGS.data_root if FLAGS.data_root is not None else config.data.root)
  num_workers = workers.resolve_num_workers(FLAGS.num_workers, '--num_workers')
  encoding = records.ImageEncoding(image_size=image_size, short_side=short_side,
                                         quality=FLAGS.quality, subsampling=FLAGS.subsampling)
  if FLAGS.benchmark:
    prepare_benchmarks(FLAGS.benchmark, data_root, out, encoding,
                       float(config.data.positive_radius_m), num_workers,
                       config.data.get('ground_truth_dir', ''))
    return
  train_dir = roots.resolve_under(data_root, config.data.train_dir)
  index = gsv_cities.build_place_index(
      train_dir, config.data.train_layout, tuple(config.data.cities),
      int(config.data.min_img_per_place), cache_dir=config.data.cache_dir,
      rebuild=bool(config.data.rebuild_index))
  layout, cities = config.data.train_layout, tuple(config.data.cities)
  min_img_per_place = int(config.data.min_img_per_place)
  name = training_set.training_set_name(layout, cities, min_img_per_place, encoding)
  folder = training_set.training_set_folder(out, name)
  if os.path.isfile(os.path.join(folder, 'dataset_info.json')) and not FLAGS.overwrite:
    training_set.check_built_from(folder, index)
    print('Already built with these settings (--overwrite builds it again).', flush=True)
  else:
    print(f'Preparing {index.num_images} images of {index.num_places} places from {train_dir} '
          f'with {num_workers} workers.', flush=True)
    start = time.perf_counter()
    folder = training_set.build_training_set(
        train_dir, out, layout=layout, cities=cities, min_img_per_place=min_img_per_place,
        encoding=encoding, name=name, num_workers=num_workers,
        num_shards=-(-index.num_images // FLAGS.records_per_shard), overwrite=FLAGS.overwrite)
    seconds = time.perf_counter() - start
    meta, _ = records.read_npz(os.path.join(folder, training_set.PLACE_INDEX_FILE))
    print(f'Done: {index.num_images} images ({len(meta["bad_images"])} unreadable) in '
          f'{seconds:.1f} s, {index.num_images / seconds:.0f} images/s.', flush=True)
  # Last line: the built dataset, for --config.data.prepared_dir and tfds.builder_from_directory.
  print(folder, flush=True)


def prepare_benchmarks(names: Sequence[str], data_root: str, out: str,
                       encoding: records.ImageEncoding, radius_m: float,
                       num_workers: int, ground_truth_dir: str = '') -> None:
  """Builds each benchmark of `names` under `out`; prints the built folders last, one a line.

  Args:
    names: registered benchmark names, groups or split folders (`catalog.expand_names`).
    data_root: the data root the names are resolved under.
    out: the TFDS data folder to build under.
    encoding: how the images are stored.
    radius_m: positive radius in metres (when the ground truth comes from the file names).
    num_workers: processes reading and encoding images; 0 works in this process.
    ground_truth_dir: the family's list files (config data.ground_truth_dir).
  """
  # Every set is read and checked (lists included) before the first build.
  splits = [benchmarks.load_benchmark(name, data_root, radius_m=radius_m, use_cache=False,
                                      ground_truth_dir=ground_truth_dir)
            for name in catalog.expand_names(names, data_root, ground_truth_dir)]
  folders = []
  for split in splits:
    name, split_dir = split.name, split.root
    config_name = benchmark_set.benchmark_name(split_dir, radius_m, encoding, split)
    folder = benchmark_set.benchmark_folder(out, config_name)
    if os.path.isfile(os.path.join(folder, 'dataset_info.json')) and not FLAGS.overwrite:
      print(f'{name}: already built with these settings (--overwrite builds it again).',
            flush=True)
    else:
      print(f'{name}: building from {split_dir} with {num_workers} workers.', flush=True)
      start = time.perf_counter()
      folder = benchmark_set.build_benchmark(split_dir, out, encoding=encoding,
                                             radius_m=radius_m, name=config_name,
                                             num_workers=num_workers, overwrite=FLAGS.overwrite,
                                             benchmark=split)
      seconds = time.perf_counter() - start
      split, _ = benchmark_set.open_benchmark(folder)
      meta, _ = records.read_npz(os.path.join(folder, benchmark_set.BENCHMARK_FILE))
      num_images = split.num_database + split.num_queries
      num_bad = sum(len(bad) for bad in meta['bad_images'].values())
      print(f'{name}: {num_images} images ({num_bad} unreadable) in {seconds:.1f} s, '
            f'{num_images / seconds:.0f} images/s.', flush=True)
    folders.append(folder)
  # Last lines: the built datasets, for tfds.builder_from_directory / open_benchmark.
  for folder in folders:
    print(folder, flush=True)


def main(argv):
  # Mistakes in the input (flags, config, data) end with one line and status 1, no traceback.
  common.report_user_errors(prepare_from_flags, argv)


def run():
  """Console entry point: accepts dashed flag names, then runs `main` under absl."""
  common.run(main, interrupted='nothing was built (a dataset appears only when complete); run '
             'the same command to start over.', sigterm_as_interrupt=True)


if __name__ == '__main__':
  run()
