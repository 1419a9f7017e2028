"""The training input pipeline (grain): P places x K images per batch, as GSV-Cities batches.

Order. Each epoch has its own place order, a pure function of (seed, epoch): by default every
city's places are shuffled and the cities' blocks follow the config's city order, so a batch
mostly holds places of one city (harder negatives, as the GSV-Cities loader with
shuffle_all=False); `data.shuffle_all=True` shuffles all places together. The order is cut into
global batches of `places_per_batch` places and the incomplete last batch is dropped, so each
epoch has `num_places // places_per_batch` steps and a different set of leftover places.

Processes. With several processes (multi-host), process i takes places
[i * P_local, (i + 1) * P_local) of every global batch (P_local = places_per_batch //
process_count): every place is read by exactly one process per epoch and the global batch is the
concatenation of the processes' batches in process order.

Elements. A place gives K images: drawn without replacement, fresh every epoch, from a numpy
Generator seeded with (seed, epoch, place) (or the K most recent, by date then latitude, when
`data.random_sample_from_each_place` is False). The same Generator then drives RandAugment, so
every batch is a pure function of (seed, step) whatever the number of workers. Each image is
decoded (`vpr_jax.data.imaging.decode`; `data.decode` chooses exact or DCT-scaled), resized (PIL
bilinear), augmented and returned as uint8; normalisation happens on the device.

Undecodable images. An image that cannot be decoded is replaced by the next image of the same
place in the sampling order (the remaining images of the place, in the same random order; for
"most recent", the next most recent); if the place runs out, its decodable images are used again
(with fresh augmentation). Each failure is named in a warning from the worker and counted in the
batch's `num_bad_images`. The iterator stops with `TooManyBadImagesError` once more than
`data.max_bad_image_fraction` of the image reads so far failed (judged over at least
`_MIN_READS_FOR_BAD_FRACTION` reads, so one bad file at the start does not stop a run). A place
none of whose images decode is an error.

Batches are dicts of numpy arrays:
  images          uint8 [P_local, K, H, W, 3]
  labels          int32 [P_local, K]  (global place ids)
  num_bad_images  int32 []            (host-side bookkeeping; do not send it to the device)

Checkpointing. `TrainIterator.get_state()` is a small JSON-serialisable dict (the next step and
the bad-image counters); `set_state()` on a fresh iterator continues with exactly the batches the
uninterrupted run would have produced.

Prepared data. With `prepared` (a `vpr_jax.data.tfds.training_set.TrainingSource`, from
`training_set.open_training_set`, whose index is then the one passed in), the images are read
from the built TFDS dataset instead of the original files: record i is flat image i of the index,
so the order, the draws and the labels are those of a run on the originals, and only the pixels
differ by the JPEG re-encoding (none of the resize work is left when the data was prepared at
config.image_size).

Nothing here imports JAX (grain itself may import it; the workers never initialise a backend).
"""

from __future__ import annotations

import threading
from typing import Any, Iterator

from absl import logging
import grain
import numpy as np

from vpr_jax import errors
from vpr_jax.data.augmentation import augment
from vpr_jax.data.multiprocess import batch_slots
from vpr_jax.data.imaging import decode
from vpr_jax.data.training import gsv_cities
from vpr_jax.data.multiprocess import worker_memory
from vpr_jax.data.multiprocess import workers as worker_counts
from vpr_jax.data.training.gsv_cities import PlaceIndex
from vpr_jax.errors import ConfigError
from vpr_jax.errors import DatasetError
from vpr_jax.errors import TooManyBadImagesError

_STATE_VERSION = 1
# Fingerprint fields that describe the training set for messages; the index hash decides.
_DESCRIPTIVE_FIELDS = ('num_places', 'num_images', 'cities')
# Random-stream tags: the epoch order and the per-place draws never share a stream.
_ORDER_STREAM = 1
_PLACE_STREAM = 2
# The bad-image fraction is judged over at least this many reads (or one epoch, if smaller).
_MIN_READS_FOR_BAD_FRACTION = 1000
# config.data.decode: 'exact' (libjpeg-turbo, Pillow's pixels), 'dct_scaled' (JPEGs decoded at a
# reduced DCT scale still >= image_size, then the exact resize) or 'pil' (Pillow only).
DECODE_MODES = ('exact', 'dct_scaled', 'pil')


