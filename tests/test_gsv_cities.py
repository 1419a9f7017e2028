"""Tests of the place index: both training layouts, caching, statistics and bad-input errors."""

import csv
import os
import pickle
import re
import shutil
import tempfile
import time

import numpy as np
from PIL import Image
import pytest

from vpr_jax.data.training import gsv_cities
from vpr_jax.data.training.gsv_cities import DatasetError

COLUMNS = ('place_id', 'year', 'month', 'northdeg', 'city_id', 'lat', 'lon', 'panoid')


def _jpeg(path, value=128):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new('RGB', (8, 6), (value, value // 2, 255 - value)).save(path, quality=90)


def _gsv_name(city, place_id, year, month, northdeg, lat, lon, panoid):
  return (f'{city}_{place_id:07d}_{year:04d}_{month:02d}_{northdeg:03d}_{str(lat)}_{str(lon)}_'
          f'{panoid}.jpg')


def _rows(places, city, base_lat):
  """places: {place_id: number of images} -> CSV rows (one per image)."""
  rows = []
  for place_id, count in places.items():
    for v in range(count):
      rows.append((place_id, 2010 + v, 1 + (place_id + v) % 12, (37 * v) % 360, city,
                   round(base_lat + 0.001 * (place_id % 1000) + 1e-5 * v, 6),
                   round(-122.4 - 0.001 * (place_id % 1000), 6), f'pano{place_id}x{v}'))
  return rows


def write_gsv_cities(root, cities, write_images=True):
  """cities: {City: {place_id: count}} -> GSV-Cities layout; returns {City: rows}."""
  all_rows = {}
  os.makedirs(os.path.join(root, 'Dataframes'), exist_ok=True)
  for c, (city, places) in enumerate(cities.items()):
    rows = _rows(places, city, 10.0 + c)
    all_rows[city] = rows
    with open(os.path.join(root, 'Dataframes', f'{city}.csv'), 'w', newline='') as f:
      writer = csv.writer(f)
      writer.writerow(COLUMNS)
      writer.writerows(rows)
    os.makedirs(os.path.join(root, 'Images', city), exist_ok=True)
    if write_images:
      for i, row in enumerate(rows):
        _jpeg(os.path.join(root, 'Images', city, _gsv_name(*row[4:5], *row[:4], *row[5:])),
              value=(7 * i) % 256)
  return all_rows


def _xs_name(place_field, year, month, lat=37.75, lon=-122.41, panoid='pano', northdeg=90,
             east=550986.41, north=4178983.29):
  return (f'@{east:010.2f}@{north:010.2f}@10@S@{lat:09.5f}@{lon:010.5f}@{panoid}@@{northdeg:03d}'
          f'@@@@{year:04d}{month:02d}@{place_field}@.jpg')


def write_gsv_xs(root, cities, field='{id}_{City}'):
  """cities: {City: {place_id: count}} -> '@' layout in lower-cased city folders."""
  for city, places in cities.items():
    for place_id, count in places.items():
      for v in range(count):
        name = _xs_name(field.format(id=place_id, City=city), 2015 + v, 1 + v % 12,
                        lat=37.7 + 0.001 * place_id + 1e-5 * v, panoid=f'p{place_id}v{v}')
        _jpeg(os.path.join(root, city.lower(), name), value=(11 * v + place_id) % 256)


CITIES = {'Alpha': {0: 4, 3: 5, 7: 2, 12: 4}, 'Beta': {1: 4, 2: 6, 5: 3}}


@pytest.fixture
def gsv_root(tmp_path):
  root = str(tmp_path / 'gsv')
  write_gsv_cities(root, CITIES)
  return root


@pytest.fixture
def xs_root(tmp_path):
  root = str(tmp_path / 'xs')
  write_gsv_xs(root, CITIES)
  return root


def _expected(min_img):
  ids, counts = [], []
  for c, places in enumerate(CITIES.values()):
    for place_id in sorted(places):
      if places[place_id] >= min_img:
        ids.append(c * 100_000 + place_id)
        counts.append(places[place_id])
  return ids, counts


@pytest.mark.parametrize('layout', ['gsv_cities', 'gsv_xs'])
def test_index_both_layouts(layout, gsv_root, xs_root):
  root = gsv_root if layout == 'gsv_cities' else xs_root
  index = gsv_cities.build_place_index(root, layout, ['Alpha', 'Beta'], min_img_per_place=4)
  ids, counts = _expected(4)
  np.testing.assert_array_equal(index.place_ids, ids)
  np.testing.assert_array_equal(index.images_per_place, counts)
  np.testing.assert_array_equal(index.place_cities, [0, 0, 0, 1, 1])
  assert index.place_ids.dtype == np.int32 and index.place_offsets.dtype == np.int64
  assert index.num_images == sum(counts) and index.num_places == len(ids)
  assert index.num_dropped_places == 2 and index.num_dropped_images == 2 + 3
  assert index.city_place_ranges() == [(0, 3), (3, 5)]
  # Config names match the lower-cased GSV-XS folders ignoring case.
  assert [c.lower() for c in index.cities] == ['alpha', 'beta']
  for image in range(index.num_images):
    assert os.path.isfile(index.image_path(image))
  for place in range(index.num_places):
    names = [index.image_paths[i] for i in index.place_images(place)]
    assert names == sorted(names)
  # year * 100 + month of every image, read back from its name.
  for image in range(index.num_images):
    name = os.path.basename(index.image_path(image))
    if layout == 'gsv_cities':
      year, month = int(name.split('_')[2]), int(name.split('_')[3])
    else:
      year, month = int(name.split('@')[13][:4]), int(name.split('@')[13][4:])
    assert index.image_dates[image] == year * 100 + month


def test_city_order_sets_offsets(gsv_root):
  index = gsv_cities.build_place_index(gsv_root, 'gsv_cities', ['Beta', 'Alpha'], 4)
  np.testing.assert_array_equal(index.place_ids, [1, 2, 100_000, 100_003, 100_012])
  assert index.cities == ('Beta', 'Alpha')


def test_subset_of_cities_and_min_img(gsv_root):
  index = gsv_cities.build_place_index(gsv_root, 'gsv_cities', ['Alpha'], 2)
  np.testing.assert_array_equal(index.place_ids, [0, 3, 7, 12])
  assert index.num_dropped_places == 0


def test_plain_and_free_text_place_fields(tmp_path):
  write_gsv_xs(str(tmp_path / 'a'), {'Alpha': {4: 4, 9: 4}}, field='{id}')
  index = gsv_cities.build_place_index(str(tmp_path / 'a'), 'gsv_xs', ['alpha'], 4)
  np.testing.assert_array_equal(index.place_ids, [4, 9])
  write_gsv_xs(str(tmp_path / 'b'), {'Alpha': {4: 4, 9: 4}}, field='place-{id}')
  index = gsv_cities.build_place_index(str(tmp_path / 'b'), 'gsv_xs', ['Alpha'], 4)
  np.testing.assert_array_equal(index.place_ids, [0, 1])


def test_large_place_ids_widen_the_stride(tmp_path):
  root = str(tmp_path / 'g')
  write_gsv_cities(root, {'Alpha': {123_456: 4}, 'Beta': {5: 4}})
  index = gsv_cities.build_place_index(root, 'gsv_cities', ['Alpha', 'Beta'], 4)
  np.testing.assert_array_equal(index.place_ids, [123_456, 1_000_005])


def test_csv_floats_written_with_trailing_zeros(tmp_path):
  root = str(tmp_path / 'g')
  rows = write_gsv_cities(root, {'Alpha': {0: 4}})['Alpha']
  with open(os.path.join(root, 'Dataframes', 'Alpha.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(('Unnamed: 0',) + COLUMNS)
    for i, row in enumerate(rows):
      writer.writerow((i,) + row[:5] + (f'{row[5]:.9f}', f'{row[6]:.9f}', row[7]))
  index = gsv_cities.build_place_index(root, 'gsv_cities', ['Alpha'], 4)
  assert index.num_images == 4


def test_repeated_rows_indexed_once(gsv_root):
  path = os.path.join(gsv_root, 'Dataframes', 'Alpha.csv')
  with open(path) as f:
    lines = f.read().splitlines()
  with open(path, 'w') as f:
    f.write('\n'.join(lines + [lines[1]]) + '\n')
  index = gsv_cities.build_place_index(gsv_root, 'gsv_cities', ['Alpha'], 4)
  np.testing.assert_array_equal(index.images_per_place, [4, 5, 4])


def test_both_layouts_of_the_synthetic_set_agree(synthetic_root):
  by_layout = {}
  for layout in ('gsv_cities', 'gsv_xs'):
    by_layout[layout] = gsv_cities.build_place_index(
        os.path.join(synthetic_root, layout), layout, ['SynthA', 'SynthB'], 4,
        cache_dir=str(synthetic_root / f'cache_{layout}'))
  a, b = by_layout['gsv_cities'], by_layout['gsv_xs']
  assert a.num_places == 24 and a.num_images == 96
  np.testing.assert_array_equal(a.place_ids, b.place_ids)
  np.testing.assert_array_equal(a.place_offsets, b.place_offsets)
  np.testing.assert_array_equal(np.sort(a.image_dates), np.sort(b.image_dates))


def test_index_pickles(gsv_root):
  index = gsv_cities.build_place_index(gsv_root, 'gsv_cities', ['Alpha', 'Beta'], 4)
  copy = pickle.loads(pickle.dumps(index))
  np.testing.assert_array_equal(copy.image_paths, index.image_paths)
  assert copy.image_path(3) == index.image_path(3)
  assert len(pickle.dumps(index)) < 4000


def test_cache_reused_rebuilt_and_invalidated(gsv_root, tmp_path, monkeypatch):
  cache_dir = str(tmp_path / 'cache')
  first = gsv_cities.build_place_index(gsv_root, 'gsv_cities', ['Alpha', 'Beta'], 4,
                                       cache_dir=cache_dir)
  assert len(os.listdir(cache_dir)) == 1
  real_build = gsv_cities._build

  def failing_build(*args, **kwargs):
    raise AssertionError('the cache should have been used')

  monkeypatch.setattr(gsv_cities, '_build', failing_build)
  cached = gsv_cities.build_place_index(gsv_root, 'gsv_cities', ['Alpha', 'Beta'], 4,
                                        cache_dir=cache_dir)
  for name in ('image_paths', 'image_dates', 'image_lats', 'place_offsets', 'place_ids',
               'place_cities'):
    np.testing.assert_array_equal(getattr(cached, name), getattr(first, name))
  assert cached.fingerprint == first.fingerprint and cached.root == first.root
  with pytest.raises(AssertionError, match='cache should have been used'):
    gsv_cities.build_place_index(gsv_root, 'gsv_cities', ['Alpha', 'Beta'], 4,
                                 cache_dir=cache_dir, rebuild=True)
  # Other arguments or another listing make another key.
  with pytest.raises(AssertionError):
    gsv_cities.build_place_index(gsv_root, 'gsv_cities', ['Alpha', 'Beta'], 3,
                                 cache_dir=cache_dir)
  monkeypatch.setattr(gsv_cities, '_build', real_build)
  _jpeg(os.path.join(gsv_root, 'Images', 'Alpha', 'unlisted_extra.jpg'))
  changed = gsv_cities.build_place_index(gsv_root, 'gsv_cities', ['Alpha', 'Beta'], 4,
                                         cache_dir=cache_dir)
  assert changed.fingerprint != first.fingerprint
  assert len(os.listdir(cache_dir)) == 2


def test_default_cache_next_to_the_data(xs_root):
  gsv_cities.build_place_index(xs_root, 'gsv_xs', ['Alpha'], 4)
  cache = os.path.join(xs_root, '.vpr_jax_cache')
  assert len(os.listdir(cache)) == 1
  # The hidden cache folder is not taken for a city.
  assert gsv_cities.available_cities(xs_root, 'gsv_xs') == ['alpha', 'beta']


def test_unwritable_cache_only_warns(gsv_root, tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  index = gsv_cities.build_place_index(gsv_root, 'gsv_cities', ['Alpha'], 4,
                                       cache_dir=str(blocker / 'cache'))
  assert index.num_places == 3


def test_format_stats(gsv_root):
  index = gsv_cities.build_place_index(gsv_root, 'gsv_cities', ['Alpha', 'Beta'], 4)
  text = gsv_cities.format_stats(index, 2, 4)
  for expected in ('# of cities', '| 2 ', '# of places', '| 5 ', '# of images', '| 23 ',
                   '2x4', '2 per epoch', '(1 places) and dropped', '2 places, 5 images'):
    assert expected in text, (expected, text)
  text = gsv_cities.format_stats(index, 4, 4, process_count=2)
  assert '2x4 (2 processes)' in text and '1 per epoch' in text


# Errors: raised before anything is written.


def _assert_error(root, layout, cities, match, tmp_path, min_img=4):
  cache_dir = str(tmp_path / 'never_written')
  with pytest.raises(DatasetError, match=match):
    gsv_cities.build_place_index(root, layout, cities, min_img, cache_dir=cache_dir)
  assert not os.path.exists(cache_dir)


def _rewrite_csv(root, city, edit):
  path = os.path.join(root, 'Dataframes', f'{city}.csv')
  with open(path, newline='') as f:
    rows = list(csv.reader(f))
  rows = edit(rows)
  with open(path, 'w', newline='') as f:
    csv.writer(f).writerows(rows)
  return path


def test_error_missing_and_empty_folders(tmp_path, gsv_root):
  _assert_error(str(tmp_path / 'nowhere'), 'gsv_cities', ['Alpha'], 'does not exist', tmp_path)
  os.makedirs(tmp_path / 'bare')
  _assert_error(str(tmp_path / 'bare'), 'gsv_cities', ['Alpha'], 'Dataframes', tmp_path)
  for name in os.listdir(os.path.join(gsv_root, 'Images', 'Beta')):
    os.remove(os.path.join(gsv_root, 'Images', 'Beta', name))
  _assert_error(gsv_root, 'gsv_cities', ['Alpha', 'Beta'], r'Images/Beta.* is empty', tmp_path)
  os.rmdir(os.path.join(gsv_root, 'Images', 'Beta'))
  _assert_error(gsv_root, 'gsv_cities', ['Beta'], 'Image folder of city .Beta. .* does not exist',
                tmp_path)


def test_error_empty_city_folder_xs(tmp_path, xs_root):
  os.makedirs(os.path.join(xs_root, 'gamma'))
  _assert_error(xs_root, 'gsv_xs', ['Gamma'], 'has no images', tmp_path)


def test_error_city_not_found_lists_cities(gsv_root, tmp_path):
  _assert_error(gsv_root, 'gsv_cities', ['Alpha', 'Paris'],
                r"\['Paris'\].*Cities found there: \['Alpha', 'Beta'\]", tmp_path)


def test_error_csv_missing_columns(gsv_root, tmp_path):
  path = _rewrite_csv(gsv_root, 'Alpha', lambda rows: [r[:3] + r[4:] for r in rows])
  _assert_error(gsv_root, 'gsv_cities', ['Alpha'],
                rf"{re.escape(path)}: missing columns \['northdeg'\]", tmp_path)


@pytest.mark.parametrize('column,value,message', [
    (0, 'seven', 'place_id must be an integer'),
    (2, '13', r'month must be in \[1, 12\], got 13'),
    (5, 'north', 'lat must be a number'),
    (5, 'nan', 'lat must be a finite number'),
    (4, 'Beta', "city_id 'Beta' differs"),
])
def test_error_csv_bad_value_names_file_and_line(gsv_root, tmp_path, column, value, message):

  def edit(rows):
    rows[3][column] = value
    return rows

  path = _rewrite_csv(gsv_root, 'Alpha', edit)
  _assert_error(gsv_root, 'gsv_cities', ['Alpha'], rf'{re.escape(path)}, line 4: {message}',
                tmp_path)


def test_error_csv_without_rows(gsv_root, tmp_path):
  _rewrite_csv(gsv_root, 'Alpha', lambda rows: rows[:1])
  _assert_error(gsv_root, 'gsv_cities', ['Alpha'], 'has a header but no rows', tmp_path)
  _rewrite_csv(gsv_root, 'Alpha', lambda rows: [])
  _assert_error(gsv_root, 'gsv_cities', ['Alpha'], 'is empty; expected a header', tmp_path)


def test_error_image_of_a_row_missing(gsv_root, tmp_path):
  folder = os.path.join(gsv_root, 'Images', 'Alpha')
  victim = sorted(os.listdir(folder))[2]
  os.remove(os.path.join(folder, victim))
  _assert_error(gsv_root, 'gsv_cities', ['Alpha'],
                rf'1 images named by .*Alpha.csv.*{re.escape(victim)}', tmp_path)


def test_error_conflicting_rows(gsv_root, tmp_path):
  rows = {}

  def edit(table):
    # Same place and panorama as row 1, another capture date: two places share an id.
    clash = list(table[1])
    clash[1], clash[3] = '1999', '7'
    rows['clash'] = clash
    return table + [clash]

  _rewrite_csv(gsv_root, 'Alpha', edit)
  clash = rows['clash']
  _jpeg(os.path.join(gsv_root, 'Images', 'Alpha',
                     _gsv_name(clash[4], int(clash[0]), int(clash[1]), int(clash[2]),
                               int(clash[3]), float(clash[5]), float(clash[6]), clash[7])))
  _assert_error(gsv_root, 'gsv_cities', ['Alpha'], r'Conflicting entries for place 0 .*line 2.*'
                r'line 17', tmp_path)


def test_error_xs_name_does_not_parse(xs_root, tmp_path):
  bad = os.path.join(xs_root, 'alpha', 'holiday.jpg')
  _jpeg(bad)
  _assert_error(xs_root, 'gsv_xs', ['Alpha'], f'{re.escape(bad)}.* does not parse', tmp_path)


def test_error_xs_bad_date_and_wrong_city(xs_root, tmp_path):
  _jpeg(os.path.join(xs_root, 'alpha', _xs_name('0_Alpha', 2015, 13)))
  _assert_error(xs_root, 'gsv_xs', ['Alpha'], r'month must be in \[1, 12\], got 13', tmp_path)
  os.remove(os.path.join(xs_root, 'alpha', _xs_name('0_Alpha', 2015, 13)))
  _jpeg(os.path.join(xs_root, 'alpha', _xs_name('0_Beta', 2015, 3)))
  _assert_error(xs_root, 'gsv_xs', ['Alpha'], "names city 'Beta'", tmp_path)


def test_error_no_place_left(gsv_root, tmp_path):
  _assert_error(gsv_root, 'gsv_cities', ['Beta'], 'No place .* min_img_per_place=7', tmp_path,
                min_img=7)


def test_error_bad_arguments(gsv_root):
  with pytest.raises(ValueError, match='Unknown data.train_layout'):
    gsv_cities.build_place_index(gsv_root, 'msls', ['Alpha'], 4)
  with pytest.raises(ValueError, match='empty'):
    gsv_cities.build_place_index(gsv_root, 'gsv_cities', [], 4)
  with pytest.raises(ValueError, match='duplicates'):
    gsv_cities.build_place_index(gsv_root, 'gsv_cities', ['Alpha', 'Alpha'], 4)
  with pytest.raises(ValueError, match='string'):
    gsv_cities.build_place_index(gsv_root, 'gsv_cities', 'Alpha', 4)
  with pytest.raises(ValueError, match='min_img_per_place'):
    gsv_cities.build_place_index(gsv_root, 'gsv_cities', ['Alpha'], 0)


# Real metadata: headings from -11 to 731, names shaped as in the GSV-Cities / GSV-XS releases.

# A real GSV-XS name (Lisbon), and rows / names of the same shape with the headings found outside
# [0, 360] in the real metadata.
REAL_XS_NAME = ('@0480266.04@4284088.73@29@S@038.70521@-009.22695@k-fCqyb2217gMSaCg1FVhA@@300@@@@'
                '201806@141@.jpg')
REAL_HEADINGS = (300, 398, -11, 731, -5)


def _real_xs_name(heading, year_month, place, panoid, east='0480266.04', lat='038.70521'):
  return (f'@{east}@4284088.73@29@S@{lat}@-009.22695@{panoid}@@{heading}@@@@{year_month}@{place}'
          '@.jpg')


def _touch(path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))


def test_real_xs_names_with_headings_outside_0_360(tmp_path):
  root = str(tmp_path / 'xs')
  names = [REAL_XS_NAME]
  for v, heading in enumerate(REAL_HEADINGS[1:]):
    names.append(_real_xs_name(heading, f'20{10 + v}0{1 + v}', 141, f'pano{v}-_x'))
  names += [_real_xs_name(h, '201905', 4257, f'other{h}', east='0480300.50', lat='038.70600')
            for h in (0, 90, 180, 359)]
  names.append(_real_xs_name('', '201907', 4257, 'no_heading', east='0480300.50', lat='038.70600'))
  for name in names:
    _touch(os.path.join(root, 'lisbon', name))
  _touch(os.path.join(root, 'lisbon', 'Thumbs.db'))  # Not an image: ignored, counted.
  index = gsv_cities.build_place_index(root, 'gsv_xs', ['Lisbon'], 4, cache_dir=str(tmp_path / 'c'))
  np.testing.assert_array_equal(index.place_ids, [141, 4257])
  np.testing.assert_array_equal(index.images_per_place, [5, 5])
  # Each heading is kept as it is in the indexed names.
  indexed = [p.decode() for p in index.image_paths]
  assert sorted(indexed) == sorted(f'lisbon/{n}' for n in names)
  headings = sorted(int(p.split('@')[9]) for p in indexed if p.split('@')[9])
  assert headings == sorted(list(REAL_HEADINGS) + [0, 90, 180, 359])
  odd = dict(index.odd_values)
  assert odd == {gsv_cities.ODD_HEADING: 4, gsv_cities.ODD_HEADING_TEXT: 1,
                 gsv_cities.ODD_NOT_AN_IMAGE: 1}
  text = gsv_cities.format_stats(index, 2, 4)
  assert re.search(r'headings outside \[0, 360\] \(kept as is\) *\| 4 ', text), text
  # Read back from the cache: the same counts.
  again = gsv_cities.build_place_index(root, 'gsv_xs', ['Lisbon'], 4, cache_dir=str(tmp_path / 'c'))
  assert again.odd_values == index.odd_values


def test_real_csv_rows_with_headings_outside_0_360(tmp_path):
  root = str(tmp_path / 'g')
  os.makedirs(os.path.join(root, 'Dataframes'))
  # As the real CSVs: pandas' index column first; lat/lon as str() of the float.
  rows = [(i, 141, 2010 + i, 1 + i, heading, 'Bangkok', 13.76438 + i * 1e-5, 100.48301,
           f'3TQZ69H-WlAmAiXDm9yQ{i}Q') for i, heading in enumerate(REAL_HEADINGS)]
  with open(os.path.join(root, 'Dataframes', 'Bangkok.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(('',) + COLUMNS)
    writer.writerows(rows)
    writer.writerow(rows[1])  # A repeated row: indexed once, counted.
  names = []
  for _, place_id, year, month, heading, city, lat, lon, panoid in rows:
    # The reference loader's spelling: str(value).zfill(width) ('-5' -> '-05', '-11' -> '-11').
    names.append('_'.join([city, str(place_id).zfill(7), str(year).zfill(4), str(month).zfill(2),
                           str(heading).zfill(3), str(lat), str(lon), panoid]) + '.jpg')
    _touch(os.path.join(root, 'Images', 'Bangkok', names[-1]))
  _touch(os.path.join(root, 'Images', 'Bangkok', 'Bangkok_extra_not_in_the_csv.jpg'))
  assert 'Bangkok_0000141_2011_02_398_' in names[1] and '_-11_' in names[2]
  assert '_-05_' in names[4]
  index = gsv_cities.build_place_index(root, 'gsv_cities', ['Bangkok'], 4,
                                       cache_dir=str(tmp_path / 'c'))
  assert sorted(p.decode() for p in index.image_paths) == sorted(
      f'Images/Bangkok/{n}' for n in names)
  assert dict(index.odd_values) == {gsv_cities.ODD_HEADING: 4, gsv_cities.ODD_REPEATED_ROW: 1,
                                    gsv_cities.ODD_UNLISTED_IMAGE: 1}
  text = gsv_cities.format_stats(index, 1, 4)
  for what, count in index.odd_values:
    assert re.search(rf'{re.escape(what)} *\| {count} ', text), text


def _large_heading(place, view):
  """Every fifth image gets one of the real headings outside [0, 360]."""
  if (place + view) % 5 == 0:
    return (-11, 398, 731, -5)[place % 4]
  return (37 * view + place) % 361


def _write_large_city(root, layout, num_places, images_per_place):
  """Zero-byte images of real-shaped names; every fifth image has a heading outside [0, 360]."""
  headings = []
  if layout == 'gsv_xs':
    folder = os.path.join(root, 'bangkok')
    os.makedirs(folder)
    for place in range(num_places):
      for v in range(images_per_place):
        heading = _large_heading(place, v)
        headings.append(heading)
        name = (f'@{660329.93 + place:010.2f}@1522162.46@47@P@{13.76438 + v * 1e-5:09.5f}@'
                f'0100.48301@p{place}v{v}@@{heading}@@@@{2014 + v}{1 + place % 12:02d}@{place}@.jpg')
        os.close(os.open(os.path.join(folder, name), os.O_CREAT | os.O_WRONLY, 0o644))
    return headings
  folder = os.path.join(root, 'Images', 'Bangkok')
  os.makedirs(folder)
  os.makedirs(os.path.join(root, 'Dataframes'))
  with open(os.path.join(root, 'Dataframes', 'Bangkok.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(('',) + COLUMNS)
    for place in range(num_places):
      for v in range(images_per_place):
        heading = _large_heading(place, v)
        headings.append(heading)
        year, month, lat, lon = 2014 + v, 1 + place % 12, 13.76438 + v * 1e-5, 100.48301
        panoid = f'p{place}v{v}'
        writer.writerow((len(headings) - 1, place, year, month, heading, 'Bangkok', lat, lon,
                         panoid))
        name = _gsv_name('Bangkok', place, year, month, heading, lat, lon, panoid)
        os.close(os.open(os.path.join(folder, name), os.O_CREAT | os.O_WRONLY, 0o644))
  return headings


@pytest.fixture
def many_files_dir(tmp_path):
  """A scratch folder in memory (/dev/shm) when there is one: creating 100k files on a loaded
  disk takes 4x longer and is not what is measured."""
  shm = '/dev/shm'
  if not (os.path.isdir(shm) and os.access(shm, os.W_OK)):
    yield str(tmp_path)
    return
  folder = tempfile.mkdtemp(prefix='vpr_jax_test_', dir=shm)
  try:
    yield folder
  finally:
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize('layout', ['gsv_cities', 'gsv_xs'])
def test_index_100k_real_shaped_names(layout, many_files_dir, tmp_path):
  num_places, per_place = 25_001, 4  # 100,004 images.
  root = os.path.join(many_files_dir, layout)
  headings = _write_large_city(root, layout, num_places, per_place)
  outside = sum(1 for h in headings if not 0 <= h <= 360)
  assert outside >= len(headings) // 5
  start = time.perf_counter()
  index = gsv_cities.build_place_index(root, layout, ['Bangkok'], 4,
                                       cache_dir=str(tmp_path / 'cache'))
  seconds = time.perf_counter() - start
  assert index.num_images == num_places * per_place and index.num_places == num_places
  np.testing.assert_array_equal(index.place_ids, np.arange(num_places))
  assert dict(index.odd_values) == {gsv_cities.ODD_HEADING: outside}
  # 466k real names were indexed in 12-13 s on 2 cores: 100k in well under a minute.
  print(f'\n{layout}: indexed {index.num_images} images in {seconds:.2f} s')
  assert seconds < 60
  start = time.perf_counter()
  gsv_cities.build_place_index(root, layout, ['Bangkok'], 4, cache_dir=str(tmp_path / 'cache'))
  print(f'{layout}: from the cache in {time.perf_counter() - start:.2f} s')


# Mistakes that give one line, not a traceback.


@pytest.mark.parametrize('layout', ['gsv_cities', 'gsv_xs'])
def test_error_symbolic_link_loop_among_the_images(layout, gsv_root, xs_root, tmp_path):
  root = gsv_root if layout == 'gsv_cities' else xs_root
  folder = os.path.join(root, 'Images', 'Alpha') if layout == 'gsv_cities' else os.path.join(
      root, 'alpha')
  loop = os.path.join(folder, 'loop.jpg')
  os.symlink('loop.jpg', loop)
  _assert_error(root, layout, ['Alpha'], rf"{re.escape(repr(loop))} is a symbolic link loop",
                tmp_path)


def test_error_symbolic_link_loop_as_a_city(xs_root, tmp_path):
  loop = os.path.join(xs_root, 'gamma')
  os.symlink('gamma', loop)
  _assert_error(xs_root, 'gsv_xs', ['Alpha'], 'gamma.* is a symbolic link loop', tmp_path)


def test_symbolic_links_to_images_are_followed(xs_root, tmp_path):
  linked = str(tmp_path / 'linked')
  os.makedirs(linked)
  os.symlink(os.path.join(xs_root, 'alpha'), os.path.join(linked, 'alpha'))
  index = gsv_cities.build_place_index(linked, 'gsv_xs', ['Alpha'], 4,
                                       cache_dir=str(tmp_path / 'c'))
  assert index.num_places == 3


def test_error_images_per_place_above_the_places(gsv_root):
  index = gsv_cities.build_place_index(gsv_root, 'gsv_cities', ['Alpha', 'Beta'], 4)
  assert index.images_per_place.max() == 6
  gsv_cities.check_images_per_place(index, 4)
  with pytest.raises(DatasetError, match=r'images_per_place=7 exceeds the images of every place'
                     r'.*largest place has 6'):
    gsv_cities.check_images_per_place(index, 7)
  with pytest.raises(DatasetError, match=r'images_per_place=5 exceeds the images of 3 of the 5 '
                     r'places.*min_img_per_place >= 5'):
    gsv_cities.check_images_per_place(index, 5)


def test_error_min_img_per_place_above_every_place_names_the_largest(gsv_root, tmp_path):
  _assert_error(gsv_root, 'gsv_cities', ['Beta'], 'min_img_per_place=7 images: the largest place '
                'has 6', tmp_path, min_img=7)
