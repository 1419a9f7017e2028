"""The cache of positives computed from file names (UTM within a radius), one small `.npz` per set.

Kept in `<split>/.vpr_jax_cache/`, or, when that folder is not writable, in `$VPR_JAX_CACHE_DIR`,
else `$XDG_CACHE_HOME/vpr_jax`, else `~/.cache/vpr_jax`; keyed on the file listing, the radius
and the split folder. Files are written atomically (`fileio.atomic_write`) and read with
`safe_numpy` (a cache file is a file on disk like any other); a damaged one is rebuilt.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Sequence

import numpy as np

from vpr_jax import fileio
from vpr_jax import safe_numpy
from vpr_jax.errors import ArrayFileError

CACHE_DIR_ENV = 'VPR_JAX_CACHE_DIR'
_CACHE_VERSION = 1


def pack_positives(positives: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Flat int64 indices + int64 offsets [M + 1] for a list of index arrays."""
  lengths = np.array([len(p) for p in positives], dtype=np.int64)
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  flat = (np.concatenate([np.asarray(p, np.int64) for p in positives])
          if len(positives) else np.zeros((0,), np.int64))
  return flat.astype(np.int64), offsets


def unpack_positives(flat: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
  """Inverse of `pack_positives`."""
  return [np.asarray(flat[offsets[i]:offsets[i + 1]], np.int64) for i in range(len(offsets) - 1)]


def user_cache_dir() -> str:
  """The per-user cache folder (used when a split folder is not writable)."""
  if os.environ.get(CACHE_DIR_ENV):
    return os.path.join(os.path.expanduser(os.environ[CACHE_DIR_ENV]), 'benchmarks')
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'vpr_jax', 'benchmarks')


def cache_key(split_dir: str, listing_sha1: str, radius_m: float) -> str:
  """The key of one set's positives: listing, radius and folder."""
  digest = hashlib.sha1(f'{_CACHE_VERSION}|{listing_sha1}|{radius_m!r}'.encode('utf-8'))
  # The user-level cache is shared by all splits: keep the folder in the key there.
  digest.update(os.path.abspath(split_dir).encode('utf-8'))
  return digest.hexdigest()[:20]


def _candidates(split_dir: str, key: str) -> list[str]:
  return [os.path.join(split_dir, '.vpr_jax_cache', f'positives_{key}.npz'),
          os.path.join(user_cache_dir(), f'positives_{key}.npz')]


def read(split_dir: str, key: str, num_queries: int) -> list[np.ndarray] | None:
  """The cached positives, or None (absent, damaged or of another size)."""
  for path in _candidates(split_dir, key):
    if os.path.isfile(path):
      try:
        arrays = safe_numpy.load_npz(path, keys=['flat', 'offsets'])
      except ArrayFileError:
        continue  # A damaged cache file is rebuilt.
      flat, offsets = arrays['flat'], arrays['offsets']
      if (flat.ndim == 1 and offsets.ndim == 1 and len(offsets) == num_queries + 1
          and flat.dtype.kind in 'iu' and offsets.dtype.kind in 'iu' and offsets[0] == 0
          and np.all(np.diff(offsets) >= 0) and offsets[-1] == len(flat)):
        return unpack_positives(flat, offsets)
  return None


def write(split_dir: str, key: str, positives: Sequence[np.ndarray]) -> str | None:
  """Stores the positives where it can; returns the file, or None when no folder is writable."""
  flat, offsets = pack_positives(positives)
  buffer = io.BytesIO()
  np.savez_compressed(buffer, flat=flat, offsets=offsets)
  for path in _candidates(split_dir, key):
    try:
      fileio.atomic_write(path, buffer.getvalue())
      return path
    except OSError:
      continue
  return None
