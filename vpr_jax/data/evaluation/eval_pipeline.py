"""The evaluation input pipeline: fixed-shape, padded, ordered batches of decoded images.

A grain `MapDataset` over batches of path indices: element i decodes images
[i * B, (i + 1) * B) of the path list (load_rgb + torchvision-exact resize), so every batch has
the same shape; the last one is padded with zero images whose `mask` is False and `index` is -1.
Batches come out in order, whatever the number of threads and worker processes (grain slices the
batches over workers and reads them back round-robin).

Worker processes (num_workers > 0) are spawned and only run this module's decode function: no
JAX computation happens in them. (grain itself imports the `jax` package on import, and spawned
workers re-import the parent's `__main__` module; neither initialises a JAX backend.)

With an `image_reader` (a prepared benchmark's records), image i is `image_reader(i)` instead of
the file `root/paths[i]`, resized the same way.

An entry of the path list may also be an image already in memory (a uint8 [H, W, 3] or [H, W]
array): it is resized the same way (`images.resized_array_from_pixels`).

An image that cannot be decoded stops the evaluation with an `ImageDecodeError` naming the file:
skipping it would silently change Recall@N.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Iterator, Sequence

import grain
import numpy as np

from vpr_jax.data.imaging import images
from vpr_jax.data.multiprocess import worker_memory
from vpr_jax.data.multiprocess import workers


class _DecodeBatch:
  """Decodes one padded batch of images; picklable, so it can run in grain worker processes."""

  def __init__(self, root: str, relative_paths: Sequence[str], image_size: tuple[int, int],
               batch_size: int, decode_options: images.DecodeOptions | None = None,
               image_reader: Callable[[int], np.ndarray] | None = None):
    self.root = root
    self.relative_paths = list(relative_paths)
    self.image_size = image_size
    self.batch_size = batch_size
    self.decode_options = decode_options
    self.image_reader = image_reader

  def _resized_from_reader(self, i: int) -> np.ndarray:
    # Stored images (a prepared benchmark) are decoded like the files, then resized the same way.
    pixels = self.image_reader(i)
    if self.decode_options is not None and self.decode_options.interpolation == 'bicubic':
      return images.resize_bicubic_array(pixels, self.image_size)
    return images.resize_array(pixels, self.image_size)

  def __call__(self, batch_index: int) -> dict[str, np.ndarray]:
    height, width = self.image_size
    start = int(batch_index) * self.batch_size
    stop = min(start + self.batch_size, len(self.relative_paths))
    pixels = np.zeros((self.batch_size, height, width, 3), dtype=np.uint8)
    mask = np.zeros((self.batch_size,), dtype=bool)
    index = np.full((self.batch_size,), -1, dtype=np.int32)
    for slot, i in enumerate(range(start, stop)):
      entry = self.relative_paths[i]
      if self.image_reader is not None:
        pixels[slot] = self._resized_from_reader(i)
      elif isinstance(entry, np.ndarray):
        pixels[slot] = images.resized_array_from_pixels(entry, self.image_size)
      else:
        path = os.path.join(self.root, entry)
        pixels[slot] = images.load_resized_array(path, self.image_size, self.decode_options)
      mask[slot] = True
      index[slot] = i
    return {'images': pixels, 'mask': mask, 'index': index}


def num_batches(num_images: int, batch_size: int) -> int:
  """Batches needed for `num_images` images (the last one padded)."""
  return math.ceil(num_images / batch_size)


def make_eval_dataset(root: str, relative_paths: Sequence[str], image_size: Sequence[int],
                      batch_size: int, decode_options: images.DecodeOptions | None = None,
                      image_reader: Callable[[int], np.ndarray] | None = None
                      ) -> grain.MapDataset:
  """The evaluation batches as a grain MapDataset (random access: `ds[i]` is batch i).

  Args:
    root: folder the paths are relative to.
    relative_paths: images in evaluation order.
    image_size: (height, width) after resizing.
    batch_size: images per batch.
    decode_options: how files are decoded; default exact, EXIF orientation ignored.
    image_reader: instead of the files, `image_reader(i)` gives the decoded pixels of image i
      (a prepared benchmark's records); it must be picklable for worker processes.

  Returns:
    A MapDataset of dicts `images` uint8 [B, H, W, 3], `mask` bool [B], `index` int32 [B].
  """
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  if not relative_paths:
    raise ValueError(f'no images to evaluate under {root!r}')
  if len(relative_paths) >= 2**31:
    raise ValueError('at most 2**31 - 1 images (indices are int32)')
  height, width = int(image_size[0]), int(image_size[1])
  decode = _DecodeBatch(os.fspath(root), relative_paths, (height, width), int(batch_size),
                        decode_options, image_reader)
  return grain.MapDataset.range(num_batches(len(relative_paths), batch_size)).map(decode)


def make_eval_iterator(root: str, relative_paths: Sequence[str], image_size: Sequence[int],
                       batch_size: int, num_workers: int = 0, num_threads: int = 2,
                       prefetch_batches: int = 2,
                       decode_options: images.DecodeOptions | None = None,
                       image_reader: Callable[[int], np.ndarray] | None = None
                       ) -> Iterator[dict[str, np.ndarray]]:
  """Iterates over the evaluation batches of a path list, in order.

  Args:
    root: folder the paths are relative to (e.g. a BenchmarkSet's root).
    relative_paths: images in evaluation order (e.g. BenchmarkSet.image_paths).
    image_size: (height, width) after resizing.
    batch_size: images per batch; the last batch is padded.
    num_workers: grain worker processes (0: decode in this process).
    num_threads: decoding threads per process (PIL releases the GIL while decoding).
    prefetch_batches: batches buffered per process.
    decode_options: how files are decoded; default exact, EXIF orientation ignored.
    image_reader: see `make_eval_dataset`.

  Returns:
    An iterator of dicts: `images` uint8 [B, H, W, 3], `mask` bool [B] (False for padding),
    `index` int32 [B] (position in `relative_paths`, -1 for padding).

  Raises:
    errors.ImageDecodeError: (while iterating) an image cannot be decoded; names the file.
  """
  if num_workers < 0:
    raise ValueError(f'num_workers must be >= 0, got {num_workers}')
  dataset = make_eval_dataset(root, relative_paths, image_size, batch_size, decode_options,
                              image_reader)
  num_threads = max(0, int(num_threads))
  read_options = grain.ReadOptions(num_threads=num_threads,
                                   prefetch_buffer_size=max(1, int(prefetch_batches), num_threads))
  iter_dataset = dataset.to_iter_dataset(read_options)
  if num_workers > 0:
    worker_memory.release_at_exit()
    iter_dataset = iter_dataset.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=min(num_workers, len(dataset)),
                                     per_worker_buffer_size=max(1, int(prefetch_batches))),
        worker_init_fn=workers.ExitWithParent())
  return _closing(iter(iter_dataset))


def _closing(iterator) -> Iterator[dict[str, np.ndarray]]:
  # Stops grain's threads and worker processes as soon as iteration ends or fails, instead of
  # whenever the garbage collector gets to the iterator.
  try:
    yield from iterator
  finally:
    close = getattr(iterator, 'close', None)
    if close is not None:
      close()
