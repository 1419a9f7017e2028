"""The images the pipeline, end_to_end and eval modes of the training benchmarks read.

Sources (--sources original,prepared): --train_dir (with --layout, --cities), or synthetic
GSV-Cities places written to a temporary folder (--synthetic_places, --source_size; written by
--workers processes); 'prepared' reads --prepared_dir (a built TFDS dataset folder), or builds the
original images at the config's image size into a temporary folder first
(`training_set.build_training_set`).

`run` is the loop those three modes share: for each config and source it hands one `SourceJob`
to each mode's `run_source`, in the order given, so that several modes read one prepared copy.
"""

import dataclasses
import os
import sys
import time

_SCRIPTS = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_SCRIPTS)
for _path in (_REPO, _SCRIPTS):
  if _path not in sys.path:
    sys.path.insert(0, _path)

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np

import bench_train_common
from vpr_jax.data.training import gsv_cities
from vpr_jax.data.tfds import records
from vpr_jax.data.tfds import training_set
from vpr_jax.data import synthetic
from vpr_jax.data.training import train_pipeline
# pylint: enable=g-import-not-at-top,wrong-import-position


def _city_names(count: int) -> tuple[str, ...]:
  """SynthAA, SynthAB, ...: one synthetic city per writing process."""
  letters = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ'
  return tuple(f'Synth{letters[i // 26]}{letters[i % 26]}' for i in range(count))


def _write_city(root, seed, city, num_places, images_per_place, source_size):
  """Writes one synthetic city (run in a worker process: a module-level function)."""
  return synthetic.make_training_places(
      root, seed=seed, num_train_places=num_places, images_per_place=images_per_place,
      image_size=source_size, cities=(city,), layouts=('gsv_cities',))


