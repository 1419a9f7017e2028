"""A benchmark split as a TFDS dataset: `VprBenchmark`, its build and its reader.

`VprBenchmark` stores an evaluation set (`benchmarks.load_benchmark`), splits 'database' and
'queries' in evaluation order, with UTM coordinates, source paths and, for queries, the
positives; images as stored on disk unless a size is asked for. The table is stored too
(`benchmark.npz`); `open_benchmark` gives it back with a record source per split, and with an
image reader (`BenchmarkImages`) that evaluation reads instead of the files (the stored files as
they are decode to the same pixels, hence the same descriptors). A set loaded by registered name
(the family's list files, a ground-truth folder) is handed to the builder whole and keeps its
name. Shared machinery: `records`.
"""

from __future__ import annotations

import os

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from vpr_jax.data.evaluation import benchmarks
from vpr_jax.data.evaluation import positives_cache
from vpr_jax.data.tfds import records
from vpr_jax.errors import BuiltDatasetError

BENCHMARK_SPLITS = ('database', 'queries')


BENCHMARK_FILE = 'benchmark.npz'


class BenchmarkSetConfig(tfds.core.BuilderConfig):
  """How a benchmark split is stored.

  Attributes:
    encoding: how images are stored (by default the files as they are).
    radius_m: positive radius in metres, when the ground truth comes from the names.
  """

  def __init__(self, *, encoding: records.ImageEncoding = records.ImageEncoding(),
               radius_m: float = benchmarks.DEFAULT_RADIUS_M, **kwargs):
    kwargs.setdefault('version', records.VERSION)
    super().__init__(**kwargs)
    self.encoding = encoding
    self.radius_m = float(radius_m)


class VprBenchmark(tfds.core.GeneratorBasedBuilder):
  """A VPR benchmark split: database and query images with UTM coordinates and positives."""

  VERSION = records.VERSION
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Benchmark sets (Pittsburgh, MSLS, Nordland, SPED, SF-XS, Tokyo-XS, ...) cannot be downloaded
automatically. Prepare the split folder as for evaluation and pass it as the manual directory:
  <manual_dir>/database/@UTM_east@UTM_north@zone@band@lat@lon@...@.jpg
  <manual_dir>/queries/@UTM_east@UTM_north@zone@band@lat@lon@...@.jpg
