"""`Localizer`: where photos were taken, against an index written by `build.build_index`.

`Localizer.from_index(folder).localize(photos)` embeds the photos as the index's images were
embedded (`embedding.embed`, the index's decode settings) and returns, for each, the nearest
database images with their coordinates: a `Localization` of `Match`es.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

import faiss
import numpy as np

from vpr_jax.data.imaging import images
from vpr_jax.errors import IndexMismatchError
from vpr_jax.localization import embedding
from vpr_jax.localization import faiss_index as faiss_lib
from vpr_jax.localization import store


@dataclasses.dataclass
class Match:
  """One database image found for a photo.

  Attributes:
    rank: 1 for the nearest.
    image: path relative to the indexed folder.
    file: absolute path of that image.
    distance: L2 distance between the normalised descriptors (0 = identical, 2 = opposite).
    lat, lon: degrees, or None when unknown.
    utm_east, utm_north, utm_zone: UTM position (metres, zone+band) when the name gave one.
    coordinate_source: 'csv', 'name', 'exif' or ''.
  """
  rank: int
  image: str
  file: str
  distance: float
  lat: float | None
  lon: float | None
  utm_east: float | None = None
  utm_north: float | None = None
  utm_zone: str | None = None
  coordinate_source: str = ''

  def to_dict(self) -> dict[str, Any]:
    return {'image': self.image, 'distance': self.distance, 'lat': self.lat, 'lon': self.lon,
            'rank': self.rank, 'file': self.file, 'utm_east': self.utm_east,
            'utm_north': self.utm_north, 'utm_zone': self.utm_zone,
            'coordinate_source': self.coordinate_source}


@dataclasses.dataclass
class Localization:
  """The matches of one photo, nearest first; `image` is the path as given (or '<array i>')."""
  image: str
  matches: list[Match]

  def to_dict(self) -> dict[str, Any]:
    return {'image': self.image, 'matches': [m.to_dict() for m in self.matches]}


def _finite_or_none(value) -> float | None:
  value = float(value)
  return value if math.isfinite(value) else None


class Localizer:
  """Finds where photos were taken, against an index written by `build.build_index`."""

  def __init__(self, index_dir: str, manifest: Mapping[str, Any], rows: Mapping[str, np.ndarray],
               faiss_index: faiss.Index, config, variables, model):
    """Use `Localizer.from_index`."""
    self.index_dir = index_dir
    self.manifest = dict(manifest)
    self.paths = [str(p) for p in rows['paths']]
    self.latlon = np.asarray(rows['latlon'], np.float64)
    self.utm = np.asarray(rows['utm'], np.float64)
    self.utm_zones = [str(z) for z in rows['utm_zones']]
    self.sources = [str(s) for s in rows['coordinate_sources']]
    self.faiss_index = faiss_index
    self.config = config
    self.variables = variables
    self.model = model

  @classmethod
  def from_index(cls, index_dir: str, checkpoint: str | None = None) -> 'Localizer':
    """Opens an index and the checkpoint it was built with.

    Args:
      index_dir: folder written by `build.build_index`.
      checkpoint: the checkpoint to embed photos with; default the one the index was built with.
        Either way its fingerprint must be the index's.

    Returns:
      A Localizer.

    Raises:
      IndexNotFoundError: no index at `index_dir`.
      IndexMismatchError: the checkpoint differs from the index's (model, weights, input size or
        preprocessing).
      DamagedIndexError: a file of the index is missing, unreadable or does not fit the manifest.
    """
    index_dir = os.path.abspath(os.fspath(index_dir))
    manifest = store.require_manifest(index_dir)
    # A damaged index is refused before the checkpoint is loaded.
    rows, faiss_index = store.read_search_files(index_dir, manifest)
    checkpoint = checkpoint or manifest['checkpoint']
    config, variables, _, model = embedding.load_model(checkpoint)
    differing = embedding.fingerprint_differences(
        manifest['fingerprint'], embedding.checkpoint_fingerprint(config, variables))
    if differing:
      raise IndexMismatchError(
          f'index {index_dir!r} was built with another model or preprocessing than checkpoint '
          f'{os.path.abspath(checkpoint)!r} ({", ".join(differing)} differ); rebuild the index '
          'with this checkpoint.')
    faiss_lib.set_nprobe(faiss_index, manifest.get('nprobe', faiss_lib.DEFAULT_NPROBE))
    return cls(index_dir, manifest, rows, faiss_index, config, variables, model)

  @property
  def images_dir(self) -> str:
    """The folder the index was built from."""
    return self.manifest['images_dir']

  def embed(self, photos: Sequence[str | np.ndarray], exif_transpose: bool | None = None,
            fast_decode: bool | None = None, batch_size: int | None = None) -> np.ndarray:
    """L2-normalised float32 descriptors [len(photos), D] of image files or uint8 arrays.

    Args:
      photos: file paths, or uint8 [H, W, 3] RGB arrays (already upright).
      exif_transpose: default the index's setting.
      fast_decode: default the index's setting.
      batch_size: default the index's, at most len(photos).
    """
    settings = dict(self.manifest['decode'])
    if exif_transpose is not None:
      settings['exif_transpose'] = bool(exif_transpose)
    if fast_decode is not None:
      settings['fast_decode'] = bool(fast_decode)
    batch_size = int(batch_size or min(self.manifest.get('batch_size') or 8, len(photos)))
    entries = [p if isinstance(p, np.ndarray) else os.path.abspath(os.fspath(p)) for p in photos]
    return embedding.embed(self.model, self.variables, self.config, '', entries, batch_size, 0,
                           images.DecodeOptions(**settings))

  def search(self, descriptors: np.ndarray, top_k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(L2 distances [M, k], row indices [M, k]) of the nearest database rows; -1 when missing."""
    k = max(1, min(int(top_k), self.faiss_index.ntotal))
    squared, rows = self.faiss_index.search(np.ascontiguousarray(descriptors, np.float32), k)
    return np.sqrt(np.maximum(squared, 0.0)), rows

  def match(self, rank: int, distance: float, row: int) -> Match:
    """The `Match` of database row `row` found at `rank` with `distance`."""
    return Match(
        rank=rank, image=self.paths[row], file=os.path.join(self.images_dir, self.paths[row]),
        distance=float(distance), lat=_finite_or_none(self.latlon[row, 0]),
        lon=_finite_or_none(self.latlon[row, 1]), utm_east=_finite_or_none(self.utm[row, 0]),
        utm_north=_finite_or_none(self.utm[row, 1]), utm_zone=self.utm_zones[row] or None,
        coordinate_source=self.sources[row])

  def localize(self, photos: Sequence[str | np.ndarray] | str | np.ndarray, top_k: int = 5,
               exif_transpose: bool | None = None, fast_decode: bool | None = None
               ) -> list[Localization]:
    """The top-k database images of each photo, with their coordinates.

    Args:
      photos: a path, an array, or a sequence of them (see `embed`).
      top_k: matches per photo (at most the database size).
      exif_transpose: default the index's setting (True for `build_index`'s default).
      fast_decode: default the index's setting.

    Returns:
      One `Localization` per photo, in order.

    Raises:
      images.ImageDecodeError: a photo cannot be read (names the file).
    """
    if isinstance(photos, (str, os.PathLike, np.ndarray)):
      photos = [photos]
    photos = list(photos)
    if not photos:
      return []
    if top_k < 1:
      raise ValueError(f'top_k must be positive, got {top_k}.')
    return self.localize_descriptors(photos, self.embed(photos, exif_transpose, fast_decode),
                                     top_k)

  def localize_descriptors(self, photos: Sequence[str | np.ndarray], descriptors: np.ndarray,
                           top_k: int = 5) -> list[Localization]:
    """`localize` of photos already embedded (`embed`): one `Localization` per photo."""
    distances, rows = self.search(descriptors, top_k)
    results = []
    for q, photo in enumerate(photos):
      name = f'<array {q}>' if isinstance(photo, np.ndarray) else os.fspath(photo)
      matches = [self.match(rank, distance, row)
                 for rank, (distance, row) in enumerate(zip(distances[q], rows[q]), start=1)
                 if row >= 0]
      results.append(Localization(name, matches))
    return results
