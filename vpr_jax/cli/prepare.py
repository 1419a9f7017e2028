r"""Prepares the training images once: resized JPEGs in ArrayRecord shards + a place index.

  python -m vpr_jax.prepare --config configs/mixvpr.py --out /data/vpr/gsv_cities_224 \
      [--data_root /data/vpr] [--image_size 224,224 | --short_side 256] [--quality 95] \
      [--num_workers 16]

Reads the training places of the config (data.train_dir, data.train_layout, data.cities,
data.min_img_per_place), writes them to --out (layout in `vpr_jax.data.prepared`) and reports
images/s. Train from it with `--config.data.prepared_dir=<out>`. The default size is the
config's image_size, so the train transform's resize becomes a no-op. An interrupted run resumes
when started again with the same arguments; the output folder appears only when complete.
"""


from absl import app
from absl import flags
from ml_collections import config_flags

from vpr_jax.cli import common
from vpr_jax.data import gsv_cities
from vpr_jax.data import prepared
from vpr_jax.data import roots
from vpr_jax.data import workers

FLAGS = flags.FLAGS

config_flags.DEFINE_config_file('config', None, 'Training configuration file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('out', None, 'Prepared data folder to create (absolute, or relative to the '
                    'current directory).')
flags.DEFINE_string('data_root', None, 'Overrides config.data.root (default: $VPR_DATA_ROOT).')
flags.DEFINE_list('image_size', None, 'H,W to resize every image to (default: the config\'s '
                  'image_size).')
flags.DEFINE_integer('short_side', None, 'Resize the shorter side to this (aspect ratio kept) '
                     'instead of to a fixed H,W.')
flags.DEFINE_integer('quality', prepared.DEFAULT_QUALITY, 'JPEG quality (1..100).')
flags.DEFINE_enum('subsampling', '4:2:0', sorted(prepared.SUBSAMPLING), 'JPEG chroma subsampling.')
flags.DEFINE_integer('num_workers', -1, 'Decoding/encoding processes; -1: one per CPU core; 0: '
                     'this process only.')
flags.DEFINE_integer('records_per_shard', prepared.DEFAULT_RECORDS_PER_SHARD,
                     'Images per ArrayRecord file.')
flags.DEFINE_bool('overwrite', False, 'Replace an existing non-empty --out folder.')
flags.mark_flags_as_required(['config', 'out'])


def parse_image_size(values) -> tuple[int, int]:
  """['224', '224'] -> (224, 224); a clear error otherwise."""
  try:
    size = tuple(int(v) for v in values)
  except ValueError:
    size = ()
  if len(size) != 2 or min(size) <= 0:
    raise app.UsageError(f'--image_size must be H,W (two positive integers), got '
                         f'{",".join(values)!r}.')
  return size


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  config = FLAGS.config
  if FLAGS.image_size is not None and FLAGS.short_side is not None:
    raise app.UsageError('Give --image_size or --short_side, not both.')
  short_side = FLAGS.short_side
  image_size = None
  if short_side is None:
    image_size = (parse_image_size(FLAGS.image_size) if FLAGS.image_size is not None
                  else tuple(int(s) for s in config.image_size))
  data_root = roots.resolve_data_root(
      FLAGS.data_root if FLAGS.data_root is not None else config.data.root)
  train_dir = roots.resolve_under(data_root, config.data.train_dir)
  index = gsv_cities.build_place_index(
      train_dir, config.data.train_layout, tuple(config.data.cities),
      int(config.data.min_img_per_place), cache_dir=config.data.cache_dir,
      rebuild=bool(config.data.rebuild_index))
  num_workers = workers.resolve_num_workers(FLAGS.num_workers, '--num_workers')
  print(f'Preparing {index.num_images} images of {index.num_places} places from {train_dir} '
        f'into {FLAGS.out} with {num_workers} workers.', flush=True)
  info = prepared.prepare_training_data(
      index, FLAGS.out, image_size=image_size, short_side=short_side, quality=FLAGS.quality,
      subsampling=FLAGS.subsampling, num_workers=num_workers,
      records_per_shard=FLAGS.records_per_shard, overwrite=FLAGS.overwrite,
      progress=lambda line: print(line, flush=True))
  rate = info.get('images_per_second_this_run')
  print(f'Done: {FLAGS.out} ({info["num_bad_images"]} unreadable images'
        + (f'; {rate:.0f} images/s' if rate else '') + ').', flush=True)


def run():
  """Console entry point: accepts dashed flag names, then runs `main` under absl."""
  common.run(main)


if __name__ == '__main__':
  run()