def _seed64(seed: int) -> int:
  # SeedSequence wants non-negative integers; keep every int seed usable.
  return int(seed) % 2**64


def places_per_process(config, process_count: int = 1) -> int:
  """P_local = data.places_per_batch // process_count (which must divide it)."""
  places = int(config.data.places_per_batch)
  if places <= 0:
    raise ValueError(f'data.places_per_batch must be positive, got {places}.')
  if process_count <= 0 or places % process_count:
    raise ValueError(f'data.places_per_batch={places} must be divisible by the number of '
                     f'processes ({process_count}): each process takes an equal share of every '
                     'global batch.')
  return places // process_count


def steps_per_epoch(index: PlaceIndex, config, process_count: int = 1) -> int:
  """Global batches per epoch: num_places // places_per_batch (the last incomplete one dropped).

  Args:
    index: the place index.
    config: the run's ConfigDict (data.places_per_batch).
    process_count: number of processes (checked to divide places_per_batch).

  Returns:
    Steps per epoch, the same on every process.
  """
  places_per_process(config, process_count)
  steps = index.num_places // int(config.data.places_per_batch)
  if steps == 0:
    raise ValueError(f'The training set has {index.num_places} places, fewer than '
                     f'data.places_per_batch={config.data.places_per_batch}: not one batch.')
  return steps


def epoch_place_order(index: PlaceIndex, seed: int, epoch: int, shuffle_all: bool) -> np.ndarray:
  """The order in which epoch `epoch` visits the places (positions in `index.place_ids`).

  Args:
    index: the place index.
    seed: the run's seed.
    epoch: epoch number (0-based).
    shuffle_all: True shuffles all places; False shuffles within each city and keeps the cities'
      blocks in config order.

  Returns:
    int64 [num_places], a permutation of range(num_places).
  """
  rng = np.random.default_rng([_seed64(seed), _ORDER_STREAM, int(epoch)])
  if shuffle_all:
    return rng.permutation(index.num_places).astype(np.int64)
  return np.concatenate([start + rng.permutation(stop - start)
                         for start, stop in index.city_place_ranges()]).astype(np.int64)


def place_image_order(index: PlaceIndex, place: int, rng: np.random.Generator,
                      random_sample: bool) -> np.ndarray:
  """All images of a place in the order they are used: the first K form the sample.

  Args:
    index: the place index.
    place: place position.
    rng: the element's Generator.
    random_sample: True: a uniform random order (so the first K are drawn without replacement);
      False: most recent first (date, then latitude, both descending, as the reference sorts).

  Returns:
    int64 flat image numbers.
  """
  members = index.place_images(place)
  if random_sample:
    return members[rng.permutation(len(members))]
  # lexsort sorts ascending by the last key first; negate for descending; stable by position.
  order = np.lexsort((-index.image_lats[members], -index.image_dates[members].astype(np.int64)))
  return members[order]


class _EpochPlaceSource:
  """grain data source: local element number -> (epoch, place position).

  Element j of this process is slot j % P_local of local batch j // P_local; local batch b is
  global batch b % steps_per_epoch of epoch b // steps_per_epoch.
  """

  def __init__(self, index: PlaceIndex, seed: int, shuffle_all: bool, num_epochs: int,
               steps: int, places_global: int, places_local: int, process_index: int):
    self._index = index
    self._seed = seed
    self._shuffle_all = shuffle_all
    self._num_epochs = num_epochs
    self._steps = steps
    self._places_global = places_global
    self._places_local = places_local
    self._process_index = process_index
    self._orders = {}
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_orders'] = {}
    del state['_lock']
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self._num_epochs * self._steps * self._places_local

  def _order(self, epoch: int) -> np.ndarray:
    with self._lock:
      order = self._orders.get(epoch)
      if order is None:
        order = epoch_place_order(self._index, self._seed, epoch, self._shuffle_all)
        # Workers move through epochs in order; two are kept for batches straddling a boundary.
        if len(self._orders) >= 2:
          self._orders.pop(min(self._orders))
        self._orders[epoch] = order
      return order

  def __getitem__(self, element: int) -> np.ndarray:
    local_batch, slot = divmod(int(element), self._places_local)
    epoch, step = divmod(local_batch, self._steps)
    position = step * self._places_global + self._process_index * self._places_local + slot
    return np.array([epoch, self._order(epoch)[position]], dtype=np.int64)


