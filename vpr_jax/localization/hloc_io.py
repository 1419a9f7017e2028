"""hloc's retrieval file formats (cvg/Hierarchical-Localization), and its rule for retrieval pairs.

hloc uses a global-descriptor model as the retrieval stage of its localisation pipeline through
two files, both written here as hloc writes them:

* a features file (HDF5, `extract_features.main` with a global extractor): one group per image
  name (the path relative to the image folder, '/'-separated; a '/' makes nested groups), holding
  the dataset `global_descriptor` [D] (float32, or float16 with `as_half`) and `image_size`
  [2] (width, height of the stored pixels, int64);
* a pairs file (`pairs_from_retrieval.main`): one `query database` line per retrieved pair, the
  lines joined by '\\n' (no final newline). The pairs are chosen by hloc's rule: inner-product
  scores between the descriptors, self-matches (the same name) and scores below 0 excluded, the
  `num_matched` best per query, best first.

Files vpr_jax writes are marked (a root attribute of the HDF5 file, and the pairs file's SHA-256
recorded in the queries' features file), so that a rerun replaces them and nothing else: a file
at an output path that vpr_jax did not write is refused in one line.
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

import h5py
import numpy as np
from PIL import Image

from vpr_jax import fileio
from vpr_jax.errors import OutputPathError

GLOBAL_DESCRIPTOR = 'global_descriptor'
IMAGE_SIZE = 'image_size'
WRITTEN_BY_ATTR = 'vpr_jax_written_by'
WRITTEN_BY = 'vpr_jax hloc features'
PAIRS_SHA256_ATTR = 'vpr_jax_pairs_sha256'
# Scores of hloc's pairs_from_retrieval below this are not pairs (its min_score=0).
MIN_SCORE = 0.0
_QUERY_CHUNK = 1024


def _marker(path: str, attribute: str) -> str | None:
  """A root attribute of an HDF5 file, or None when it is not one (or lacks the attribute)."""
  try:
    with h5py.File(path, 'r') as f:
      value = f.attrs.get(attribute)
  except (OSError, ValueError):
    return None
  if isinstance(value, bytes):
    value = value.decode('utf-8', 'replace')
  return None if value is None else str(value)


def check_features_output(path: str, what: str) -> str:
  """Checks before any work that a features file can be written (or replaced) at `path`.

  Returns:
    The absolute path.

  Raises:
    OutputPathError: the folder cannot be written, or a file that vpr_jax did not write is there.
  """
  path = fileio.check_output_path(path, what)
  if os.path.lexists(path) and _marker(path, WRITTEN_BY_ATTR) != WRITTEN_BY:
    raise OutputPathError(f'{what} {path!r} exists and was not written by vpr_jax (no '
                          f'{WRITTEN_BY_ATTR} attribute); it is never replaced. Choose another '
                          'path.')
  return path


def check_pairs_output(path: str, features_path: str, what: str) -> str:
  """Checks that a pairs file can be written at `path`: new, or the one recorded in the features.

  Returns:
    The absolute path.

  Raises:
    OutputPathError: the folder cannot be written, or a file is there that is not the pairs file
      that vpr_jax wrote with `features_path`.
  """
  path = fileio.check_output_path(path, what)
  if os.path.lexists(path):
    recorded = _marker(features_path, PAIRS_SHA256_ATTR) if os.path.exists(features_path) else None
    if recorded is None or recorded != file_sha256(path):
      raise OutputPathError(
          f'{what} {path!r} exists and is not the pairs file vpr_jax wrote with '
          f'{os.path.abspath(features_path)!r}; it is never replaced. Choose another path.')
  return path


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def stored_image_size(path: str) -> np.ndarray:
  """(width, height) of the stored pixels, as hloc records them (EXIF orientation ignored)."""
  with Image.open(path) as image:
    return np.asarray(image.size, np.int64)


def write_global_features(path: str, names: Sequence[str], descriptors: np.ndarray,
                          image_sizes: Sequence[np.ndarray], half: bool = False,
                          pairs_sha256: str | None = None) -> None:
  """Writes a features file as hloc's extract_features writes one for a global extractor.

  The file is written whole or not at all (a temporary file, then a rename).

  Args:
    path: the .h5 file.
    names: image names relative to the image folder ('/'-separated), unique.
    descriptors: [len(names), D].
    image_sizes: (width, height) per image.
    half: store the descriptors as float16 (hloc's as_half), else float32.
    pairs_sha256: the SHA-256 of the pairs file written with these features (queries only).
  """
  if len(set(names)) != len(names):
    raise ValueError('image names must be unique in a features file.')
  dtype = np.float16 if half else np.float32
  with fileio.atomic_path(path) as tmp:
    with h5py.File(tmp, 'w', libver='latest') as f:
      f.attrs[WRITTEN_BY_ATTR] = WRITTEN_BY
      if pairs_sha256 is not None:
        f.attrs[PAIRS_SHA256_ATTR] = pairs_sha256
      for name, descriptor, size in zip(names, descriptors, image_sizes):
        group = f.create_group(name)
        group.create_dataset(GLOBAL_DESCRIPTOR, data=np.asarray(descriptor).astype(dtype))
        group.create_dataset(IMAGE_SIZE, data=np.asarray(size, np.int64))


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
  """Column indices of the k best scores per row, best first (ties: lower index first)."""
  if k < scores.shape[1]:
    candidates = np.argpartition(-scores, k - 1, axis=1)[:, :k]
  else:
    candidates = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
  values = np.take_along_axis(scores, candidates, axis=1)
  order = np.lexsort((candidates, -values), axis=1)
  return np.take_along_axis(candidates, order, axis=1)


def pairs_from_retrieval(query_names: Sequence[str], query_descriptors: np.ndarray,
                         db_names: Sequence[str], db_descriptors: np.ndarray,
                         num_matched: int) -> list[tuple[str, str]]:
  """hloc's pairs_from_retrieval rule on given descriptors.

  Args:
    query_names, query_descriptors: the queries and their descriptors [M, D].
    db_names, db_descriptors: the database and its descriptors [N, D].
    num_matched: pairs per query at most (hloc's num_matched; at most N).

  Returns:
    (query name, database name) pairs, by query, best score first: inner products in float32
    (hloc reads float16 files as float32), the same name excluded, scores below 0 excluded.
  """
  query = np.asarray(query_descriptors, np.float32)
  db = np.asarray(db_descriptors, np.float32)
  k = min(int(num_matched), len(db_names))
  if k < 1 or not len(query_names):
    return []
  db_index = np.asarray(db_names, dtype=object)
  pairs = []
  for begin in range(0, len(query_names), _QUERY_CHUNK):
    names = np.asarray(query_names[begin:begin + _QUERY_CHUNK], dtype=object)
    scores = query[begin:begin + len(names)] @ db.T
    invalid = (names[:, None] == db_index[None, :]) | (scores < MIN_SCORE)
    scores[invalid] = -np.inf
    best = _top_k(scores, k)
    for i, row in enumerate(best):
      pairs.extend((names[i], db_names[j]) for j in row if np.isfinite(scores[i, j]))
  return pairs


def pairs_text(pairs: Sequence[tuple[str, str]]) -> str:
  """The pairs file's content, as hloc writes it."""
  return '\n'.join(f'{query} {db}' for query, db in pairs)


def read_pairs(path: str) -> dict[str, list[str]]:
  """{query: [database names, in order]} of a pairs file (hloc's parse_retrieval)."""
  retrieval: dict[str, list[str]] = {}
  with open(path, encoding='utf-8') as f:
    for line in f.read().rstrip('\n').split('\n'):
      if line:
        query, db = line.split()
        retrieval.setdefault(query, []).append(db)
  return retrieval