def write_synthetic_places(root: str, num_places: int, images_per_place: int, source_size,
                           workers: int, seed: int = 0) -> dict:
  """Synthetic GSV-Cities places under root/gsv_cities, one city per writing process.

  Returns:
    {'train_dir', 'cities', 'num_images', 'seconds'}.
  """
  from concurrent import futures  # pylint: disable=g-import-not-at-top
  import multiprocessing  # pylint: disable=g-import-not-at-top
  num_cities = max(1, min(int(workers), num_places))
  cities = _city_names(num_cities)
  shares = [num_places // num_cities + (i < num_places % num_cities) for i in range(num_cities)]
  start = time.perf_counter()
  jobs = [(root, seed * 1000 + i, city, share, images_per_place, tuple(source_size))
          for i, (city, share) in enumerate(zip(cities, shares))]
  if num_cities == 1:
    summaries = [_write_city(*jobs[0])]
  else:
    with futures.ProcessPoolExecutor(num_cities,
                                     mp_context=multiprocessing.get_context('spawn')) as pool:
      summaries = list(pool.map(_write_city, *zip(*jobs)))
  return {'train_dir': os.path.join(root, 'gsv_cities'), 'cities': cities,
          'num_images': sum(s['num_images'] for s in summaries),
          'seconds': time.perf_counter() - start}


class DataSources:
  """The original index and, on demand, a prepared copy at the config's image size."""

  def __init__(self, args, workdir: str):
    self._args = args
    self._workdir = workdir
    self.info = {}
    if args.train_dir:
      self.train_dir = args.train_dir
      self.layout = args.layout
      self.cities = (tuple(c for c in args.cities.split(',') if c) or
                     tuple(gsv_cities.available_cities(args.train_dir, args.layout)))
      self.info['original'] = {'train_dir': args.train_dir, 'synthetic': False}
    elif args.prepared_dir:
      if 'original' in args.sources:
        raise SystemExit('--prepared_dir without --train_dir: use --sources prepared (the '
                         'original images of the prepared folder are not known here)')
      self.train_dir = None
      self.layout, self.cities = None, None
    else:
      self._write_synthetic(args, workdir)
    self._index = None
    self._prepared = {}

  def _write_synthetic(self, args, workdir: str) -> None:
    """Neither --train_dir nor --prepared_dir: synthetic places in the workdir."""
    if args.layout != 'gsv_cities':
      raise SystemExit('synthetic places use --layout gsv_cities; give --train_dir otherwise')
    written = write_synthetic_places(os.path.join(workdir, 'synthetic'),
                                     args.synthetic_places, args.images_per_place_data,
                                     args.source_size, max(1, args.workers), args.seed)
    self.train_dir, self.layout, self.cities = (written['train_dir'], 'gsv_cities',
                                                written['cities'])
    self.info['original'] = {'train_dir': self.train_dir, 'synthetic': True,
                             'source_size': list(args.source_size),
                             'num_images': written['num_images'],
                             'write_seconds': written['seconds']}
    print(f'Wrote {written["num_images"]} synthetic {args.source_size[0]}x'
          f'{args.source_size[1]} JPEGs in {written["seconds"]:.1f} s.', flush=True)

  def configure(self, config):
    """Points config.data at this data (cities, layout, min_img_per_place)."""
    if self.cities is not None:
      config.data.cities = tuple(self.cities)
      config.data.train_layout = self.layout
    elif self._args.prepared_dir:
      info, _ = records.read_npz(
          os.path.join(self._args.prepared_dir, training_set.PLACE_INDEX_FILE))
      config.data.cities = tuple(info['cities'])
      config.data.train_layout = info['layout']
      config.data.min_img_per_place = int(info['min_img_per_place'])
    config.data.min_img_per_place = min(int(config.data.min_img_per_place),
                                        int(config.data.images_per_place))
    return config

  def original(self, config):
    """The place index of the original images (built once, cached in the workdir)."""
    if self.train_dir is None:
      raise SystemExit('--sources original needs --train_dir (or no --prepared_dir)')
    if self._index is None:
      self._index = gsv_cities.build_place_index(
          self.train_dir, self.layout, self.cities, int(config.data.min_img_per_place),
          cache_dir=os.path.join(self._workdir, 'index_cache'))
    return self._index

  def prepared(self, config):
    """(index, TrainingSource) of --prepared_dir or of a TFDS build at config.image_size."""
    if self._args.prepared_dir:
      return training_set.open_training_set(self._args.prepared_dir, config)
    size = tuple(int(s) for s in config.image_size)
    if size not in self._prepared:
      self._prepared[size] = self._build_prepared(config, size)
    return training_set.open_training_set(self._prepared[size], config)

  def _build_prepared(self, config, size) -> str:
    """Builds the original images at `size` as a TFDS dataset; its folder. Timed into info."""
    index = self.original(config)
    start = time.perf_counter()
    folder = training_set.build_training_set(
        self.train_dir, os.path.join(self._workdir, 'tfds'), layout=self.layout,
        cities=self.cities, min_img_per_place=int(config.data.min_img_per_place),
        encoding=records.ImageEncoding(size), num_workers=self._args.workers)
    seconds = time.perf_counter() - start
    _, source = training_set.open_training_set(folder)
    self.info[f'prepared_{size[0]}x{size[1]}'] = {
        'seconds': seconds,
        'images_per_second': index.num_images / seconds,
        'mean_bytes_per_image': float(np.mean([len(source[i]) for i in range(len(source))])),
        'workers': self._args.workers}
    print(f'Prepared {index.num_images} images at {size[0]}x{size[1]} in {seconds:.1f} s.',
          flush=True)
    return folder

  def get(self, source: str, config):
    """(index, TrainingSource or None) for 'original' or 'prepared'."""
    if source == 'original':
      return self.original(config), None
    return self.prepared(config)


def data_steps(args) -> tuple[int, int]:
  """(warm-up, timed) batches of the pipeline and end_to_end modes.

  Each grain worker builds whole batches and buffers `prefetch_buffer_size` of them, so the
  first ~2 x workers batches arrive in a burst: they are warm-up, and the timed batches span
  several rounds of all workers (at least 4 x workers).
  """
  return max(args.warmup, 2 * args.workers), max(args.steps, 4 * args.workers)


def train_iterator(index, config, source, workers: int, num_batches: int, seed: int):
  """The training loop's grain iterator, with enough epochs for `num_batches` batches."""
  steps = train_pipeline.steps_per_epoch(index, config)
  config = config.copy_and_resolve_references()
  config.num_epochs = max(1, -(-num_batches // steps))
  config.data.num_workers = workers
  return train_pipeline.make_train_iterator(index, config, seed, num_workers=workers,
                                            prepared=source)


@dataclasses.dataclass(frozen=True)
class SourceJob:
  """One config on one source, as the data modes measure it.

  Attributes:
    config: the config with the command line's overrides, pointed at the data.
    name: the config's name.
    source_name: 'original' or 'prepared'.
    index: the place index.
    source: the prepared TrainingSource, None for the original JPEGs.
    devices: the devices of end_to_end and eval.
    compute_img_per_s: the compute-only rate of the config on as many devices, if measured in
      this run (the ratio the data modes report).
    tag: the start of the rows' labels: 'mixvpr prepared/device/16w'.
  """
  config: object
  name: str
  source_name: str
  index: object
  source: object
  devices: list
  compute_img_per_s: float | None
  tag: str


def _compute_rate(results, name, num_devices):
  """Compute-only img/s of a config (no augmentation) on as many devices, if measured."""
  for r in results['compute']:
    if (r['config'] == name and r['augment'] == 'none' and r['num_devices'] == num_devices):
      return r['vpr_jax_img_per_s']
  return None


def with_compute_ratio(row, job) -> dict:
  """Adds the compute-only rate and the ratio to it, where the compute mode measured it."""
  if job.compute_img_per_s:
    row.update({'compute_img_per_s': job.compute_img_per_s,
                'ratio_to_compute': row['img_per_s'] / job.compute_img_per_s})
  return row


def run(args, results, workdir, source_runs) -> None:
  """Runs the data modes: each of `source_runs` (args, results, job) on every config x source."""
  data = DataSources(args, workdir)
  results['data'] = data.info
  for path in args.configs:
    name = bench_train_common.config_name(path)
    config = data.configure(bench_train_common.bench_config(path, args, args.augment))
    devices = bench_train_common.data_devices(args)
    compute = _compute_rate(results, name, len(devices))
    for source_name in args.sources:
      index, source = data.get(source_name, config)
      job = SourceJob(config=config, name=name, source_name=source_name, index=index,
                      source=source, devices=devices, compute_img_per_s=compute,
                      tag=f'{name} {source_name}/{args.augment}/{args.workers}w')
      for run_source in source_runs:
        run_source(args, results, job)