(optionally with <prefix>_dbImages.npy / _qImages.npy / _gt.npy ground truth inside it).
"""
  BUILDER_CONFIGS = [
      BenchmarkSetConfig(name='originals', description='The image files as they are.'),
      BenchmarkSetConfig(name='resized_224', encoding=records.ImageEncoding((224, 224)),
                         description='Images resized to 224x224 (JPEG quality 95).'),
      BenchmarkSetConfig(name='resized_320', encoding=records.ImageEncoding((320, 320)),
                         description='Images resized to 320x320 (JPEG quality 95).'),
  ]

  def __init__(self, *, num_workers: int = 0, benchmark: benchmarks.BenchmarkSet | None = None,
               **kwargs):
    # A set loaded by the caller (a registered name: list files, a ground-truth folder);
    # without one, the manual directory is loaded as a split folder.
    self._benchmark = benchmark
    self._num_workers = int(num_workers)
    self._metadata = records.NpzMetadata(BENCHMARK_FILE)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    keeps_originals = self.builder_config.encoding.keeps_originals
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            # The files as they are may be JPEG or PNG; resized ones are JPEG.
            'image': tfds.features.Image(shape=(None, None, 3),
                                         encoding_format=None if keeps_originals else 'jpeg'),
            'utm': tfds.features.Tensor(shape=(2,), dtype=np.float64,
                                        encoding=tfds.features.Encoding.BYTES),
            'positives': tfds.features.Sequence(np.int64),
            'source_path': tfds.features.Text(),
        }),
        disable_shuffling=True,
        metadata=self._metadata,
    )

  def _split_generators(self, dl_manager):
    config = self.builder_config
    split = self._benchmark
    if split is None:
      split = benchmarks.load_benchmark(os.path.abspath(os.fspath(dl_manager.manual_dir)),
                                        radius_m=config.radius_m, use_cache=False)
    flat, offsets = positives_cache.pack_positives(split.positives)
    self._metadata.arrays = {
        'database_paths': np.array([p.encode('utf-8') for p in split.database_paths], np.bytes_),
        'queries_paths': np.array([p.encode('utf-8') for p in split.queries_paths], np.bytes_),
        'database_utm': split.database_utm, 'queries_utm': split.queries_utm,
        'positives': flat, 'positive_offsets': offsets}
    self._metadata.meta = {'summary': split.summary(), 'encoding': config.encoding.describe(),
                           'bad_images': {'database': [], 'queries': []}}
    no_positives = [np.zeros(0, np.int64)] * split.num_database
    return {
        'database': self._generate_examples(split.root, 'database', split.database_paths,
                                            split.database_utm, no_positives),
        'queries': self._generate_examples(split.root, 'queries', split.queries_paths,
                                           split.queries_utm, split.positives),
    }

  def _generate_examples(self, root, split_name, paths, utm, positives):
    bad = self._metadata.meta['bad_images'][split_name]
    absolute = [os.path.join(root, p) for p in paths]
    encoded = records.encoded(self.builder_config.encoding, absolute, self._num_workers)
    for i, (data, reason) in enumerate(encoded):
      if reason:
        bad.append({'record': i, 'path': paths[i], 'reason': reason})
        logging.warning('Cannot read %s (%s); stored as empty bytes.', absolute[i], reason)
      yield i, {'image': data, 'utm': np.asarray(utm[i], np.float64),
                'positives': np.asarray(positives[i], np.int64), 'source_path': paths[i]}


def benchmark_name(manual_dir: str, radius_m: float, encoding: records.ImageEncoding,
                   benchmark: benchmarks.BenchmarkSet | None = None) -> str:
  """The default config name of a benchmark: its name (or the split folder's) and a hash of the
  folder, the settings and, for a loaded set, its lists and ground-truth source."""
  folder = os.path.abspath(os.fspath(manual_dir))
  settings = {'folder': folder, 'radius_m': float(radius_m), 'encoding': encoding.describe()}
  label = os.path.basename(folder)
  if benchmark is not None:
    label = benchmark.name if os.path.basename(benchmark.name) == benchmark.name else label
    settings.update(name=benchmark.name, source=benchmark.source,
                    listing_sha1=benchmark.listing_sha1)
  return records.config_name(''.join(c if c.isalnum() else '_' for c in label) or 'benchmark',
                             settings)


def benchmark_folder(data_dir: str, name: str) -> str:
  """Where `build_benchmark(..., data_dir, name=name)` puts the built dataset."""
  return os.path.join(os.path.abspath(os.fspath(data_dir)), VprBenchmark.name, name,
                      str(records.VERSION))


def build_benchmark(manual_dir: str, data_dir: str, *,
                    encoding: records.ImageEncoding = records.ImageEncoding(),
                    radius_m: float = benchmarks.DEFAULT_RADIUS_M, name: str | None = None,
                    num_workers: int = 0, overwrite: bool = False,
                    benchmark: benchmarks.BenchmarkSet | None = None) -> str:
  """Builds (or finds already built) a VprBenchmark of one split folder; returns its folder.

  Args:
    manual_dir: the benchmark split folder (database/ and queries/).
    data_dir: the TFDS data folder to write under.
    encoding: how images are stored (default: the files as they are).
    radius_m: positive radius (when the ground truth comes from the names).
    name: the builder config name; by default the split folder's name and a hash of it and of
      the settings.
    num_workers: processes reading and encoding images; 0 works in this process.
    overwrite: build again even when a dataset of the same name is already built.
    benchmark: the set, already loaded (by registered name: its name, lists and ground truth are
      stored); default: `manual_dir` loaded as a split folder.

  Returns:
    The folder holding `dataset_info.json`.
  """
  if name is None:
    name = benchmark_name(manual_dir, radius_m, encoding, benchmark)
  config = BenchmarkSetConfig(name=name, encoding=encoding, radius_m=radius_m)
  builder = VprBenchmark(config=config, data_dir=os.fspath(data_dir),
                         file_format='array_record', num_workers=num_workers,
                         benchmark=benchmark)
  return records.build_dataset(builder, manual_dir, None, overwrite)


def open_benchmark(
    directory: str) -> tuple[benchmarks.BenchmarkSet, dict[str, records.SplitSource]]:
  """A built benchmark: its BenchmarkSet (paths, UTM, positives) and a source per split.

  Args:
    directory: the built dataset folder (holding dataset_info.json).

  Returns:
    (BenchmarkSet whose `root` is the source split folder, {'database': ..., 'queries': ...}).

  Raises:
    BuiltDatasetError: not a built benchmark.
  """
  records.open_builder(directory)
  meta, arrays = records.read_npz(os.path.join(os.fspath(directory), BENCHMARK_FILE))
  summary = meta['summary']
  split = benchmarks.BenchmarkSet(
      name=summary['name'], root=summary['root'],
      database_paths=[p.decode('utf-8') for p in arrays['database_paths']],
      queries_paths=[p.decode('utf-8') for p in arrays['queries_paths']],
      database_utm=arrays['database_utm'], queries_utm=arrays['queries_utm'],
      positives=positives_cache.unpack_positives(arrays['positives'], arrays['positive_offsets']),
      radius_m=summary['radius_m'], source=summary['source'],
      listing_sha1=summary['listing_sha1'],
      num_queries_in_database=int(summary.get('num_queries_in_database', 0)))
  sources = {name: records.SplitSource(directory, name, split.root, BENCHMARK_FILE, f'{name}_paths')
             for name in BENCHMARK_SPLITS}
  for name, paths in (('database', split.database_paths), ('queries', split.queries_paths)):
    if len(sources[name]) != len(paths):
      raise BuiltDatasetError(f'{directory!r}: split {name!r} holds {len(sources[name])} records '
                              f'but {BENCHMARK_FILE} lists {len(paths)} images.')
  split.image_reader = BenchmarkImages(sources['database'], sources['queries'])
  return split, sources


def is_built_benchmark(directory: str) -> bool:
  """Whether `directory` is a built VprBenchmark (dataset_info.json and benchmark.npz)."""
  directory = os.path.expanduser(os.fspath(directory))
  return (os.path.isfile(os.path.join(directory, 'dataset_info.json'))
          and os.path.isfile(os.path.join(directory, BENCHMARK_FILE)))


class BenchmarkImages:
  """Image i of a built benchmark, database then queries (`BenchmarkSet.image_paths` order),
  decoded as the files are (`decode.decode_stored`); picklable for evaluation workers."""

  def __init__(self, database: records.SplitSource, queries: records.SplitSource):
    self.database = database
    self.queries = queries

  def __call__(self, i: int) -> np.ndarray:
    i = int(i)
    if i < len(self.database):
      return self.database.load_pixels(i)
    return self.queries.load_pixels(i - len(self.database))
