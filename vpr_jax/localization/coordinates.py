"""Where a database photo was taken: a CSV, a benchmark-style name, or the EXIF GPS tags.

Per image, the first found of: the `coordinates` CSV (`path,lat,lon`, header optional, paths
relative to the images folder), a benchmark-style name
(`@UTM_east@UTM_north@zone@band@lat@lon@...`), the EXIF GPS tags. `build.build_index` applies
the CSV over what `position_of_file` finds.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from typing import Sequence

from PIL import Image

from vpr_jax.data.evaluation import benchmarks
from vpr_jax.errors import CoordinatesFileError

EXIF_GPS_IFD = 0x8825


@dataclasses.dataclass(frozen=True)
class Position:
  """Where a database image was taken; fields are None when unknown."""
  lat: float | None = None
  lon: float | None = None
  utm_east: float | None = None
  utm_north: float | None = None
  utm_zone: str = ''
  source: str = ''


def valid_latlon(lat: float, lon: float) -> bool:
  """Finite degrees with |lat| <= 90 and |lon| <= 180."""
  return math.isfinite(lat) and math.isfinite(lon) and abs(lat) <= 90 and abs(lon) <= 180


def position_from_name(path: str) -> Position | None:
  """Position from a benchmark-style name `@UTM_east@UTM_north@zone@band@lat@lon@...`, or None."""
  try:
    east, north = benchmarks.parse_utm(path)
  except ValueError:
    return None
  fields = os.path.basename(path).split('@')
  zone = ''.join(fields[3:5]) if len(fields) > 4 else ''
  lat = lon = None
  try:
    lat, lon = float(fields[5]), float(fields[6])
    if not valid_latlon(lat, lon):
      lat = lon = None
  except (IndexError, ValueError):
    pass
  return Position(lat, lon, east, north, zone, 'name')


def _rational_degrees(value) -> float:
  degrees, minutes, seconds = (float(v) for v in value)
  return degrees + minutes / 60.0 + seconds / 3600.0


def position_from_exif(path: str) -> Position | None:
  """Position from the EXIF GPS tags of an image file, or None when it has none (or bad ones)."""
  try:
    with Image.open(path) as img:
      gps = img.getexif().get_ifd(EXIF_GPS_IFD)
      lat = _rational_degrees(gps[2]) * (-1.0 if str(gps.get(1, 'N')).upper() == 'S' else 1.0)
      lon = _rational_degrees(gps[4]) * (-1.0 if str(gps.get(3, 'E')).upper() == 'W' else 1.0)
  except Exception:  # pylint: disable=broad-except
    # No file, no EXIF, no GPS IFD, malformed values: no position from EXIF.
    return None
  return Position(lat, lon, source='exif') if valid_latlon(lat, lon) else None


def position_of_file(images_dir: str, path: str) -> Position | None:
  """What the file itself says: its benchmark-style name, else its EXIF GPS tags (else None)."""
  return position_from_name(path) or position_from_exif(os.path.join(images_dir, path))


def read_coordinates_csv(path: str, images_dir: str) -> dict[str, Position]:
  """Reads `path,lat,lon` rows (an optional header row names the columns).

  Args:
    path: the CSV file.
    images_dir: the indexed folder; absolute image paths are made relative to it.

  Returns:
    {relative path ('/'-separated): Position}.

  Raises:
    CoordinatesFileError: missing file, or a row that is not path,lat,lon with valid degrees.
  """
  positions = {}
  try:
    with open(path, newline='') as f:
      rows = list(csv.reader(f))
  except (OSError, UnicodeDecodeError) as e:
    raise CoordinatesFileError(f'cannot read coordinates file {path!r}: {e}') from None
  columns = (0, 1, 2)
  if rows and not _is_number(rows[0][1:2]):
    header = [c.strip().lower() for c in rows[0]]
    try:
      columns = (header.index('path'), header.index('lat'), header.index('lon'))
    except ValueError:
      raise CoordinatesFileError(
          f'{path}:1: header {rows[0]!r} lacks the columns path, lat, lon') from None
    rows = [None] + rows[1:]
  for line, row in enumerate(rows, start=1):
    if row is None or not any(cell.strip() for cell in row):
      continue
    try:
      image, lat, lon = row[columns[0]].strip(), float(row[columns[1]]), float(row[columns[2]])
      if not image or not valid_latlon(lat, lon):
        raise ValueError
    except (IndexError, ValueError):
      raise CoordinatesFileError(
          f'{path}:{line}: expected path,lat,lon with lat in [-90, 90] and lon in [-180, 180], '
          f'got {row!r}') from None
    if os.path.isabs(image):
      image = os.path.relpath(image, images_dir)
    positions[os.path.normpath(image).replace(os.sep, '/')] = Position(lat, lon, source='csv')
  return positions


def _is_number(cells: Sequence[str]) -> bool:
  try:
    float(cells[0])
    return True
  except (IndexError, ValueError):
    return False
