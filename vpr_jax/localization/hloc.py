"""vpr_jax as hloc's retrieval stage: an index's and the queries' descriptors as hloc's files.

`vpr_jax.index --hloc-features DB.h5` writes the database of an index (`write_database_features`);
`vpr_jax.localize --hloc-features Q.h5 --pairs PAIRS.txt` writes the queries and the pairs chosen
by hloc's rule (`write_query_features_and_pairs`), so that hloc's
`pairs_from_retrieval.main(descriptors=Q.h5, db_descriptors=DB.h5, ...)` finds the same pairs and
its matching and localisation stages can follow. Formats in `hloc_io`.
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

import numpy as np

from vpr_jax import fileio
from vpr_jax.errors import HlocFormatError
from vpr_jax.localization import build
from vpr_jax.localization import hloc_io
from vpr_jax.localization import store


def _check_names(names: Sequence[str], what: str) -> None:
  for name in names:
    if not name or any(c.isspace() for c in name):
      raise HlocFormatError(f'{what} {name!r}: hloc\'s pairs file separates names by spaces, so '
                            'an image name cannot hold whitespace; rename the file.')


def write_database_features(index_dir: str, features_path: str) -> int:
  """Writes the descriptors of an index's database as hloc's features file.

  Args:
    index_dir: an index folder (`build.build_index`).
    features_path: the .h5 file (replaced only when vpr_jax wrote it).

  Returns:
    The number of images written. Names are the index's paths (relative to its images folder);
    descriptors are the stored ones (float16 for an index built with `half`).
  """
  features_path = hloc_io.check_features_output(features_path, '--hloc-features')
  manifest = store.require_manifest(index_dir)
  rows = store.read_rows(index_dir, manifest)
  _check_names(rows.paths, 'database image')
  sizes = [hloc_io.stored_image_size(os.path.join(manifest['images_dir'], p)) for p in rows.paths]
  hloc_io.write_global_features(features_path, rows.paths, rows.descriptors, sizes,
                                half=manifest['dtype'] == 'float16')
  return len(rows.paths)


def build_index_and_features(hloc_features: str | None, checkpoint: str, images_dir: str,
                             out: str, print_fn=print, **build_options) -> build.BuildStats:
  """`build.build_index`, then (when `hloc_features` is given) hloc's features file of the index.

  The features path is checked before the build, so a path that cannot be written costs nothing.
  """
  if hloc_features:
    hloc_io.check_features_output(hloc_features, '--hloc-features')
  stats = build.build_index(checkpoint, images_dir, out, print_fn=print_fn, **build_options)
  if hloc_features:
    count = write_database_features(out, hloc_features)
    print_fn(f'Wrote {count} global descriptors for hloc to {hloc_features}')
  return stats


def query_names(photos: Sequence[str], images_dir: str, image_dir: str | None = None) -> list[str]:
  """hloc names of query photos: paths relative to `image_dir`, '/'-separated.

  Args:
    photos: the query files.
    images_dir: the index's images folder: the default root when every photo lies under it (so
      that a database image given as a query is a self-match, as in hloc).
    image_dir: the root to name the photos from; default `images_dir` as above, else the folder
      that holds all the photos.

  Raises:
    HlocFormatError: a photo outside `image_dir`, or a name that hloc's files cannot hold.
  """
  paths = [os.path.abspath(os.fspath(p)) for p in photos]
  if image_dir is None:
    inside = all(os.path.commonpath([images_dir, p]) == images_dir for p in paths)
    root = images_dir if inside else os.path.commonpath([os.path.dirname(p) for p in paths])
  else:
    root = os.path.abspath(image_dir)
  names = []
  for path in paths:
    if os.path.commonpath([root, path]) != root:
      raise HlocFormatError(f'query photo {path!r} is not under --hloc-image-dir {root!r}; hloc '
                            'names images by their path relative to one folder.')
    names.append(os.path.relpath(path, root).replace(os.sep, '/'))
  _check_names(names, 'query image')
  return names


def write_query_features_and_pairs(index_dir: str, manifest, photos: Sequence[str],
                                   descriptors: np.ndarray, features_path: str, pairs_path: str,
                                   num_matched: int, image_dir: str | None = None
                                   ) -> list[tuple[str, str]]:
  """Writes the queries' features file and the retrieval pairs, as hloc's rule chooses them.

  Args:
    index_dir, manifest: the index the photos were localised against.
    photos: the query files, as given (a photo given twice is written once).
    descriptors: their L2-normalised float32 descriptors [len(photos), D].
    features_path: the queries' .h5 file.
    pairs_path: the pairs file.
    num_matched: pairs per query at most.
    image_dir: the folder the query names are relative to (see `query_names`).

  Returns:
    The pairs written.
  """
  names = query_names(photos, manifest['images_dir'], image_dir)
  first = {}
  for i, name in enumerate(names):
    first.setdefault(name, i)
  keep = sorted(first.values())
  names = [names[i] for i in keep]
  half = manifest['dtype'] == 'float16'
  # The pairs are chosen from the values hloc will read back: float16 files are read as float32.
  stored = np.asarray(descriptors, np.float32)[keep].astype(np.float16 if half else np.float32)
  rows = store.read_rows(index_dir, manifest)
  pairs = hloc_io.pairs_from_retrieval(names, stored, rows.paths, rows.descriptors, num_matched)
  text = hloc_io.pairs_text(pairs)
  sizes = [hloc_io.stored_image_size(photos[i]) for i in keep]
  hloc_io.write_global_features(features_path, names, stored, sizes, half=half,
                                pairs_sha256=hashlib.sha256(text.encode('utf-8')).hexdigest())
  fileio.atomic_write(pairs_path, text.encode('utf-8'))
  return pairs
