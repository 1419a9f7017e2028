"""`build_index`: a folder of geotagged photos -> a localisation index folder (layout in `store`).

Every image under the folder (recursively) is embedded with a checkpoint exactly as evaluation
embeds it (`embedding.embed`) and written with its coordinates (`coordinates`) and a FAISS index
(`faiss_index`). A build is a sequence of named steps:

  plan      which files the committed index and the pending parts of an interrupted run already
            hold (same size and modification time), which must be embedded, which rows are gone
  embed     the missing files, part by part; each part is saved to pending/ when complete, so that
            rerunning an interrupted command embeds only what no part holds yet
  assemble  the rows of the new generation in path order, then the coordinates CSV over them
  index     the FAISS index (the trained, empty index of the previous build is reused)
  commit    the files of generation G + 1, then the manifest; then the clean-up of the rest

Every argument (numbers, the FAISS factory string, output folder) is checked before any image is
embedded, and one build at a time writes an index folder: it holds the folder's lock
(`workdir_lock.WorkdirLock`, `<out>/.lock`) for the whole build, so that a second one stops at
once naming the first, instead of both reporting success and one update being lost.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import faiss
import numpy as np
import tqdm

from vpr_jax.data.evaluation import benchmarks
from vpr_jax.data.imaging import images
from vpr_jax.data.multiprocess import workers
from vpr_jax.errors import ConfigError
from vpr_jax.errors import ImageFolderError
from vpr_jax.errors import IndexMismatchError
from vpr_jax.localization import coordinates as coordinates_lib
from vpr_jax.localization import embedding
from vpr_jax.localization import faiss_index
from vpr_jax.localization import store
from vpr_jax.training import workdir_lock

DEFAULT_PART_SIZE = 4096

# Where a row of the new generation comes from: ('index' | 'pending' | 'new', rows, row).
Origin = tuple[str, store.Rows, int]


@dataclasses.dataclass
class BuildStats:
  """What a `build_index` run did.

  Attributes:
    num_images: rows of the index written.
    embedded: images embedded by this run.
    reused: rows taken from the previous index.
    resumed: rows taken from the parts of an interrupted run.
    changed: images of the previous index embedded again (the file changed; among `embedded`).
    removed: rows of the previous index dropped (file gone).
    faiss_factory: the FAISS index written.
    seconds: wall time of the run.
    up_to_date: nothing changed; no file was written.
  """
  num_images: int
  embedded: int
  reused: int
  resumed: int
  removed: int
  faiss_factory: str
  seconds: float
  up_to_date: bool = False
  changed: int = 0


@dataclasses.dataclass
class Plan:
  """What a build starts from.

  Attributes:
    paths: the images of the folder, sorted (the rows of the new generation).
    stamps: {path: (size, mtime_ns)} of those files.
    known: {path: Origin} of the rows already embedded (committed index, then pending parts).
    todo: paths to embed (not known, or changed since).
    changed: rows of the committed index whose file changed (embedded again).
    removed: rows of the committed index whose file is gone.
  """
  paths: list[str]
  stamps: dict[str, tuple[int, int]]
  known: dict[str, Origin]
  todo: list[str]
  changed: int
  removed: int


@dataclasses.dataclass(frozen=True)
class EmbedSettings:
  """How the missing images are embedded and saved."""
  model: Any
  variables: Any
  config: Any
  batch_size: int
  num_workers: int
  decode: images.DecodeOptions
  dtype: str
  part_key: str
  part_size: int


def list_database_images(images_dir: str) -> list[str]:
  """Sorted image paths (.jpg, .jpeg, .png) under `images_dir`, recursively, relative to it.

  Raises:
    ImageFolderError: the folder is missing, not a folder, or holds no image.
  """
  if not os.path.exists(images_dir):
    raise ImageFolderError(f'image folder {images_dir!r} does not exist.')
  if not os.path.isdir(images_dir):
    raise ImageFolderError(f'{images_dir!r} is not a folder; expected a folder of images.')
  paths = benchmarks.list_images(images_dir, images_dir)
  if not paths:
    raise ImageFolderError(
        f'no images under {images_dir!r}: expected files ending in '
        f'{", ".join(benchmarks.IMAGE_EXTENSIONS)} (sub-folders are searched).')
  return paths


def decode_settings(exif_transpose: bool, fast_decode: bool) -> dict[str, bool]:
  """The decode settings an index records (the fields of `images.DecodeOptions`)."""
  return {'exif_transpose': bool(exif_transpose), 'fast_decode': bool(fast_decode)}


def check_extendable(out: str, manifest: Mapping[str, Any], fingerprint: Mapping[str, Any],
                     settings: Mapping[str, bool], half: bool) -> None:
  """Refuses to extend an index built with another checkpoint or other settings.

  Raises:
    IndexMismatchError: naming what differs.
  """
  differing = embedding.fingerprint_differences(manifest['fingerprint'], fingerprint)
  if differing:
    raise IndexMismatchError(
        f'index {out!r} was built with another checkpoint ({", ".join(differing)} differ); '
        'index into another folder, or delete this one to rebuild it.')
  built_settings = dict(manifest['decode'], half=manifest['dtype'] == 'float16')
  for name, value in dict(settings, half=bool(half)).items():
    built = built_settings.get(name)
    if built != value:
      raise IndexMismatchError(
          f'index {out!r} was built with {name}={built}, this run asks for {value}; use the '
          'same settings, or another folder.')


def image_stamps(images_dir: str, paths: Sequence[str]) -> dict[str, tuple[int, int]]:
  """{path: (size, mtime_ns)}: what tells a changed file from the one embedded before."""
  stamps = {}
  for path in paths:
    full = os.path.join(images_dir, path)
    try:
      stat = os.stat(full)
    except OSError as e:
      # A dangling symbolic link, one that points to itself, a file removed meanwhile.
      kind = 'a symbolic link' if os.path.islink(full) else 'an image'
      raise ImageFolderError(f'{kind} under --images cannot be read: {full!r} ({e.strerror}); '
                             'remove it or fix it.') from None
    stamps[path] = (int(stat.st_size), int(stat.st_mtime_ns))
  return stamps


def is_current(known: Mapping[str, Origin], stamps: Mapping[str, tuple[int, int]],
               path: str) -> bool:
  """Whether `path` is embedded already, from the file as it is now."""
  origin = known.get(path)
  if origin is None or path not in stamps:
    return False
  rows, row = origin[1], origin[2]
  return (int(rows.sizes[row]), int(rows.mtimes_ns[row])) == stamps[path]


def plan_build(out: str, images_dir: str, paths: list[str], manifest: Mapping[str, Any] | None,
               part_key: str) -> Plan:
  """Step 1: what is embedded already (the committed index, then the newer pending parts)."""
  stamps = image_stamps(images_dir, paths)
  known: dict[str, Origin] = {}
  previous = store.read_rows(out, manifest) if manifest is not None else None
  for row, path in enumerate(previous.paths if previous else ()):
    known[path] = ('index', previous, row)
  for part in store.read_pending(out, part_key):
    for row, path in enumerate(part.paths):
      known[path] = ('pending', part, row)
  todo = [p for p in paths if not is_current(known, stamps, p)]
  dropped = [p for p in (previous.paths if previous else ()) if not is_current(known, stamps, p)]
  removed = sum(1 for p in dropped if p not in stamps)
  return Plan(paths, stamps, known, todo, len(dropped) - removed, removed)


def is_up_to_date(plan: Plan, manifest: Mapping[str, Any] | None,
                  csv_positions: Mapping[str, Any] | None, faiss_factory: str) -> bool:
  """Nothing to do: no file added, changed or gone, no CSV to apply, the same FAISS index."""
  return (manifest is not None and not plan.todo and not plan.removed and not plan.changed
          and csv_positions is None
          and len(plan.paths) == manifest['num_images']
          and faiss_factory in (manifest['faiss_factory'], manifest.get('faiss_requested')))


def embed_missing(out: str, images_dir: str, plan: Plan, settings: EmbedSettings,
                  show_progress: bool) -> dict[str, Origin]:
  """Step 2: embeds `plan.todo` part by part, each part saved to pending/ when complete.

  Returns:
    {path: ('new', part, row)} of the embedded images.
  """
  embedded: dict[str, Origin] = {}
  todo = plan.todo
  with tqdm.tqdm(total=len(todo), desc='Embedding', unit='img', disable=not show_progress or
                 not todo) as bar:
    for begin in range(0, len(todo), settings.part_size):
      chunk = todo[begin:begin + settings.part_size]
      descriptors = embedding.embed(
          settings.model, settings.variables, settings.config, images_dir, chunk,
          settings.batch_size, settings.num_workers, settings.decode, progress=bar.update)
      rows = store.Rows.empty(chunk, descriptors.astype(settings.dtype))
      for row, path in enumerate(chunk):
        rows.sizes[row], rows.mtimes_ns[row] = plan.stamps[path]
        rows.set_position(row, coordinates_lib.position_of_file(images_dir, path))
      store.write_pending_part(out, rows, settings.part_key)
      for row, path in enumerate(chunk):
        embedded[path] = ('new', rows, row)
  return embedded


def assemble_rows(plan: Plan, dtype: str) -> store.Rows:
  """Step 3: the rows of the new generation, in path order, from where each is known."""
  origins = [plan.known[p] for p in plan.paths]
  dim = int(origins[0][1].descriptors.shape[1])
  table = store.Rows.empty(plan.paths, np.empty((len(plan.paths), dim), dtype))
  for i, (_, rows, row) in enumerate(origins):
    table.copy_row(i, rows, row)
  return table


def apply_coordinates_csv(table: store.Rows, csv_positions: Mapping[str, Any],
                          images_dir: str, csv_path: str) -> None:
  """Step 3b: the CSV's positions over the rows; rows it no longer lists get the file's own."""
  unknown = sorted(set(csv_positions) - set(table.paths))
  if unknown:
    logging.warning('%d rows of %s name no indexed image (first: %s).', len(unknown), csv_path,
                    unknown[0])
  for i, path in enumerate(table.paths):
    if path in csv_positions:
      table.set_position(i, csv_positions[path])
    elif table.sources[i] == 'csv':
      # Listed by an earlier CSV but not by this one: back to what the file itself says.
      table.set_position(i, coordinates_lib.position_of_file(images_dir, path))


def index_rows(out: str, manifest: Mapping[str, Any] | None, table: store.Rows,
               faiss_factory: str, train_size: int
               ) -> tuple[str, faiss.Index, faiss.Index | None]:
  """Step 4: (factory, FAISS index over the rows, trained empty index or None if untrained).

  The trained (empty) index of the previous build is reused when the factory is the same.
  """
  dim = int(table.descriptors.shape[1])
  factory = faiss_index.resolve_faiss_factory(faiss_factory, len(table.paths), dim)
  template = None
  if manifest is not None and manifest['faiss_factory'] == factory and manifest.get('trained'):
    template = store.read_trained(out, manifest)
  if template is None:
    template = faiss_index.train_on_sample(factory, table.descriptors, train_size)
  trained = faiss_index.needs_training(factory, dim)
  return factory, faiss_index.filled(template, table.descriptors), template if trained else None


def build_index(checkpoint: str, images_dir: str, out: str, *, half: bool = False,
                faiss_factory: str = faiss_index.DEFAULT_FAISS_FACTORY,
                coordinates: str | None = None, exif_transpose: bool = True,
                fast_decode: bool = False, batch_size: int | None = None,
                num_workers: int | None = 0, part_size: int = DEFAULT_PART_SIZE,
                nprobe: int = faiss_index.DEFAULT_NPROBE,
                faiss_train_size: int = faiss_index.DEFAULT_FAISS_TRAIN_SIZE,
                show_progress: bool = True,
                print_fn: Callable[[str], None] = print) -> BuildStats:
  """Builds or updates the localisation index of a folder of images (layout in `store`).

  Args:
    checkpoint: checkpoint folder or training workdir (see `orbax_states.load_for_eval`).
    images_dir: the database folder; every .jpg/.jpeg/.png below it is indexed.
    out: the index folder (created; an existing index of the same checkpoint is updated).
    half: store the descriptors as float16 (half the disk; FAISS still searches float32).
    faiss_factory: 'flat' (exact, the default), 'ivfpq', or a FAISS factory string.
    coordinates: CSV of path,lat,lon (paths relative to `images_dir`); takes precedence over
      names and EXIF.
    exif_transpose: embed photos upright according to their EXIF orientation.
    fast_decode: DCT-scaled JPEG decoding (see `images.DecodeOptions`).
    batch_size: images per forward batch; default the checkpoint's data.eval_batch_size.
    num_workers: decoding worker processes (-1: one per core; None: the checkpoint's setting).
    part_size: images per pending part (the work an interruption can lose).
    nprobe: inverted lists searched per query, for IVF indexes.
    faiss_train_size: at most this many descriptors (a random sample) train an IVF/PQ index.
    show_progress: show a progress bar while embedding.
    print_fn: where the summary goes.

  Returns:
    A `BuildStats`.

  Raises:
    ImageFolderError, CoordinatesFileError, IndexMismatchError, FaissIndexError,
    images.ImageDecodeError: bad input, each with a one-line message.
  """
  start = time.perf_counter()
  check_build_arguments(batch_size, num_workers, part_size, nprobe)
  images_dir = os.path.abspath(os.fspath(images_dir))
  out = os.path.abspath(os.fspath(out))
  paths = list_database_images(images_dir)
  csv_positions = (coordinates_lib.read_coordinates_csv(coordinates, images_dir) if coordinates
                   else None)
  options = BuildOptions(half=bool(half), faiss_factory=faiss_factory, coordinates=coordinates,
                         decode=decode_settings(exif_transpose, fast_decode),
                         batch_size=batch_size, num_workers=num_workers,
                         part_size=int(part_size), nprobe=int(nprobe),
                         faiss_train_size=int(faiss_train_size), show_progress=show_progress)
  store.open_for_build(out)  # A file or a foreign folder is refused before the lock is taken.
  with workdir_lock.WorkdirLock(out, what='index folder'):
    return _build_locked(checkpoint, images_dir, out, paths, csv_positions, options, start,
                         print_fn)


@dataclasses.dataclass(frozen=True)
class BuildOptions:
  """The settings of a build (the keyword arguments of `build_index`, checked)."""
  half: bool
  faiss_factory: str
  coordinates: str | None
  decode: dict[str, bool]
  batch_size: int | None
  num_workers: int | None
  part_size: int
  nprobe: int
  faiss_train_size: int
  show_progress: bool


def check_build_arguments(batch_size: int | None, num_workers: int | None, part_size: int,
                          nprobe: int) -> None:
  """Refuses unusable numbers before any work; ConfigError names the flag and the value."""
  for flag, value in (('--batch_size', batch_size), ('--part_size', part_size),
                      ('--nprobe', nprobe)):
    if value is None and flag == '--batch_size':
      continue  # the checkpoint's data.eval_batch_size
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ConfigError(f'{flag} must be a positive integer, got {value!r}.')
  if num_workers is not None:
    workers.resolve_num_workers(num_workers, '--num_workers')


def _build_locked(checkpoint: str, images_dir: str, out: str, paths: list[str],
                  csv_positions: Mapping[str, Any] | None, options: BuildOptions, start: float,
                  print_fn: Callable[[str], None]) -> BuildStats:
  """`build_index` once the index folder's lock is held: the steps of the module docstring."""
  manifest = store.open_for_build(out)
  config, variables, step, model = embedding.load_model(checkpoint)
  fingerprint = embedding.checkpoint_fingerprint(config, variables)
  settings = options.decode
  dtype = 'float16' if options.half else 'float32'
  if manifest is not None:
    check_extendable(out, manifest, fingerprint, settings, options.half)
  # A bad factory string fails now, not after every image was embedded.
  faiss_index.check_factory(
      options.faiss_factory, len(paths),
      manifest['descriptor_dim'] if manifest else embedding.descriptor_dim(model, variables,
                                                                           config))
  key = store.part_key(fingerprint, settings, dtype)

  plan = plan_build(out, images_dir, paths, manifest, key)
  if is_up_to_date(plan, manifest, csv_positions, options.faiss_factory):
    print_fn(f'Index {out} is up to date ({len(paths)} images).')
    return BuildStats(len(paths), 0, len(paths), 0, 0, manifest['faiss_factory'],
                      time.perf_counter() - start, True)

  embed_settings = EmbedSettings(
      model, variables, config,
      batch_size=int(options.batch_size or config.data.eval_batch_size),
      num_workers=workers.resolve_num_workers(
          config.data.num_workers if options.num_workers is None else options.num_workers,
          'data.num_workers of the checkpoint' if options.num_workers is None
          else '--num_workers'),
      decode=images.DecodeOptions(**settings), dtype=dtype, part_key=key,
      part_size=options.part_size)
  plan.known.update(embed_missing(out, images_dir, plan, embed_settings, options.show_progress))

  table = assemble_rows(plan, dtype)
  if csv_positions is not None:
    apply_coordinates_csv(table, csv_positions, images_dir, options.coordinates)
  factory, index, trained = index_rows(out, manifest, table, options.faiss_factory,
                                       options.faiss_train_size)

  new_manifest = store.commit(
      out, (manifest['generation'] + 1) if manifest is not None else 1, table, index, trained,
      manifest_fields(checkpoint, step, fingerprint, settings, embed_settings, images_dir,
                      table, factory, options.faiss_factory, trained is not None,
                      options.nprobe))
  store.clean_up(out, new_manifest)
  return report(plan, images_dir, out, new_manifest, start, print_fn)


def manifest_fields(checkpoint: str, step: int | None, fingerprint: Mapping[str, Any],
                    settings: Mapping[str, bool], embed_settings: EmbedSettings,
                    images_dir: str, table: store.Rows, factory: str, requested: str,
                    trained: bool, nprobe: int) -> dict[str, Any]:
  """What the manifest records about a build, besides its generation and files."""
  return {
      'checkpoint': os.path.abspath(checkpoint),
      'step': None if step is None else int(step),
      'fingerprint': fingerprint,
      'decode': settings,
      'dtype': embed_settings.dtype,
      'descriptor_dim': int(table.descriptors.shape[1]),
      'images_dir': images_dir,
      'num_images': len(table.paths),
      'num_with_coordinates': int(np.isfinite(table.latlon).all(axis=1).sum()),
      'faiss_factory': factory,
      'faiss_requested': requested,
      'trained': trained,
      'nprobe': int(nprobe),
      'batch_size': embed_settings.batch_size,
  }


def report(plan: Plan, images_dir: str, out: str, manifest: Mapping[str, Any], start: float,
           print_fn: Callable[[str], None]) -> BuildStats:
  """The `BuildStats` of a committed build, and its summary line through `print_fn`."""
  origins = [plan.known[p][0] for p in plan.paths]
  stats = BuildStats(num_images=len(plan.paths), embedded=len(plan.todo),
                     reused=origins.count('index'), resumed=origins.count('pending'),
                     removed=plan.removed, faiss_factory=manifest['faiss_factory'],
                     seconds=time.perf_counter() - start, changed=plan.changed)
  print_fn(f'Indexed {stats.num_images} images of {images_dir} into {out}: {stats.embedded} '
           f'embedded ({stats.changed} of them changed since the last build), {stats.reused} '
           f'kept, {stats.resumed} resumed from an interrupted run, {stats.removed} removed; '
           f'{manifest["num_with_coordinates"]} with coordinates; FAISS {stats.faiss_factory}; '
           f'{stats.seconds:.1f} s.')
  return stats