def decode_settings(config) -> tuple[tuple[int, int] | None, str]:
  """(min_size, decoder) of `decode.decode_rgb` for config.data.decode (see DECODE_MODES)."""
  mode = config.data.get('decode', 'exact')
  if mode not in DECODE_MODES:
    raise ConfigError(f'Unknown data.decode {mode!r}; valid choices: {", ".join(DECODE_MODES)}.')
  min_size = tuple(int(s) for s in config.image_size) if mode == 'dct_scaled' else None
  return min_size, 'pil' if mode == 'pil' else 'turbo'


class _LoadPlace:
  """grain map: (epoch, place) -> K decoded, resized, augmented images and their labels."""

  def __init__(self, index: PlaceIndex, seed: int, images_per_place: int, random_sample: bool,
               transform: augment.TrainTransform, prepared: Any = None,
               min_size: tuple[int, int] | None = None, decoder: str = 'turbo'):
    self._index = index
    self._seed = seed
    self._k = images_per_place
    self._random_sample = random_sample
    self._transform = transform
    self._prepared = prepared
    self._min_size = min_size
    self._decoder = decoder

  def _load(self, image: int, out: np.ndarray | None) -> np.ndarray:
    if self._prepared is not None:
      return self._prepared.load_pixels(image, self._min_size, self._decoder, out)
    return decode.read_rgb(self._index.image_path(image), self._min_size, self._decoder, out)

  def __call__(self, element: np.ndarray, out: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Loads one place.

    Args:
      element: (epoch, place position).
      out: optional uint8 [K, H, W, 3] to write the images into (a slice of the batch).

    Returns:
      {'images': uint8 [K, H, W, 3] (`out` when given), 'labels': int32 [K],
      'num_bad_images': int32}.
    """
    epoch, place = int(element[0]), int(element[1])
    index = self._index
    rng = np.random.default_rng([_seed64(self._seed), _PLACE_STREAM, epoch, place])
    candidates = place_image_order(index, place, rng, self._random_sample)
    label = int(index.place_ids[place])
    if out is None:
      out = np.empty((self._k, *self._transform.image_size, 3), dtype=np.uint8)
    # Without augmentation, images already at the training size are decoded straight into the
    # batch (no intermediate copies).
    into_batch = not self._transform.augments
    decoded, filled, bad = [], 0, 0
    for image in candidates:
      if filled == self._k:
        break
      try:
        pixels = self._load(int(image), out[filled] if into_batch else None)
      except errors.ImageDecodeError as e:
        bad += 1
        logging.warning('Skipping undecodable training image (place %d): %s', label, e)
        continue
      decoded.append(pixels)
      _put(self._transform(pixels, rng), out[filled])
      filled += 1
    if not decoded:
      paths = [index.image_path(int(i)) for i in candidates]
      raise errors.ImageDecodeError(
          paths[0], f'none of the {len(paths)} images of place {label} could be decoded '
          f'({", ".join(paths)})')
    while filled < self._k:
      _put(self._transform(decoded[filled % len(decoded)], rng), out[filled])
      filled += 1
    return {
        'images': out,
        'labels': np.full((self._k,), label, dtype=np.int32),
        'num_bad_images': np.int32(bad),
    }


def _put(pixels: np.ndarray, slot: np.ndarray):
  if pixels is not slot:
    slot[...] = pixels


class _LoadBatch:
  """grain map: [P, 2] (epoch, place) rows -> one batch, every image decoded into its slot.

  In a worker process with batch slots (`vpr_jax.data.multiprocess.batch_slots`) the images are decoded
  straight into shared memory the main process reads, and only the slot's number travels
  ('images_slot': [worker, slot]); otherwise into a new array ('images'), which grain copies into
  a new shared-memory segment when it leaves a worker.
  """

  def __init__(self, load_place: _LoadPlace, images_per_place: int, image_size: tuple[int, int]):
    self._load_place = load_place
    self._k = images_per_place
    self._image_size = image_size

  def __call__(self, elements: np.ndarray) -> dict[str, np.ndarray]:
    shape = (len(elements), self._k, *self._image_size, 3)
    slot = batch_slots.acquire(shape, np.uint8)
    if slot is None:
      out = np.empty(shape, dtype=np.uint8)
    else:
      worker, slot_number, out = slot
    labels = np.empty((len(elements), self._k), dtype=np.int32)
    bad = 0
    try:
      for row, element in enumerate(elements):
        place = self._load_place(element, out[row])
        labels[row] = place['labels']
        bad += int(place['num_bad_images'])
    except BaseException:
      if slot is not None:
        batch_slots.give_back(slot_number)
      raise
    batch = {'labels': labels, 'num_bad_images': np.int32(bad)}
    if slot is None:
      batch['images'] = out
    else:
      batch['images_slot'] = np.array([worker, slot_number], dtype=np.int32)
    return batch


class _ToBatch:
  """Main-process map: a loaded batch as plain numpy arrays (images from their slot, if any)."""

  def __init__(self, rings: batch_slots.SlotRings | None = None):
    self._rings = rings

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if 'images_slot' in batch:
      worker, slot = (int(v) for v in batch['images_slot'])
      images = self._rings.array(worker, slot)
    else:
      # grain's shared-memory array, viewed without a copy.
      images = np.asarray(batch['images'])
    return {
        'images': images,
        'labels': np.asarray(batch['labels']),
        'num_bad_images': np.int32(batch['num_bad_images']),
    }


class _InitWorker:
  """grain `worker_init_fn`: the worker ends with its parent and writes into its batch slots."""

  def __init__(self, ring_spec: batch_slots.RingSpec | None):
    self._exit_with_parent = worker_counts.ExitWithParent()  # made here: the main process's pid
    self._ring_spec = ring_spec

  def __call__(self, worker_index: int, worker_count: int):
    self._exit_with_parent(worker_index, worker_count)
    if self._ring_spec is not None:
      batch_slots.init_worker(self._ring_spec, worker_index, worker_count)


class TrainIterator:
  """Iterates over the training batches of all epochs; checkpointable.

  Use `next(it)`; `get_state()` / `set_state()` save and restore the position; `close()` (or a
  `with` block) stops the worker processes.

  Attributes:
    steps_per_epoch: global batches per epoch.
    num_steps: total batches (num_epochs * steps_per_epoch).
    places_per_batch: P_local, places in each batch of this process.
    images_per_place: K.
    num_workers: grain worker processes (0: in this process).
  """

  def __init__(self, batches: grain.MapDataset, *, steps_per_epoch: int, num_steps: int,
               places_per_batch: int, images_per_place: int, num_workers: int,
               prefetch_buffer_size: int, max_bad_image_fraction: float,
               fingerprint: dict[str, Any], image_shape: tuple[int, int, int],
               reuse_batch_memory: bool = True):
    self._batches = batches
    self.steps_per_epoch = steps_per_epoch
    self.num_steps = num_steps
    self.places_per_batch = places_per_batch
    self.images_per_place = images_per_place
    self.num_workers = num_workers
    self._prefetch = prefetch_buffer_size
    self._max_bad_fraction = float(max_bad_image_fraction)
    self._fingerprint = fingerprint
    self._image_shape = image_shape
    self._reuse_batch_memory = reuse_batch_memory
    self._rings = None
    # How batches reach this process (`batch_slots.choose_transport`), once the workers started.
    self.transport = None
    self._next_step = 0
    self._images_read = 0
    self._bad_images = 0
    self._iterator = None

  @property
  def next_step(self) -> int:
    """Number of batches delivered so far (the step the next batch belongs to)."""
    return self._next_step

  @property
  def epoch(self) -> int:
    """Epoch of the next batch."""
    return self._next_step // self.steps_per_epoch

  def _start(self) -> Iterator[dict[str, np.ndarray]]:
    remaining = self._batches[self._next_step:]
    if self.num_workers == 0:
      ds = remaining.to_iter_dataset(grain.ReadOptions(
          num_threads=1, prefetch_buffer_size=self._prefetch))
      return iter(ds.map(_ToBatch()))
    worker_memory.release_at_exit()
    shape = (self.places_per_batch, self.images_per_place, *self._image_shape)
    batch_bytes = int(np.prod(shape))
    # Per worker: its queued batches, the one it is writing or waiting to queue, the one
    # grain's reader in this process holds, and the one the consumer reads.
    num_slots = self._prefetch + 3
    self.transport = batch_slots.choose_transport(self.num_workers, num_slots, self._prefetch,
                                                  batch_bytes, self._reuse_batch_memory)
    if self.transport == batch_slots.SLOTS:
      self._rings = batch_slots.SlotRings.create(self.num_workers, num_slots, shape)
    # One reader thread per worker, beside the one handing batches to grain's queue.
    ds = remaining.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
    if self.transport == batch_slots.PIPES:
      # Arrays smaller than min_shm_size are pickled through the pipe: all of them, here.
      ds = grain.experimental.WithOptionsIterDataset(
          ds, grain.experimental.DatasetOptions(min_shm_size=batch_bytes + 1))
    ds = ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=self.num_workers,
                                     per_worker_buffer_size=self._prefetch),
        worker_init_fn=_InitWorker(self._rings.spec if self._rings is not None else None))
    return iter(ds.map(_ToBatch(self._rings)))

  def __iter__(self) -> 'TrainIterator':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._next_step >= self.num_steps:
      raise StopIteration
    if self._iterator is None:
      self._iterator = self._start()
    batch = next(self._iterator)
    self._next_step += 1
    bad = int(batch['num_bad_images'])
    self._bad_images += bad
    self._images_read += self.places_per_batch * self.images_per_place + bad
    self._check_bad_fraction()
    return batch

  def _check_bad_fraction(self):
    if not self._bad_images:
      return
    epoch_reads = self.steps_per_epoch * self.places_per_batch * self.images_per_place
    judged_over = max(self._images_read, min(_MIN_READS_FOR_BAD_FRACTION, epoch_reads))
    if self._bad_images > self._max_bad_fraction * judged_over:
      raise TooManyBadImagesError(
          f'{self._bad_images} of {self._images_read} training image reads failed to decode '
          f'(step {self._next_step}), more than data.max_bad_image_fraction='
          f'{self._max_bad_fraction:g} allows. The warnings above name the files; fix or remove '
          'them (and rebuild the index with data.rebuild_index=True), or raise the limit.')

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position: the next step and the bad-image counters."""
    return {
        'version': _STATE_VERSION,
        'next_step': self._next_step,
        'images_read': self._images_read,
        'bad_images': self._bad_images,
        'fingerprint': dict(self._fingerprint),
    }

  def set_state(self, state: dict[str, Any]):
    """Continues from a `get_state()` result (of an iterator over the same data and settings).

    Args:
      state: the saved state.

    Raises:
      ValueError: the state is malformed or comes from a different dataset or batch layout.
    """
    if not isinstance(state, dict) or state.get('version') != _STATE_VERSION:
      raise ValueError(f'Not a train iterator state of version {_STATE_VERSION}: {state!r}.')
    saved = state.get('fingerprint', {})
    differing = sorted(k for k in set(saved) | set(self._fingerprint)
                       if k not in _DESCRIPTIVE_FIELDS and saved.get(k) != self._fingerprint.get(k))
    if differing:
      details = ', '.join(f'{k}: saved {saved.get(k)!r}, now {self._fingerprint.get(k)!r}'
                          for k in differing)
      if 'index' in differing:
        # The hash alone says nothing to a user: name what changed in the training set.
        changes = [f'{k} {saved[k]!r} -> {self._fingerprint.get(k)!r}'
                   for k in _DESCRIPTIVE_FIELDS
                   if k in saved and saved[k] != self._fingerprint.get(k)]
        details += ('; the training set changed since the checkpoint: ' + ', '.join(changes)
                    if changes else '; the training set changed since the checkpoint (same '
                    'cities and counts: files were renamed, added and removed, or moved)')
      raise DatasetError('The saved data iterator state belongs to a different training set or '
                         f'batch layout ({details}); it cannot resume this one. Restore the '
                         'training set, or start a new workdir.')
    next_step = int(state['next_step'])
    if not 0 <= next_step <= self.num_steps:
      raise ValueError(f'Saved next_step={next_step} is outside [0, {self.num_steps}] '
                       '(data.num_epochs * steps per epoch).')
    self.close()
    self._next_step = next_step
    self._images_read = int(state['images_read'])
    self._bad_images = int(state['bad_images'])

  def close(self):
    """Stops the worker processes (a later `next` starts new ones at the same position)."""
    iterator, self._iterator = self._iterator, None
    if iterator is not None and hasattr(iterator, 'close'):
      iterator.close()
    # After the workers stopped: batches still held keep their slots readable.
    rings, self._rings = self._rings, None
    if rings is not None:
      rings.close()

  def __enter__(self) -> 'TrainIterator':
    return self

  def __exit__(self, *exc_info):
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass


def make_train_iterator(index: PlaceIndex, config, seed: int, process_index: int = 0,
                        process_count: int = 1, num_workers: int | None = None,
                        prepared: Any = None) -> TrainIterator:
  """The training batches of this process over all `config.num_epochs` epochs.

  Args:
    index: the place index (`gsv_cities.build_place_index`).
    config: the run's ConfigDict (image_size, num_epochs, data.*).
    seed: seeds the epoch orders, the image draws and the augmentation.
    process_index: this process's position among `process_count`.
    process_count: number of processes sharing each global batch.
    num_workers: grain worker processes; None takes config.data.num_workers (-1: one per core, at
      most 16); 0 reads in this process.
    prepared: a `training_set.TrainingSource` holding the images of `index` (from
      `training_set.open_training_set`); None reads the original files.

  Returns:
    A TrainIterator yielding the batches described in the module doc.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, {process_count}).')
  data = config.data
  places_local = places_per_process(config, process_count)
  steps = steps_per_epoch(index, config, process_count)
  k = int(data.images_per_place)
  if k <= 0:
    raise ValueError(f'data.images_per_place must be positive, got {k}.')
  gsv_cities.check_images_per_place(index, k)
  num_epochs = int(config.num_epochs)
  if num_epochs <= 0:
    raise ValueError(f'num_epochs must be positive, got {num_epochs}.')
  max_bad = float(data.max_bad_image_fraction)
  if not 0.0 <= max_bad <= 1.0:
    raise ValueError(f'data.max_bad_image_fraction must be in [0, 1], got {max_bad}.')
  prefetch = int(data.prefetch_buffer_size)
  if prefetch <= 0:
    raise ValueError(f'data.prefetch_buffer_size must be positive, got {prefetch}.')
  workers = worker_counts.resolve_num_workers(data.num_workers if num_workers is None else num_workers)
  if prepared is not None and len(prepared) != index.num_images:
    raise ValueError(f'The prepared data in {getattr(prepared, "directory", prepared)!r} holds '
                     f'{len(prepared)} images but the place index has {index.num_images}; pass '
                     'the index and the source of the same built dataset '
                     '(training_set.open_training_set).')

  source = _EpochPlaceSource(index, seed, bool(data.shuffle_all), num_epochs, steps,
                             int(data.places_per_batch), places_local, process_index)
  min_size, decoder = decode_settings(config)
  transform = augment.make_train_transform(config)
  loader = _LoadPlace(index, seed, k, bool(data.random_sample_from_each_place), transform,
                      prepared, min_size, decoder)
  # The (epoch, place) pairs are batched first, so a batch is decoded straight into one array.
  batches = (grain.MapDataset.source(source).batch(places_local, drop_remainder=True)
             .map(_LoadBatch(loader, k, transform.image_size)))
  fingerprint = {
      'index': index.fingerprint,
      'num_places': int(index.num_places),
      'num_images': int(index.num_images),
      'cities': list(index.cities),
      'seed': int(seed),
      'places_per_batch': int(data.places_per_batch),
      'images_per_place': k,
      'process_index': int(process_index),
      'process_count': int(process_count),
      'shuffle_all': bool(data.shuffle_all),
      'random_sample_from_each_place': bool(data.random_sample_from_each_place),
  }
  return TrainIterator(batches, steps_per_epoch=steps, num_steps=num_epochs * steps,
                       places_per_batch=places_local, images_per_place=k, num_workers=workers,
                       prefetch_buffer_size=prefetch, max_bad_image_fraction=max_bad,
                       fingerprint=fingerprint, image_shape=(*transform.image_size, 3),
                       reuse_batch_memory=bool(data.get('reuse_batch_memory', True)))
