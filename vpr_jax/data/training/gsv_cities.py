"""The training places: GSV-Cities and GSV-XS folders -> a compact, cached place index.

Two layouts are read:

* 'gsv_cities', GSV-Cities as distributed::

    <train_dir>/Dataframes/<City>.csv      columns place_id, year, month, northdeg, city_id, lat,
                                           lon, panoid (others ignored), one row per image
    <train_dir>/Images/<City>/<city_id>_<place_id:07d>_<year:04d>_<month:02d>_<northdeg:03d>_
                              <lat>_<lon>_<panoid>.jpg

  with lat/lon written as Python's `str()` of the CSV float. The CSV is authoritative: images
  that no row names are ignored, rows whose image is missing are an error.

* 'gsv_xs', the '@'-named subset used by mldl24-vpr::

    <train_dir>/<city>/@UTM_east@UTM_north@zone@band@lat@lon@panoid@@northdeg@@@@YYYYMM@place@.jpg

  where the place field is unique within a city: an integer, or `<integer>_<City>` as in the
  GSV-XS release (the integer is the place id), or any other text (places are then numbered in
  sorted order of that text). Files without an image extension (.jpg, .jpeg, .png) are ignored.

Checked are only what the project uses or needs to find an image, with bounds that real data
cannot break: place ids (integers >= 0), dates (year and month 1-12: the "most recent" order),
lat/lon (finite, within +-90 / +-180; the latitude breaks ties of that order), UTM east/north of
'@' names (finite, within +-1e8 m), panorama ids (non-empty; one panorama of one place has one
date and position), the CSV's city_id, and the heading of the CSV layout, which is part of the
image name and so must be an integer. Any integer heading (northdeg) is accepted and kept as it
is: the real metadata holds headings from -11 to 731 (a fifth of them outside [0, 360]); an '@'
name's heading is not read at all. Values that are odd but usable (such headings, repeated CSV
rows, images that no CSV row names, non-image files) are counted in `PlaceIndex.odd_values` and
shown once in the stats table, not refused or logged per file.

City names from the config are matched to the CSV files / city folders exactly, or else ignoring
case (the GSV-XS folders are lower-cased).

Place ids are made unique across cities as the reference loader does: the place of city number
i in the config's list gets the label `i * 100000 + place_id` (the stride grows to the next power
of ten if a city has place ids >= 100000). Places with fewer than `min_img_per_place` images are
dropped. Within a place, images are sorted by file name; places are sorted by city (config order)
then place id. Shuffling happens per epoch in the train pipeline, not here.

The index is cached as an .npz file (no pickle) keyed by a hash of the arguments and of the
folder listing (plus the CSV bytes), so adding, removing or renaming an image builds a new one.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import errno
import hashlib
import json
import math
import os
import re
from typing import Iterable, Sequence

from absl import logging
import numpy as np

from vpr_jax import fileio
from vpr_jax import safe_numpy
from vpr_jax.errors import ConfigError
from vpr_jax.errors import DatasetError

LAYOUTS = ('gsv_cities', 'gsv_xs')
CSV_COLUMNS = ('place_id', 'year', 'month', 'northdeg', 'city_id', 'lat', 'lon', 'panoid')
# The reference loader offsets the place ids of the i-th city by i * 10**5.
CITY_ID_STRIDE = 10**5
DEFAULT_CACHE_SUBDIR = '.vpr_jax_cache'
# Bump when the cached arrays or the indexing rules change: old caches are then ignored.
_CACHE_VERSION = 2
_IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
# How many offending files / rows an error message lists before summarising the rest.
_MAX_LISTED = 5
# Headings outside this range are real (the GSV metadata has -11 to 731): counted, kept as is.
_HEADING_RANGE = (0, 360)
# Place fields of '@' names: '<id>_<City>' and '<id>' or '<id>_<anything>'.
_PLACE_OF_CITY = re.compile(r'(\d+)_(.+)')
_PLACE_NUMBER = re.compile(r'(\d+)(?:_.+)?')
# Odd-but-usable values, as named in the stats table.
ODD_HEADING = 'headings outside [0, 360] (kept as is)'
ODD_HEADING_TEXT = 'headings that are not integers (kept as is)'
ODD_REPEATED_ROW = 'CSV rows repeating another row (indexed once)'
ODD_UNLISTED_IMAGE = 'images that no CSV row names (ignored)'
ODD_NOT_AN_IMAGE = 'files without an image extension (ignored)'


def check_config(data_config) -> None:
  """Checks data.train_layout and data.min_img_per_place (ConfigError naming the field)."""
  if data_config.train_layout not in LAYOUTS:
    raise ConfigError(f'Unknown data.train_layout {data_config.train_layout!r}; valid choices: '
                      f'{", ".join(LAYOUTS)}.')
  if int(data_config.min_img_per_place) < 1:
    raise ConfigError(f'data.min_img_per_place must be >= 1, got {data_config.min_img_per_place}.')


@dataclasses.dataclass(frozen=True, eq=False)
class PlaceIndex:
  """All training places and their images, as flat numpy arrays (cheap to pickle).

  Images of place p are `image_paths[place_offsets[p]:place_offsets[p + 1]]`.

  Attributes:
    root: the training folder (absolute); image paths are relative to it.
    layout: 'gsv_cities' or 'gsv_xs'.
    cities: city names as found on disk, in config order.
    image_paths: bytes [num_images], UTF-8 paths relative to `root`.
    image_dates: int32 [num_images], year * 100 + month (for "most recent").
    image_lats: float64 [num_images], latitude (the reference's tie-break after the date).
    place_offsets: int64 [num_places + 1].
    place_ids: int32 [num_places], labels unique across cities.
    place_cities: int32 [num_places], position of the place's city in `cities`.
    min_img_per_place: the threshold the index was built with.
    num_dropped_places: places dropped for having fewer than `min_img_per_place` images.
    num_dropped_images: their images.
    fingerprint: hex hash of the arguments and the listing (the cache key).
    odd_values: (what, count) pairs of values that are odd but usable (e.g. headings outside
      [0, 360]), counted over the files read (before small places are dropped), for the stats
      table.
  """
  root: str
  layout: str
  cities: tuple[str, ...]
  image_paths: np.ndarray
  image_dates: np.ndarray
  image_lats: np.ndarray
  place_offsets: np.ndarray
  place_ids: np.ndarray
  place_cities: np.ndarray
  min_img_per_place: int
  num_dropped_places: int
  num_dropped_images: int
  fingerprint: str
  odd_values: tuple[tuple[str, int], ...] = ()

  @property
  def num_places(self) -> int:
    return int(self.place_ids.shape[0])

  @property
  def num_images(self) -> int:
    return int(self.image_paths.shape[0])

  @property
  def num_cities(self) -> int:
    return len(self.cities)

  @property
  def images_per_place(self) -> np.ndarray:
    """int64 [num_places]: how many images each place has."""
    return np.diff(self.place_offsets)

  def image_path(self, image: int) -> str:
    """Absolute path of flat image number `image`."""
    return os.path.join(self.root, self.image_paths[image].decode('utf-8'))

  def place_images(self, place: int) -> np.ndarray:
    """Flat image numbers of place `place` (a position in `place_ids`, not the label)."""
    return np.arange(self.place_offsets[place], self.place_offsets[place + 1])

  def city_place_ranges(self) -> list[tuple[int, int]]:
    """[start, stop) place positions of each city, in `cities` order."""
    bounds = np.searchsorted(self.place_cities, np.arange(self.num_cities + 1), side='left')
    return [(int(bounds[c]), int(bounds[c + 1])) for c in range(self.num_cities)]


# Listing and city resolution.


def _unreadable(path: str, error: OSError) -> DatasetError:
  """The one-line error for an entry that cannot be read (a symbolic link loop, no permission)."""
  if error.errno == errno.ELOOP:
    return DatasetError(f'{path!r} is a symbolic link loop ({error.strerror}); expected an image '
                        'file or a folder. Remove the link or point it at a file.')
  return DatasetError(f'{path!r} cannot be read: {error.strerror or error}.')


def _list_entries(folder: str, want_dirs: bool) -> list[str]:
  """Names of the regular files (or folders) in `folder` (hidden ones skipped), sorted."""
  names = []
  try:
    with os.scandir(folder) as entries:
      for entry in entries:
        if entry.name.startswith('.'):
          continue
        try:
          # Follows symbolic links: a link to an image counts, a link loop raises ELOOP.
          wanted = entry.is_dir() if want_dirs else entry.is_file()
        except OSError as e:
          raise _unreadable(entry.path, e) from None
        if wanted:
          names.append(entry.name)
  except OSError as e:
    raise _unreadable(folder, e) from None
  names.sort()
  return names


def _list_files(folder: str) -> list[str]:
  """Names of the regular files in `folder` (hidden ones skipped), sorted."""
  return _list_entries(folder, want_dirs=False)


def _check_folder(path: str, what: str):
  try:
    os.stat(path)
  except FileNotFoundError:
    raise DatasetError(f'{what} {path!r} does not exist.') from None
  except OSError as e:
    raise _unreadable(path, e) from None
  if not os.path.isdir(path):
    raise DatasetError(f'{what} {path!r} is not a folder.')


def available_cities(train_dir: str, layout: str) -> list[str]:
  """The cities present in a training folder (CSV names or city folders), sorted.

  Args:
    train_dir: the training folder.
    layout: 'gsv_cities' or 'gsv_xs'.

  Returns:
    City names as spelled on disk.
  """
  _check_layout(layout)
  _check_folder(train_dir, 'Training folder')
  if layout == 'gsv_cities':
    frames = os.path.join(train_dir, 'Dataframes')
    _check_folder(frames, 'GSV-Cities Dataframes folder')
    return sorted(n[:-4] for n in _list_files(frames) if n.lower().endswith('.csv'))
  return _list_entries(train_dir, want_dirs=True)


def _check_layout(layout: str):
  if layout not in LAYOUTS:
    raise ConfigError(f'Unknown data.train_layout {layout!r}; valid choices: '
                      f'{", ".join(LAYOUTS)}.')


def _resolve_cities(requested: Sequence[str], found: Sequence[str], where: str) -> list[str]:
  """Maps config city names to names on disk (exact match first, then ignoring case)."""
  by_lower = {}
  for name in found:
    by_lower.setdefault(name.lower(), []).append(name)
  resolved, missing = [], []
  for city in requested:
    if city in found:
      resolved.append(city)
    elif len(by_lower.get(city.lower(), [])) == 1:
      resolved.append(by_lower[city.lower()][0])
    elif len(by_lower.get(city.lower(), [])) > 1:
      raise DatasetError(f'City {city!r} matches several entries in {where} when ignoring case: '
                         f'{by_lower[city.lower()]}; name it exactly.')
    else:
      missing.append(city)
  if missing:
    raise DatasetError(f'Cities {missing} (from config data.cities) are not in {where}. '
                       f'Cities found there: {sorted(found) or "none"}.')
  return resolved


# Parsing.


@dataclasses.dataclass
class _CityRecords:
  """Per-image fields of one city, before grouping."""
  names: list[str] = dataclasses.field(default_factory=list)
  place_keys: list[str] = dataclasses.field(default_factory=list)
  dates: list[int] = dataclasses.field(default_factory=list)
  lats: list[float] = dataclasses.field(default_factory=list)
  odd: collections.Counter = dataclasses.field(default_factory=collections.Counter)


def _where(path: str, line: int | None) -> str:
  return f'{path}, line {line}' if line is not None else path


def _parse_int(text: str, column: str, path: str, line: int | None, low: int | None = None,
               high: int | None = None) -> int:
  """An integer field, optionally within [low, high] (None: unbounded)."""
  try:
    value = int(text.strip())
  except ValueError:
    raise DatasetError(
        f'{_where(path, line)}: {column} must be an integer, got {text!r}.') from None
  if (low is not None and value < low) or (high is not None and value > high):
    raise DatasetError(
        f'{_where(path, line)}: {column} must be in [{low}, {high}], got {value}.')
  return value


def _parse_float(text: str, column: str, path: str, line: int | None, bound: float) -> float:
  try:
    value = float(text.strip())
  except ValueError:
    raise DatasetError(
        f'{_where(path, line)}: {column} must be a number, got {text!r}.') from None
  if not math.isfinite(value) or abs(value) > bound:
    raise DatasetError(
        f'{_where(path, line)}: {column} must be a finite number within +-{bound}, got {text!r}.')
  return value


def _check_conflicts(seen: dict, place_key: str, panoid: str, meta: tuple, origin: str,
                     describe: str, folder: str = ''):
  """Two images of one place from the same panorama must agree on date and position.

  `origin` names the row or file; with `folder`, it is a file name in that folder.
  """
  key = (place_key, panoid)
  previous = seen.get(key)
  if previous is None:
    seen[key] = (meta, origin)
  elif previous[0] != meta:
    first, second = ((repr(os.path.join(folder, previous[1])), repr(os.path.join(folder, origin)))
                     if folder else (previous[1], origin))
    raise DatasetError(
        f'Conflicting entries for place {place_key} (panorama {panoid!r}): {first} says '
        f'{describe} = {previous[0]}, {second} says {meta}. Two places may share one id.')


def _scan_gsv_cities_city(train_dir: str, city: str) -> tuple[tuple, str]:
  """Reads the CSV bytes and lists Images/<city>; returns (raw CSV, listing) and their digest."""
  csv_path = os.path.join(train_dir, 'Dataframes', f'{city}.csv')
  image_dir = os.path.join(train_dir, 'Images', city)
  _check_folder(image_dir, f'Image folder of city {city!r}')
  listing = _list_files(image_dir)
  if not listing:
    raise DatasetError(f'Image folder {image_dir!r} of city {city!r} is empty.')
  try:
    with open(csv_path, 'rb') as f:
      raw = f.read()
  except OSError as e:
    raise _unreadable(csv_path, e) from None
  digest = hashlib.sha256()
  digest.update(raw)
  digest.update('\n'.join(listing).encode('utf-8'))
  return (raw, listing), digest.hexdigest()


def _read_csv_header(raw: bytes, csv_path: str):
  """(csv reader positioned after the header, header, column index of each CSV_COLUMNS name)."""
  try:
    text = raw.decode('utf-8-sig')
  except UnicodeDecodeError as e:
    raise DatasetError(f'{csv_path} is not UTF-8 text: {e}') from None
  reader = csv.reader(text.splitlines())
  header = next(reader, None)
  if header is None:
    raise DatasetError(f'{csv_path} is empty; expected a header with columns {CSV_COLUMNS}.')
  header = [h.strip() for h in header]
  missing = [c for c in CSV_COLUMNS if c not in header]
  if missing:
    raise DatasetError(f'{csv_path}: missing columns {missing}; the header has {header}, '
                       f'expected at least {list(CSV_COLUMNS)}.')
  return reader, header, {c: header.index(c) for c in CSV_COLUMNS}


def _parse_csv_row(row: list[str], col: dict[str, int], where: str, city: str,
                   image_dir: str) -> dict:
  """The checked fields of one CSV row (`where`: the file and line, for messages)."""
  csv_path, line = where
  fields = {
      'place_id': _parse_int(row[col['place_id']], 'place_id', csv_path, line, 0, 10**9),
      'year': _parse_int(row[col['year']], 'year', csv_path, line, 0, 9999),
      'month': _parse_int(row[col['month']], 'month', csv_path, line, 1, 12),
      # Any integer: it is only needed to spell the image name (real headings span -11 to 731).
      'northdeg': _parse_int(row[col['northdeg']], 'northdeg', csv_path, line),
      'lat_text': row[col['lat']].strip(), 'lon_text': row[col['lon']].strip(),
      'city_id': row[col['city_id']].strip(), 'panoid': row[col['panoid']].strip()}
  fields['lat'] = _parse_float(fields['lat_text'], 'lat', csv_path, line, 90.0)
  fields['lon'] = _parse_float(fields['lon_text'], 'lon', csv_path, line, 180.0)
  if fields['city_id'] != city:
    raise DatasetError(f'{csv_path}, line {line}: city_id {fields["city_id"]!r} differs from the '
                       f'CSV\'s city {city!r} (images are read from {image_dir}).')
  if not fields['panoid']:
    raise DatasetError(f'{csv_path}, line {line}: empty panoid.')
  return fields


def _image_name(fields: dict, listed: set) -> tuple[str, bool]:
  """(the image file a row names, whether it is in the listing).

  The reference writes lat/lon with str() of the parsed float; the CSV text is the fallback for
  files written by other tools. f'{-5:03d}' == str(-5).zfill(3) == '-05', as the reference.
  """
  prefix = (f'{fields["city_id"]}_{fields["place_id"]:07d}_{fields["year"]:04d}_'
            f'{fields["month"]:02d}_{fields["northdeg"]:03d}_')
  name = f'{prefix}{fields["lat"]}_{fields["lon"]}_{fields["panoid"]}.jpg'
  if name in listed:
    return name, True
  alternative = f'{prefix}{fields["lat_text"]}_{fields["lon_text"]}_{fields["panoid"]}.jpg'
  if alternative in listed:
    return alternative, True
  return name, False


def _parse_gsv_cities_city(train_dir: str, city: str, scan: tuple) -> _CityRecords:
  """Parses Dataframes/<city>.csv against the listing of Images/<city>."""
  raw, listing = scan
  csv_path = os.path.join(train_dir, 'Dataframes', f'{city}.csv')
  image_dir = os.path.join(train_dir, 'Images', city)
  reader, header, col = _read_csv_header(raw, csv_path)
  listed = set(listing)
  records = _CityRecords()
  seen_names = {}
  seen_panoramas = {}
  missing_images = []
  num_rows = 0
  for row in reader:
    line = reader.line_num
    if not row or all(not field.strip() for field in row):
      continue
    if len(row) < len(header):
      raise DatasetError(f'{csv_path}, line {line}: expected {len(header)} fields, got '
                         f'{len(row)}: {row}.')
    num_rows += 1
    fields = _parse_csv_row(row, col, (csv_path, line), city, image_dir)
    name, found = _image_name(fields, listed)
    if not found:
      missing_images.append(f'line {line}: {name}')
      continue
    if name in seen_names:
      records.odd[ODD_REPEATED_ROW] += 1
      continue
    seen_names[name] = line
    if not _HEADING_RANGE[0] <= fields['northdeg'] <= _HEADING_RANGE[1]:
      records.odd[ODD_HEADING] += 1
    place_key = str(fields['place_id'])
    _check_conflicts(seen_panoramas, place_key, fields['panoid'],
                     (fields['year'], fields['month'], fields['lat'], fields['lon']),
                     f'{csv_path}, line {line}', '(year, month, lat, lon)')
    records.names.append(f'Images/{city}/{name}')
    records.place_keys.append(place_key)
    records.dates.append(fields['year'] * 100 + fields['month'])
    records.lats.append(fields['lat'])
  if num_rows == 0:
    raise DatasetError(f'{csv_path} has a header but no rows.')
  _check_missing_images(missing_images, csv_path, image_dir)
  unlisted = sum(1 for name in listing if name.lower().endswith(_IMAGE_EXTENSIONS)
                 and name not in seen_names)
  if unlisted:
    records.odd[ODD_UNLISTED_IMAGE] += unlisted
  return records


def _check_missing_images(missing_images: list[str], csv_path: str, image_dir: str):
  """Raises DatasetError listing (the first few of) the images a CSV names that do not exist."""
  if missing_images:
    listed_part = '; '.join(missing_images[:_MAX_LISTED])
    more = len(missing_images) - _MAX_LISTED
    raise DatasetError(
        f'{len(missing_images)} images named by {csv_path} are not in {image_dir}: {listed_part}'
        + (f'; and {more} more.' if more > 0 else '.'))


_XS_NUMBERS = ((1, 'UTM_east', 1e8), (2, 'UTM_north', 1e8), (5, 'lat', 90.0), (6, 'lon', 180.0))


def _parse_xs_name(name: str, folder: str) -> tuple[str, str, int, float, str | None]:
  """Returns (place field, panoid, year * 100 + month, lat, oddity or None) of a GSV-XS name."""
  # The full path is only built for an error message: this runs once per training image.
  tokens = name.split('@')
  if len(tokens) != 16 or tokens[0] or tokens[-1].lower() not in _IMAGE_EXTENSIONS:
    raise DatasetError(
        f'File name {os.path.join(folder, name)!r} does not parse as a GSV-XS image name '
        '@UTM_east@UTM_north@zone@band@lat@lon@panoid@@northdeg@@@@YYYYMM@place_id@.jpg.')
  try:
    east, north, lat, lon = (float(tokens[1]), float(tokens[2]), float(tokens[5]),
                             float(tokens[6]))
    # False for NaN and infinities too.
    usable = abs(east) <= 1e8 and abs(north) <= 1e8 and abs(lat) <= 90.0 and abs(lon) <= 180.0
  except ValueError:
    usable = False
  if not usable:
    path = os.path.join(folder, name)
    for i, field, bound in _XS_NUMBERS:
      _parse_float(tokens[i], field, path, None, bound)
  # The heading is not used: any text is accepted, integers outside [0, 360] are only counted.
  oddity = None
  try:
    northdeg = int(tokens[9])
    if not _HEADING_RANGE[0] <= northdeg <= _HEADING_RANGE[1]:
      oddity = ODD_HEADING
  except ValueError:
    oddity = ODD_HEADING_TEXT
  year_month = tokens[13]
  if len(year_month) != 6 or not year_month.isdigit():
    raise DatasetError(f'{os.path.join(folder, name)!r}: the date field must be YYYYMM, got '
                       f'{year_month!r}.')
  year, month = int(year_month[:4]), int(year_month[4:])
  if not 1 <= month <= 12:
    raise DatasetError(f'{os.path.join(folder, name)!r}: month must be in [1, 12], got {month} '
                       f'in {year_month!r}.')
  place, panoid = tokens[14], tokens[7]
  if not place:
    raise DatasetError(f'{os.path.join(folder, name)!r}: empty place_id field.')
  if not panoid:
    raise DatasetError(f'{os.path.join(folder, name)!r}: empty panoid field.')
  return place, panoid, year * 100 + month, lat, oddity


def _scan_gsv_xs_city(train_dir: str, city: str) -> tuple[list[str], str]:
  """Lists a city folder; returns the listing and its digest."""
  folder = os.path.join(train_dir, city)
  _check_folder(folder, f'Folder of city {city!r}')
  listing = _list_files(folder)
  if not listing:
    raise DatasetError(f'Folder {folder!r} of city {city!r} has no images.')
  return listing, hashlib.sha256('\n'.join(listing).encode('utf-8')).hexdigest()


def _parse_gsv_xs_city(train_dir: str, city: str, listing: list[str]) -> _CityRecords:
  """Parses the '@' names of one city folder."""
  folder = os.path.join(train_dir, city)
  records = _CityRecords()
  seen_panoramas = {}
  bad_names = []
  for name in listing:
    if not name.lower().endswith(_IMAGE_EXTENSIONS):
      records.odd[ODD_NOT_AN_IMAGE] += 1
      continue
    try:
      place, panoid, date, lat, oddity = _parse_xs_name(name, folder)
    except DatasetError as e:
      bad_names.append(str(e))
      continue
    match = _PLACE_OF_CITY.fullmatch(place) if '_' in place else None
    if match and match.group(2).lower() != city.lower():
      raise DatasetError(f'{os.path.join(folder, name)!r}: the place field {place!r} names city '
                         f'{match.group(2)!r}, but the file is in the folder of city {city!r}.')
    _check_conflicts(seen_panoramas, place, panoid, (date, lat), name, '(YYYYMM, lat)',
                     folder=folder)
    if oddity is not None:
      records.odd[oddity] += 1
    records.names.append(f'{city}/{name}')
    records.place_keys.append(place)
    records.dates.append(date)
    records.lats.append(lat)
  if not records.names and not bad_names:
    raise DatasetError(f'Folder {folder!r} of city {city!r} has no images '
                       f'({", ".join(_IMAGE_EXTENSIONS)}).')
  if bad_names:
    more = len(bad_names) - _MAX_LISTED
    raise DatasetError(f'{len(bad_names)} file names in {folder!r} do not parse: '
                       + ' | '.join(bad_names[:_MAX_LISTED])
                       + (f' | and {more} more.' if more > 0 else ''))
  return records


def _local_place_ids(keys: Sequence[str]) -> np.ndarray:
  """Integer ids of place fields: the integer itself (also in '<int>_<City>'), else sorted rank."""
  numbers = []
  for key in keys:
    match = _PLACE_NUMBER.fullmatch(key)
    if match is None:
      unique = sorted(set(keys))
      rank = {k: i for i, k in enumerate(unique)}
      return np.array([rank[k] for k in keys], dtype=np.int64)
    numbers.append(int(match.group(1)))
  ids = np.array(numbers, dtype=np.int64)
  # '7' and '07' would otherwise merge into one place: each id must come from one spelling.
  spellings = {}
  for key, number in zip(keys, numbers):
    if spellings.setdefault(number, key) != key:
      raise DatasetError(f'Place fields {spellings[number]!r} and {key!r} give the same place '
                         f'id {number} in one city.')
  return ids


# Building, caching.


def _cache_key(layout: str, cities: Sequence[str], min_img_per_place: int,
               digests: Sequence[str]) -> str:
  key = hashlib.sha256()
  key.update(json.dumps({'version': _CACHE_VERSION, 'layout': layout, 'cities': list(cities),
                         'min_img_per_place': min_img_per_place}).encode('utf-8'))
  for digest in digests:
    key.update(digest.encode('ascii'))
  return key.hexdigest()


def _build(root: str, layout: str, cities: Sequence[str], min_img_per_place: int,
           records: Sequence[_CityRecords], fingerprint: str) -> PlaceIndex:
  """Groups per-city records into places, drops small places and assigns global ids."""
  local_ids = [_local_place_ids(r.place_keys) for r in records]
  max_local = max(int(ids.max()) for ids in local_ids)
  stride = CITY_ID_STRIDE
  while max_local >= stride:
    stride *= 10
  if (len(cities) - 1) * stride + max_local >= 2**31:
    raise DatasetError(f'Place ids do not fit int32 labels: {len(cities)} cities with place ids '
                       f'up to {max_local}.')

  paths, dates, lats, offsets, place_ids, place_cities = [], [], [], [0], [], []
  dropped_places = dropped_images = 0
  for c, (rec, ids) in enumerate(zip(records, local_ids)):
    names = np.array(rec.names, dtype=object)
    order = np.lexsort((names.astype(str), ids))
    ids_sorted = ids[order]
    starts = np.flatnonzero(np.r_[True, ids_sorted[1:] != ids_sorted[:-1]])
    counts = np.diff(np.r_[starts, len(ids_sorted)])
    city_dates = np.asarray(rec.dates, dtype=np.int32)
    city_lats = np.asarray(rec.lats, dtype=np.float64)
    for start, count in zip(starts, counts):
      if count < min_img_per_place:
        dropped_places += 1
        dropped_images += int(count)
        continue
      members = order[start:start + count]
      paths.extend(names[members])
      dates.append(city_dates[members])
      lats.append(city_lats[members])
      offsets.append(offsets[-1] + int(count))
      place_ids.append(c * stride + int(ids_sorted[start]))
      place_cities.append(c)
  if not place_ids:
    largest = max(int(np.unique(ids, return_counts=True)[1].max()) for ids in local_ids)
    raise DatasetError(f'No place in {root} ({", ".join(cities)}) has at least '
                       f'min_img_per_place={min_img_per_place} images: the largest place has '
                       f'{largest}. Lower data.min_img_per_place (and data.images_per_place).')
  odd = collections.Counter()
  for rec in records:
    odd.update(rec.odd)
  return PlaceIndex(
      root=root,
      layout=layout,
      cities=tuple(cities),
      image_paths=np.array([p.encode('utf-8') for p in paths], dtype=np.bytes_),
      image_dates=np.concatenate(dates).astype(np.int32),
      image_lats=np.concatenate(lats).astype(np.float64),
      place_offsets=np.asarray(offsets, dtype=np.int64),
      place_ids=np.asarray(place_ids, dtype=np.int32),
      place_cities=np.asarray(place_cities, dtype=np.int32),
      min_img_per_place=int(min_img_per_place),
      num_dropped_places=dropped_places,
      num_dropped_images=dropped_images,
      fingerprint=fingerprint,
      odd_values=tuple(sorted(odd.items())),
  )


_ARRAY_FIELDS = ('image_paths', 'image_dates', 'image_lats', 'place_offsets', 'place_ids',
                 'place_cities')


def _save_cache(path: str, index: PlaceIndex):
  meta = {'version': _CACHE_VERSION, 'layout': index.layout, 'cities': list(index.cities),
          'min_img_per_place': index.min_img_per_place,
          'num_dropped_places': index.num_dropped_places,
          'num_dropped_images': index.num_dropped_images, 'fingerprint': index.fingerprint,
          'odd_values': [list(item) for item in index.odd_values]}
  arrays = {name: getattr(index, name) for name in _ARRAY_FIELDS}
  try:
    with fileio.atomic_open(path, binary=True) as f:
      np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
  except OSError as e:
    logging.warning('Could not write the place index cache %s (%s); it will be rebuilt next '
                    'time.', path, e)


def _load_cache(path: str, root: str, fingerprint: str) -> PlaceIndex | None:
  try:
    # The cache sits beside the data, which may come from someone else: read without pickles.
    data = safe_numpy.load_npz(path, keys=('meta',) + _ARRAY_FIELDS)
    meta = json.loads(str(data['meta']))
    arrays = {name: data[name] for name in _ARRAY_FIELDS}
    if not isinstance(meta, dict):
      raise ValueError(f'its meta is a JSON {type(meta).__name__}')
  except (OSError, KeyError, ValueError) as e:  # ArrayFileError is a ValueError
    logging.warning('Ignoring unreadable place index cache %s (%s).', path, e)
    return None
  if meta.get('version') != _CACHE_VERSION or meta.get('fingerprint') != fingerprint:
    return None
  return PlaceIndex(root=root, layout=meta['layout'], cities=tuple(meta['cities']),
                    min_img_per_place=int(meta['min_img_per_place']),
                    num_dropped_places=int(meta['num_dropped_places']),
                    num_dropped_images=int(meta['num_dropped_images']),
                    fingerprint=fingerprint,
                    odd_values=tuple((str(k), int(n)) for k, n in meta.get('odd_values', [])),
                    **arrays)


def build_place_index(train_dir: str, layout: str, cities: Sequence[str], min_img_per_place: int,
                      cache_dir: str = '', rebuild: bool = False) -> PlaceIndex:
  """Indexes the training places of `cities`, reading the cache when it matches.

  Every check runs before anything is written: on a DatasetError no cache file is created.

  Args:
    train_dir: the training folder (layout in the module doc).
    layout: 'gsv_cities' or 'gsv_xs'.
    cities: city names to train on (config data.cities); order sets the label offsets.
    min_img_per_place: places with fewer images are dropped.
    cache_dir: where to keep the cache; '' means `<train_dir>/.vpr_jax_cache`. A cache that
      cannot be written only gives a warning.
    rebuild: ignore an existing cache and write a new one.

  Returns:
    The PlaceIndex.

  Raises:
    DatasetError: missing or empty folders, bad CSV columns or values (file and line named),
      image names that do not parse (file named), images named by a CSV but missing,
      conflicting rows, cities not found (those found are listed), or no place left.
  """
  _check_layout(layout)
  if isinstance(cities, str):
    raise ValueError(f'cities must be a list of city names, got the string {cities!r}.')
  cities = list(cities)
  if not cities:
    raise ValueError('cities (config data.cities) is empty; name at least one city.')
  if len(set(cities)) != len(cities):
    raise ValueError(f'cities (config data.cities) has duplicates: {cities}.')
  if int(min_img_per_place) != min_img_per_place or min_img_per_place < 1:
    raise ValueError(f'min_img_per_place must be a positive integer, got {min_img_per_place!r}.')
  min_img_per_place = int(min_img_per_place)
  root = os.path.abspath(os.fspath(train_dir))
  found = available_cities(root, layout)
  where = (os.path.join(root, 'Dataframes') + ' (<City>.csv)' if layout == 'gsv_cities'
           else root + ' (city folders)')
  resolved = _resolve_cities(cities, found, where)
  if len(set(resolved)) != len(resolved):
    raise ValueError(f'cities {cities} name the same folder twice (ignoring case): {resolved}.')

  # Listing (and CSV bytes) first: they key the cache, and parsing is only needed on a miss.
  if layout == 'gsv_cities':
    scan_city, parse_city = _scan_gsv_cities_city, _parse_gsv_cities_city
  else:
    scan_city, parse_city = _scan_gsv_xs_city, _parse_gsv_xs_city
  scans, digests = [], []
  for city in resolved:
    scan, digest = scan_city(root, city)
    scans.append(scan)
    digests.append(digest)
  fingerprint = _cache_key(layout, resolved, min_img_per_place, digests)

  cache_dir = cache_dir or os.path.join(root, DEFAULT_CACHE_SUBDIR)
  cache_path = os.path.join(cache_dir, f'place_index_{layout}_{fingerprint[:20]}.npz')
  if not rebuild and os.path.exists(cache_path):
    index = _load_cache(cache_path, root, fingerprint)
    if index is not None:
      logging.info('Loaded the place index from %s.', cache_path)
      return index
  records = [parse_city(root, city, scan) for city, scan in zip(resolved, scans)]
  index = _build(root, layout, resolved, min_img_per_place, records, fingerprint)
  _save_cache(cache_path, index)
  logging.info('Built the place index (%d places, %d images) and cached it in %s.',
               index.num_places, index.num_images, cache_path)
  return index


def check_images_per_place(index: PlaceIndex, images_per_place: int):
  """Checks that every place of `index` has at least K = `images_per_place` images.

  Args:
    index: the place index.
    images_per_place: K, images drawn per place (config data.images_per_place).

  Raises:
    DatasetError: K exceeds the images of some place (the largest and smallest counts named).
  """
  counts = index.images_per_place
  smallest, largest = int(counts.min()), int(counts.max())
  if images_per_place <= smallest:
    return
  if images_per_place > largest:
    raise DatasetError(
        f'data.images_per_place={images_per_place} exceeds the images of every place in '
        f'{index.root}: the largest place has {largest}. Expected images_per_place <= '
        f'min_img_per_place ({index.min_img_per_place}) <= {largest}.')
  too_small = int((counts < images_per_place).sum())
  raise DatasetError(
      f'data.images_per_place={images_per_place} exceeds the images of {too_small} of the '
      f'{index.num_places} places in {index.root} (the smallest has {smallest}); set '
      f'data.min_img_per_place >= {images_per_place} (now {index.min_img_per_place}) to drop them.')


def _table(title: str, rows: Iterable[tuple[str, str]]) -> str:
  rows = list(rows)
  left = max(len(r[0]) for r in rows)
  right = max(len(r[1]) for r in rows)
  width = max(left + right + 3, len(title))
  right = width - left - 3
  rule = '+' + '-' * (width + 2) + '+'
  lines = [rule, f'| {title.center(width)} |', rule]
  lines += [f'| {a.ljust(left)} | {b.ljust(right)} |' for a, b in rows]
  lines.append(rule)
  return '\n'.join(lines)


def format_stats(index: PlaceIndex, places_per_batch: int, images_per_place: int,
                 process_count: int = 1) -> str:
  """The training-set and batch tables printed at the start of training.

  Args:
    index: the place index.
    places_per_batch: P, places per global batch.
    images_per_place: K.
    process_count: number of processes sharing each global batch.

  Returns:
    Two text tables ("Training dataset", "Training config").
  """
  iterations = index.num_places // places_per_batch
  leftover = index.num_places - iterations * places_per_batch
  data_rows = [('# of cities', f'{index.num_cities}'),
               ('# of places', f'{index.num_places}'),
               ('# of images', f'{index.num_images}')]
  if index.num_dropped_places:
    data_rows.append((f'dropped (< {index.min_img_per_place} images)',
                      f'{index.num_dropped_places} places, {index.num_dropped_images} images'))
  # Odd but usable values: said once here instead of once per file.
  data_rows += [(what, f'{count}') for what, count in index.odd_values]
  config_rows = [('Batch size (PxK)', f'{places_per_batch}x{images_per_place} = '
                                      f'{places_per_batch * images_per_place} images')]
  if process_count > 1:
    config_rows.append(('Per process', f'{places_per_batch // process_count}x{images_per_place} '
                                       f'({process_count} processes)'))
  config_rows.append(('# of iterations', f'{iterations} per epoch'))
  config_rows.append(('Last batch', f'incomplete ({leftover} places) and dropped; a new order '
                                    'every epoch' if leftover else 'complete (nothing dropped)'))
  return '\n'.join([
      _table(f'Training dataset ({index.layout}: {index.root})', data_rows), '',
      _table('Training config', config_rows)])
