"""Synthetic cities in every layout vpr_jax reads, for tests and CPU demos.

Each place is a procedurally drawn street scene (sky gradient, a row of buildings with windows,
roofs and doors, trees, poles with signs, a road with lane markings) on a canvas wider than one
view. Every image of a place is a different view of its scene: a random crop (scale, horizontal
and vertical shift, small rotation), then a change of appearance (brightness, contrast, gamma,
colour cast, an illumination ramp, transient occluders standing for cars and pedestrians, sensor
noise) and JPEG encoding. Views of one place share their structure; places differ; and the
appearance change is strong enough that nearest neighbour on raw pixels is far from perfect, so a
trained network has something to learn.

Difficulty, measured on the default eval split (seed 0, 64x64, 50 places, 2 database images and
1 query each, chance R@1 = 2%): nearest neighbour on raw pixels R@1 32% (val) / 34% (test); an
untrained ResNet-18 cut after layer3 + GeM 30-40%. A small CNN + GeM trained from scratch with the
multi-similarity loss on 1000 training places (4 images each, P=32, K=4) reaches 84-92% after
about 60-90 steps; with only 300 training places a ResNet-18 + GeM plateaued near 50% over 135
steps, so give a demo many places (they are cheap: about 2 ms per 64x64 image).

Everything is a pure function of `seed`: each place draws from its own random stream keyed by
(seed, split, place index) and each view from (seed, split, place index, role, view index), so the
bytes written do not depend on how many places are requested or in which order they are drawn.
The eval places (benchmark splits) draw from other streams than the training places, so their
scenes are disjoint from training, and they lie in a region of their own.

Layouts written under `root` (see `make_synthetic_dataset`):
  gsv_cities/Dataframes/<City>.csv, gsv_cities/Images/<City>/<city>_<place:07d>_<yyyy>_<mm>_
    <northdeg:03d>_<lat>_<lon>_<panoid>.jpg                                     (GSV-Cities)
  gsv_xs/<city lower-cased>/@east@north@zone@band@lat@lon@panoid@@northdeg@@@@yyyymm@
    <place>_<City>@.jpg                                                          (GSV-XS)
  synthetic_val/{database,queries}/@east@north@zone@band@lat@lon@panoid@@northdeg@@@@yyyymm@@.jpg
  synthetic_test/...                                                             (benchmarks)
The GSV-XS city folders are lower-cased and the place field is `<id>_<City>`, as in the real
GSV-XS release (whose loader takes the folder from `place.split('_')[1].lower()`).
"""

from __future__ import annotations

import colorsys
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import string
from typing import Sequence

import numpy as np
from PIL import Image
from PIL import ImageDraw

DEFAULT_CITIES = ('SynthA', 'SynthB')
LAYOUTS = ('gsv_cities', 'gsv_xs', 'benchmarks')
BENCHMARK_SPLITS = ('synthetic_val', 'synthetic_test')
GSV_CITIES_COLUMNS = ('place_id', 'year', 'month', 'northdeg', 'city_id', 'lat', 'lon', 'panoid')
SUMMARY_FILE = 'synthetic_dataset.json'

# Place centres sit on a grid with this spacing (metres), jittered by at most _PLACE_JITTER_M, so
# two places are always >= _PLACE_SPACING_M - 2 * _PLACE_JITTER_M = 140 m apart: far outside the
# 25 m positive radius even after the per-image offsets below.
_PLACE_SPACING_M = 200.0
_PLACE_JITTER_M = 30.0
_GRID_COLUMNS = 32
_DATABASE_OFFSET_M = 3.0
_QUERY_OFFSET_M = 10.0
_TRAIN_OFFSET_M = 8.0
_METRES_PER_DEGREE = 111_320.0
# Random streams: training places and the two benchmark splits never share one.
_STREAM_TRAIN = 0
_STREAM_BENCHMARK = {'synthetic_val': 1, 'synthetic_test': 2}
_ROLE_TRAIN, _ROLE_DATABASE, _ROLE_QUERY = 0, 1, 2
_PANOID_ALPHABET = np.array(list(string.ascii_letters + string.digits))


@dataclasses.dataclass(frozen=True)
class GeoFrame:
  """A local metric frame: UTM origin of a (synthetic) city and its latitude/longitude."""
  zone: int
  band: str
  east0: float
  north0: float
  lat0: float
  lon0: float

  def locate(self, east_offset: float, north_offset: float):
    """Returns (utm_east, utm_north, lat, lon) of a point given in metres from the origin."""
    lat = self.lat0 + north_offset / _METRES_PER_DEGREE
    lon = self.lon0 + east_offset / (_METRES_PER_DEGREE * math.cos(math.radians(self.lat0)))
    return self.east0 + east_offset, self.north0 + north_offset, lat, lon


# Origins of the training cities (cycled, shifted 50 km per cycle, when more cities are asked).
_CITY_FRAMES = (
    GeoFrame(10, 'S', 551_000.0, 4_179_000.0, 37.755, -122.418),
    GeoFrame(54, 'S', 382_000.0, 3_949_000.0, 35.683, 139.692),
    GeoFrame(31, 'U', 452_000.0, 5_411_000.0, 48.853, 2.349),
    GeoFrame(18, 'T', 584_000.0, 4_511_000.0, 40.748, -73.986),
)
# The benchmark region, away from every training city.
_BENCHMARK_FRAMES = {
    'synthetic_val': GeoFrame(33, 'T', 291_000.0, 4_640_000.0, 41.890, 12.492),
    'synthetic_test': GeoFrame(33, 'T', 301_000.0, 4_650_000.0, 41.982, 12.610),
}


def city_frame(city_index: int) -> GeoFrame:
  """The geographic frame of the `city_index`-th synthetic training city."""
  base = _CITY_FRAMES[city_index % len(_CITY_FRAMES)]
  shift = 50_000.0 * (city_index // len(_CITY_FRAMES))
  return dataclasses.replace(base, north0=base.north0 + shift,
                             lat0=base.lat0 + shift / _METRES_PER_DEGREE)


# ------------------------------------------------------------------------------------------------
# Drawing.


def _rng(*key: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
  r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
  return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def _scale_colour(colour, factor: float) -> tuple[int, int, int]:
  return tuple(int(min(max(round(c * factor), 0), 255)) for c in colour)


def _vertical_gradient(width: int, height: int, top, bottom) -> np.ndarray:
  t = np.linspace(0.0, 1.0, max(height, 1), dtype=np.float32)[:, None, None]
  rows = (1.0 - t) * np.asarray(top, np.float32) + t * np.asarray(bottom, np.float32)
  return np.broadcast_to(rows, (max(height, 1), width, 3))


def _draw_sky_and_ground(rng: np.random.Generator, hc: int, wc: int, horizon: int):
  """(canvas, sky_bottom, ground_top): a sky gradient above the horizon, a ground one below."""
  # A day sky most of the time, sometimes dusk or overcast.
  kind = rng.uniform()
  if kind < 0.6:
    sky_top = _hsv(rng.uniform(0.53, 0.66), rng.uniform(0.3, 0.75), rng.uniform(0.6, 1.0))
  elif kind < 0.8:
    sky_top = _hsv(rng.uniform(0.0, 0.1), rng.uniform(0.3, 0.7), rng.uniform(0.55, 0.95))
  else:
    sky_top = _hsv(rng.uniform(0.0, 1.0), rng.uniform(0.0, 0.12), rng.uniform(0.55, 0.9))
  sky_bottom = _scale_colour(sky_top, rng.uniform(1.05, 1.35))
  ground_top = _hsv(rng.uniform(0.0, 1.0), rng.uniform(0.0, 0.15), rng.uniform(0.3, 0.6))
  ground_bottom = _scale_colour(ground_top, rng.uniform(0.55, 0.9))
  pixels = np.concatenate([
      _vertical_gradient(wc, horizon, sky_top, sky_bottom),
      _vertical_gradient(wc, hc - horizon, ground_top, ground_bottom)], axis=0)
  canvas = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), 'RGB')
  return canvas, sky_bottom, ground_top


def _draw_skyline(draw, rng: np.random.Generator, hc: int, wc: int, horizon: int, sky_bottom):
  """Distant flat silhouettes between sky and street."""
  haze = _scale_colour(sky_bottom, rng.uniform(0.55, 0.8))
  x = -rng.uniform(0, 0.05) * wc
  while x < wc:
    w = rng.uniform(0.03, 0.1) * wc
    top = horizon - rng.uniform(0.05, 0.3) * hc
    draw.rectangle([x, top, x + w, horizon], fill=haze)
    x += w


def _draw_windows(draw, rng: np.random.Generator, hc: int, wc: int, box, colour):
  """A grid of windows on the facade box = (x, top, w, height); some of them lit."""
  x, top, w, height = box
  lit = rng.uniform() < 0.3
  glass = (_hsv(rng.uniform(0.1, 0.16), rng.uniform(0.3, 0.7), rng.uniform(0.8, 1.0)) if lit
           else _scale_colour(colour, rng.uniform(0.25, 0.6)))
  cell_w = rng.uniform(0.025, 0.06) * wc
  cell_h = rng.uniform(0.05, 0.1) * hc
  fill_w, fill_h = rng.uniform(0.35, 0.7), rng.uniform(0.35, 0.7)
  for row in range(int((height - 0.06 * hc) // cell_h)):
    wy = top + 0.03 * hc + row * cell_h
    for col in range(int((w - 0.02 * wc) // cell_w)):
      wx = x + 0.01 * wc + col * cell_w
      draw.rectangle([wx, wy, wx + fill_w * cell_w, wy + fill_h * cell_h], fill=glass)


def _draw_building(draw, rng: np.random.Generator, hc: int, wc: int, x: float, w: float,
                   base_line: float):
  """One building of width w at x: facade, roof, windows, door."""
  height = rng.uniform(0.15, 0.6) * hc
  top = base_line - height
  colour = _hsv(rng.uniform(0.0, 1.0), rng.uniform(0.05, 0.6), rng.uniform(0.3, 0.95))
  draw.rectangle([x, top, x + w, base_line], fill=colour)
  roof = rng.uniform()
  if roof < 0.3:
    peak = rng.uniform(0.05, 0.15) * hc
    draw.polygon([(x, top), (x + w, top), (x + w / 2, top - peak)],
                 fill=_scale_colour(colour, rng.uniform(0.4, 0.7)))
  elif roof < 0.6:
    draw.rectangle([x - 1, top, x + w + 1, top + rng.uniform(0.01, 0.03) * hc],
                   fill=_scale_colour(colour, rng.uniform(0.5, 0.8)))
  if rng.uniform() < 0.85:
    _draw_windows(draw, rng, hc, wc, (x, top, w, height), colour)
  if rng.uniform() < 0.6:
    door_w = rng.uniform(0.15, 0.3) * w
    door_x = x + rng.uniform(0.1, 0.9) * (w - door_w)
    draw.rectangle([door_x, base_line - rng.uniform(0.06, 0.1) * hc, door_x + door_w, base_line],
                   fill=_hsv(rng.uniform(0, 1), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.5)))


def _draw_street(draw, rng: np.random.Generator, hc: int, wc: int, base_line: float, ground_top):
  """Kerb and dashed lane markings."""
  kerb = _scale_colour(ground_top, rng.uniform(1.2, 1.6))
  draw.rectangle([0, base_line, wc, base_line + rng.uniform(0.02, 0.05) * hc], fill=kerb)
  lane_y = base_line + rng.uniform(0.4, 0.7) * (hc - base_line)
  lane_colour = (240, 240, 235) if rng.uniform() < 0.6 else (230, 190, 40)
  dash, gap = rng.uniform(0.03, 0.1) * wc, rng.uniform(0.02, 0.08) * wc
  x = -rng.uniform(0.0, dash + gap)
  while x < wc:
    draw.rectangle([x, lane_y, x + dash, lane_y + max(1.0, 0.012 * hc)], fill=lane_colour)
    x += dash + gap


def _draw_furniture(draw, rng: np.random.Generator, hc: int, wc: int, base_line: float):
  """Trees and sign poles in front of the buildings."""
  for _ in range(rng.integers(0, 5)):
    tx = rng.uniform(0, wc)
    size = rng.uniform(0.04, 0.1) * wc
    trunk_h = rng.uniform(0.05, 0.15) * hc
    draw.rectangle([tx - 0.08 * size, base_line - trunk_h, tx + 0.08 * size, base_line + 2],
                   fill=_hsv(0.07, 0.6, rng.uniform(0.2, 0.4)))
    draw.ellipse([tx - size / 2, base_line - trunk_h - size, tx + size / 2, base_line - trunk_h],
                 fill=_hsv(rng.uniform(0.22, 0.4), rng.uniform(0.4, 0.8), rng.uniform(0.25, 0.6)))
  for _ in range(rng.integers(0, 4)):
    px = rng.uniform(0, wc)
    pole_top = base_line - rng.uniform(0.2, 0.4) * hc
    draw.line([(px, pole_top), (px, base_line + 0.02 * hc)], fill=(60, 60, 60),
              width=max(1, int(0.006 * wc)))
    sign = rng.uniform(0.015, 0.035) * wc
    sign_colour = _hsv(rng.uniform(0, 1), rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
    if rng.uniform() < 0.5:
      draw.ellipse([px - sign, pole_top - sign, px + sign, pole_top + sign], fill=sign_colour)
    else:
      draw.rectangle([px - sign, pole_top - sign, px + 2 * sign, pole_top + sign], fill=sign_colour)


def draw_scene(rng: np.random.Generator, canvas_hw: tuple[int, int]) -> Image.Image:
  """Draws one place: a street scene on an RGB canvas of size canvas_hw = (H, W).

  The parts are drawn in a fixed order from one random stream, so a place always looks the same.

  Args:
    rng: the place's random stream.
    canvas_hw: canvas (height, width) in pixels.

  Returns:
    The scene as an RGB PIL image.
  """
  hc, wc = canvas_hw
  horizon = int(rng.uniform(0.58, 0.72) * hc)
  canvas, sky_bottom, ground_top = _draw_sky_and_ground(rng, hc, wc, horizon)
  draw = ImageDraw.Draw(canvas)
  _draw_skyline(draw, rng, hc, wc, horizon, sky_bottom)
  # Buildings along the street.
  base_line = horizon + rng.uniform(0.0, 0.03) * hc
  x = -rng.uniform(0.0, 0.1) * wc
  while x < wc:
    w = rng.uniform(0.07, 0.22) * wc
    if rng.uniform() < 0.25:
      x += rng.uniform(0.01, 0.06) * wc
    _draw_building(draw, rng, hc, wc, x, w, base_line)
    x += w
  _draw_street(draw, rng, hc, wc, base_line, ground_top)
  _draw_furniture(draw, rng, hc, wc, base_line)
  return canvas


@dataclasses.dataclass(frozen=True)
class ViewParams:
  """How far views of one scene differ. Geometry in canvas fractions, photometry in factors."""
  crop_height: tuple[float, float] = (0.6, 0.8)
  aspect_jitter: float = 0.08
  shift_x: float = 0.08
  shift_y: float = 0.06
  rotation_deg: float = 4.0
  brightness: tuple[float, float] = (0.6, 1.4)
  contrast: tuple[float, float] = (0.6, 1.4)
  gamma: tuple[float, float] = (0.75, 1.35)
  colour_cast: float = 0.15
  illumination_ramp: float = 0.25
  max_occluders: int = 3
  noise_std: tuple[float, float] = (0.01, 0.04)


def render_view(scene: Image.Image, rng: np.random.Generator, image_hw: tuple[int, int],
                params: ViewParams = ViewParams()) -> Image.Image:
  """Renders one view of a scene: a random crop, then a random change of appearance.

  Args:
    scene: the place's canvas.
    rng: the view's random stream.
    image_hw: output (height, width).
    params: view variability.

  Returns:
    The view, an RGB PIL image of size image_hw.
  """
  height, width = image_hw
  wc, hc = scene.size
  crop_h = rng.uniform(*params.crop_height) * hc
  crop_w = min(crop_h * width / height * (1.0 + rng.uniform(-1, 1) * params.aspect_jitter),
               0.95 * wc)
  cx = wc / 2 + rng.uniform(-1, 1) * params.shift_x * wc
  cy = hc / 2 + rng.uniform(-1, 1) * params.shift_y * hc
  cx = min(max(cx, crop_w / 2), wc - crop_w / 2)
  cy = min(max(cy, crop_h / 2), hc - crop_h / 2)
  theta = math.radians(rng.uniform(-1, 1) * params.rotation_deg)
  # Sample at twice the output size, then let PIL's antialiased resize bring it down.
  out_w, out_h = 2 * width, 2 * height
  sx, sy = crop_w / out_w, crop_h / out_h
  cos, sin = math.cos(theta), math.sin(theta)
  # Output pixel (u, v) -> canvas point: centre + R(theta) @ diag(sx, sy) @ (u - out_w/2, ...).
  a, b = cos * sx, -sin * sy
  d, e = sin * sx, cos * sy
  c = cx - a * out_w / 2 - b * out_h / 2
  f = cy - d * out_w / 2 - e * out_h / 2
  view = scene.transform((out_w, out_h), Image.AFFINE, (a, b, c, d, e, f),
                         resample=Image.BILINEAR, fillcolor=scene.getpixel((0, 0)))
  view = view.resize((width, height), Image.BILINEAR)

  # Transient occluders (cars, pedestrians) in the lower half.
  draw = ImageDraw.Draw(view)
  for _ in range(rng.integers(0, params.max_occluders + 1)):
    ow = rng.uniform(0.08, 0.3) * width
    oh = rng.uniform(0.08, 0.25) * height
    ox = rng.uniform(-0.1, 1.0) * width
    oy = rng.uniform(0.45, 0.95) * height
    colour = _hsv(rng.uniform(0, 1), rng.uniform(0, 0.9), rng.uniform(0.1, 0.95))
    if rng.uniform() < 0.5:
      draw.rectangle([ox, oy - oh, ox + ow, oy], fill=colour)
    else:
      draw.ellipse([ox, oy - oh, ox + ow, oy], fill=colour)

  x = np.asarray(view, dtype=np.float32) / 255.0
  mean = x.mean()
  x = (x - mean) * rng.uniform(*params.contrast) + mean * rng.uniform(*params.brightness)
  x = x * (1.0 + rng.uniform(-1, 1, size=3).astype(np.float32) * params.colour_cast)
  angle = rng.uniform(0, 2 * math.pi)
  ramp = (np.cos(angle) * np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :]
          + np.sin(angle) * np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None])
  x = x * (1.0 + rng.uniform(-1, 1) * params.illumination_ramp * 2.0 * ramp)[..., None]
  x = np.clip(x, 0.0, 1.0) ** rng.uniform(*params.gamma)
  x = x + rng.normal(0.0, rng.uniform(*params.noise_std), size=x.shape).astype(np.float32)
  return Image.fromarray(np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8), 'RGB')


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
  """JPEG bytes of an image (fixed encoder settings, so output bytes are reproducible)."""
  buffer = io.BytesIO()
  img.save(buffer, format='JPEG', quality=quality, subsampling=0 if quality >= 90 else 2)
  return buffer.getvalue()


def _canvas_hw(image_hw: tuple[int, int]) -> tuple[int, int]:
  # Twice the output resolution over the crop range, and wide enough for the horizontal shifts.
  height, width = image_hw
  return int(round(2.6 * height)), int(round(4.0 * width))


def place_views(stream: int, place_index: int, seed: int, role_counts: Sequence[tuple[int, int]],
                image_hw: tuple[int, int], params: ViewParams = ViewParams(),
                quality: int = 90) -> dict[int, list[bytes]]:
  """JPEG views of one place.

  Args:
    stream: which family of places (training or a benchmark split).
    place_index: the place within its family.
    seed: dataset seed.
    role_counts: (role, count) pairs; each role has its own random streams.
    image_hw: (height, width) of the views.
    params: view variability.
    quality: JPEG quality.

  Returns:
    {role: [jpeg bytes, ...]}.
  """
  scene = draw_scene(_rng(seed, stream, place_index), _canvas_hw(image_hw))
  views = {}
  for role, count in role_counts:
    views[role] = [
        encode_jpeg(render_view(scene, _rng(seed, stream, place_index, role, v), image_hw, params),
                    quality) for v in range(count)]
  return views


# ------------------------------------------------------------------------------------------------
# Metadata and file names.


def _place_offset(place_index: int, rng: np.random.Generator) -> np.ndarray:
  # A fixed grid width keeps a place's position independent of how many places there are.
  row, col = divmod(place_index, _GRID_COLUMNS)
  grid = np.array([col, row], dtype=np.float64) * _PLACE_SPACING_M
  return grid + rng.uniform(-_PLACE_JITTER_M, _PLACE_JITTER_M, size=2)


def _point_near(rng: np.random.Generator, radius: float) -> np.ndarray:
  r = radius * math.sqrt(rng.uniform())
  angle = rng.uniform(0, 2 * math.pi)
  return np.array([r * math.cos(angle), r * math.sin(angle)])


def _panoid(rng: np.random.Generator, taken: set) -> str:
  while True:
    panoid = ''.join(rng.choice(_PANOID_ALPHABET, size=22))
    if panoid not in taken:
      taken.add(panoid)
      return panoid


def _dates(rng: np.random.Generator, count: int) -> list[tuple[int, int]]:
  # Distinct (year, month) per image so "most recent" orderings are well defined.
  months = rng.choice(np.arange(2008 * 12, 2024 * 12), size=count, replace=False)
  return [(int(m // 12), int(m % 12) + 1) for m in months]


def _round_coord(value: float) -> float:
  return float(round(value, 6))


def utm_name(east: float, north: float, zone: int, band: str, lat: float, lon: float, panoid: str,
             northdeg: int, year: int, month: int, place_field: str = '') -> str:
  """A file name in the '@' format of the benchmark sets (and GSV-XS with `place_field`)."""
  return (f'@{east:010.2f}@{north:010.2f}@{zone}@{band}@{lat:09.5f}@{lon:010.5f}@{panoid}'
          f'@@{northdeg:03d}@@@@{year:04d}{month:02d}@{place_field}@.jpg')


def gsv_cities_name(city: str, place_id: int, year: int, month: int, northdeg: int, lat: float,
                    lon: float, panoid: str) -> str:
  """A GSV-Cities image name (lat/lon via Python's str() of the float, as the reference does)."""
  return (f'{city}_{place_id:07d}_{year:04d}_{month:02d}_{northdeg:03d}_{str(lat)}_{str(lon)}_'
          f'{panoid}.jpg')


def _write(path: str, data: bytes):
  with open(path, 'wb') as f:
    f.write(data)


def _check_image_size(image_size) -> tuple[int, int]:
  if len(image_size) != 2 or min(image_size) < 16:
    raise ValueError(f'image_size must be (height, width) with both >= 16, got {image_size!r}')
  return int(image_size[0]), int(image_size[1])


# ------------------------------------------------------------------------------------------------
# Datasets.


def make_training_places(root: str, seed: int = 0, num_train_places: int = 1000,
                         images_per_place: int = 4, image_size: Sequence[int] = (64, 64),
                         cities: Sequence[str] = DEFAULT_CITIES,
                         layouts: Sequence[str] = ('gsv_cities', 'gsv_xs'),
                         max_images_per_place: int | None = None, num_sparse_places: int = 0,
                         jpeg_quality: int = 90, view_params: ViewParams = ViewParams()) -> dict:
  """Writes the training places in the GSV-Cities and/or GSV-XS layouts.

  Places are dealt to the cities in turn (global place g goes to city g % len(cities), with
  city-local id g // len(cities)). The same JPEG bytes are written in both layouts.

  Args:
    root: output folder (created).
    seed: dataset seed.
    num_train_places: places with at least `images_per_place` images.
    images_per_place: images of each such place.
    image_size: (height, width) of the images.
    cities: synthetic city names.
    layouts: subset of ('gsv_cities', 'gsv_xs').
    max_images_per_place: if set, each place gets a random count in
      [images_per_place, max_images_per_place].
    num_sparse_places: extra places with fewer images (images_per_place - 1, at least 1), which a
      loader with min_img_per_place = images_per_place must drop.
    jpeg_quality: JPEG quality.
    view_params: view variability.

  Returns:
    A summary: {'cities', 'num_places', 'num_sparse_places', 'num_images',
    'places_per_city', 'images_per_city', 'gsv_cities_dir', 'gsv_xs_dir'}.
  """
  image_hw = _check_image_size(image_size)
  cities = tuple(cities)
  total_places = num_train_places + num_sparse_places
  _check_training_args(cities, layouts, images_per_place, max_images_per_place, total_places)
  dirs = _make_training_dirs(root, cities, layouts)
  rows = {city: [] for city in cities}
  images_per_city = {city: 0 for city in cities}
  taken = set()
  for g in range(total_places):
    if g >= num_train_places:
      count = max(1, images_per_place - 1)
    elif max_images_per_place is not None:
      count = int(_rng(seed, _STREAM_TRAIN, g, 98).integers(images_per_place,
                                                            max_images_per_place + 1))
    else:
      count = images_per_place
    views = place_views(_STREAM_TRAIN, g, seed, [(_ROLE_TRAIN, count)], image_hw, view_params,
                        jpeg_quality)[_ROLE_TRAIN]
    city = cities[g % len(cities)]
    rows[city].extend(_write_training_place(dirs, cities, g, seed, views, taken))
    images_per_city[city] += len(views)
  if dirs['gsv_cities'] is not None:
    for city in cities:
      _write_gsv_cities_csv(os.path.join(dirs['gsv_cities'], 'Dataframes', f'{city}.csv'),
                            rows[city])
  places_per_city = {city: len(range(i, total_places, len(cities)))
                     for i, city in enumerate(cities)}
  return {
      'cities': list(cities),
      'num_places': num_train_places,
      'num_sparse_places': num_sparse_places,
      'num_images': int(sum(images_per_city.values())),
      'places_per_city': places_per_city,
      'images_per_city': images_per_city,
      'gsv_cities_dir': dirs['gsv_cities'],
      'gsv_xs_dir': dirs['gsv_xs'],
  }


def _check_training_args(cities: tuple[str, ...], layouts: Sequence[str], images_per_place: int,
                         max_images_per_place: int | None, total_places: int):
  """Raises ValueError for settings that cannot make a valid training folder."""
  if not cities or len(set(cities)) != len(cities) or len({c.lower() for c in cities}) != len(
      cities):
    raise ValueError(f'cities must be distinct (also ignoring case), got {cities!r}')
  for city in cities:
    if not city or any(ch in city for ch in '_@/\\ '):
      raise ValueError(f'city name {city!r} must be non-empty without "_", "@", "/" or spaces')
  unknown = set(layouts) - {'gsv_cities', 'gsv_xs'}
  if unknown:
    raise ValueError(f'unknown training layouts {sorted(unknown)}')
  if images_per_place < 1:
    raise ValueError(f'images_per_place must be >= 1, got {images_per_place}')
  if max_images_per_place is not None and max_images_per_place < images_per_place:
    raise ValueError('max_images_per_place must be >= images_per_place')
  if math.ceil(total_places / len(cities)) > 100_000:
    raise ValueError('GSV-Cities place ids are below 100000 per city')


def _make_training_dirs(root: str, cities: Sequence[str],
                        layouts: Sequence[str]) -> dict[str, str | None]:
  """Creates the folders of each layout; {'gsv_cities': dir or None, 'gsv_xs': dir or None}."""
  dirs = {'gsv_cities': None, 'gsv_xs': None}
  if 'gsv_cities' in layouts:
    dirs['gsv_cities'] = os.path.join(root, 'gsv_cities')
    os.makedirs(os.path.join(dirs['gsv_cities'], 'Dataframes'), exist_ok=True)
    for city in cities:
      os.makedirs(os.path.join(dirs['gsv_cities'], 'Images', city), exist_ok=True)
  if 'gsv_xs' in layouts:
    dirs['gsv_xs'] = os.path.join(root, 'gsv_xs')
    for city in cities:
      os.makedirs(os.path.join(dirs['gsv_xs'], city.lower()), exist_ok=True)
  return dirs


def _write_training_place(dirs: dict[str, str | None], cities: Sequence[str], g: int, seed: int,
                          views: Sequence[bytes], taken: set) -> list[tuple]:
  """Writes the views of global place g in each layout; returns its GSV-Cities CSV rows.

  `taken` holds the panorama ids used so far (updated).
  """
  city_index = g % len(cities)
  city, local_id = cities[city_index], g // len(cities)
  meta_rng = _rng(seed, _STREAM_TRAIN, g, 99)
  frame = city_frame(city_index)
  centre = _place_offset(local_id, meta_rng)
  dates = _dates(meta_rng, len(views))
  rows = []
  for v, data in enumerate(views):
    offset = centre + _point_near(meta_rng, _TRAIN_OFFSET_M)
    east, north, lat, lon = frame.locate(*offset)
    lat, lon = _round_coord(lat), _round_coord(lon)
    northdeg = int(meta_rng.integers(0, 360))
    panoid = _panoid(meta_rng, taken)
    year, month = dates[v]
    if dirs['gsv_cities'] is not None:
      name = gsv_cities_name(city, local_id, year, month, northdeg, lat, lon, panoid)
      _write(os.path.join(dirs['gsv_cities'], 'Images', city, name), data)
      rows.append((local_id, year, month, northdeg, city, lat, lon, panoid))
    if dirs['gsv_xs'] is not None:
      name = utm_name(east, north, frame.zone, frame.band, lat, lon, panoid, northdeg, year,
                      month, place_field=f'{local_id}_{city}')
      _write(os.path.join(dirs['gsv_xs'], city.lower(), name), data)
  return rows


def _write_gsv_cities_csv(path: str, rows: Sequence[tuple]):
  """A city's Dataframes CSV; coordinates as repr() so that they round-trip exactly."""
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(GSV_CITIES_COLUMNS)
    for row in rows:
      writer.writerow([row[0], row[1], row[2], row[3], row[4], repr(row[5]), repr(row[6]),
                       row[7]])


def make_benchmark_split(root: str, split: str = 'synthetic_val', seed: int = 0,
                         num_places: int = 50, database_per_place: int = 2,
                         queries_per_place: int = 1, image_size: Sequence[int] = (64, 64),
                         jpeg_quality: int = 90, view_params: ViewParams = ViewParams(),
                         num_places_without_database: int = 0,
                         write_precomputed_lists: bool = False) -> dict:
  """Writes one benchmark split `<root>/<split>/{database,queries}/*.jpg` with a known answer.

  Database images lie within 3 m of their place, queries within 10 m, places >= 140 m apart, so
  the positives of a query (database images within 25 m) are exactly its place's database images.

  Args:
    root: data root.
    split: folder name; 'synthetic_val' and 'synthetic_test' have fixed random streams and
      regions, any other name gets its own stream derived from the name.
    seed: dataset seed.
    num_places: places with database images and queries.
    database_per_place: database images per place.
    queries_per_place: queries per place.
    image_size: (height, width).
    jpeg_quality: JPEG quality.
    view_params: view variability.
    num_places_without_database: extra places that only have queries (queries without
      positives, as in SF-XS test).
    write_precomputed_lists: also write `<split>_dbImages.npy`, `<split>_qImages.npy` (sorted
      relative paths) and `<split>_gt.npy` (object array of positive lists) in the split folder,
      like the gsv-cities family's precomputed files.

  Returns:
    {'dir', 'num_database', 'num_queries', 'num_without_positives', 'database' (sorted relative
    paths), 'queries' (sorted relative paths), 'positives' (per query, sorted database indices),
    'query_place', 'database_place' (place index of each image)}.
  """
  image_hw = _check_image_size(image_size)
  if split in _STREAM_BENCHMARK:
    stream, frame = _STREAM_BENCHMARK[split], _BENCHMARK_FRAMES[split]
  else:
    stream = 10 + int(hashlib.sha1(split.encode('utf-8')).hexdigest()[:12], 16)
    frame = dataclasses.replace(_BENCHMARK_FRAMES['synthetic_val'], east0=311_000.0)
  split_dir = os.path.join(root, split)
  for sub in ('database', 'queries'):
    os.makedirs(os.path.join(split_dir, sub), exist_ok=True)
  total_places = num_places + num_places_without_database
  taken = set()
  database, queries = [], []  # (relative path, place)
  for p in range(total_places):
    n_db = database_per_place if p < num_places else 0
    views = place_views(stream, p, seed, [(_ROLE_DATABASE, n_db), (_ROLE_QUERY, queries_per_place)],
                        image_hw, view_params, jpeg_quality)
    meta_rng = _rng(seed, stream, p, 99)
    centre = _place_offset(p, meta_rng)
    for role, radius, sub, out in ((_ROLE_DATABASE, _DATABASE_OFFSET_M, 'database', database),
                                   (_ROLE_QUERY, _QUERY_OFFSET_M, 'queries', queries)):
      dates = _dates(meta_rng, len(views[role]))
      for v, data in enumerate(views[role]):
        east, north, lat, lon = frame.locate(*(centre + _point_near(meta_rng, radius)))
        name = utm_name(east, north, frame.zone, frame.band, lat, lon, _panoid(meta_rng, taken),
                        int(meta_rng.integers(0, 360)), *dates[v])
        relative = f'{sub}/{name}'
        _write(os.path.join(split_dir, relative), data)
        out.append((relative, p))
  database.sort()
  queries.sort()
  db_by_place = {}
  for i, (_, p) in enumerate(database):
    db_by_place.setdefault(p, []).append(i)
  positives = [db_by_place.get(p, []) for _, p in queries]
  if write_precomputed_lists:
    _write_precomputed_lists(split_dir, split, [r for r, _ in database],
                             [r for r, _ in queries], positives)
  return {
      'dir': split_dir,
      'num_database': len(database),
      'num_queries': len(queries),
      'num_without_positives': sum(1 for p in positives if not p),
      'database': [r for r, _ in database],
      'queries': [r for r, _ in queries],
      'positives': positives,
      'database_place': [p for _, p in database],
      'query_place': [p for _, p in queries],
  }


def _write_precomputed_lists(split_dir: str, split: str, database: Sequence[str],
                             queries: Sequence[str], positives: Sequence[Sequence[int]]):
  """The gsv-cities family's list files: `<split>_{dbImages,qImages,gt}.npy`.

  gt is an object array of positive lists, as the family stores it (a pickle: written here, read
  back only through a restricted reader).
  """
  np.save(os.path.join(split_dir, f'{split}_dbImages.npy'), np.array(database))
  np.save(os.path.join(split_dir, f'{split}_qImages.npy'), np.array(queries))
  gt = np.empty(len(positives), dtype=object)
  gt[:] = [list(p) for p in positives]
  np.save(os.path.join(split_dir, f'{split}_gt.npy'), gt, allow_pickle=True)


def make_synthetic_dataset(root: str, seed: int = 0, num_train_places: int = 1000,
                           images_per_place: int = 4, num_eval_places: int = 50,
                           eval_queries_per_place: int = 1, eval_database_per_place: int = 2,
                           image_size: Sequence[int] = (64, 64),
                           cities: Sequence[str] = DEFAULT_CITIES,
                           layouts: Sequence[str] = LAYOUTS,
                           benchmark_splits: Sequence[str] = BENCHMARK_SPLITS,
                           max_images_per_place: int | None = None, num_sparse_places: int = 0,
                           jpeg_quality: int = 90,
                           view_params: ViewParams = ViewParams()) -> dict:
  """Writes a synthetic dataset in every layout vpr_jax reads (module doc), deterministically.

  Args:
    root: output folder (created; existing files with the same names are overwritten).
    seed: everything written is a pure function of the seed and the other arguments.
    num_train_places: training places (spread over `cities`).
    images_per_place: images per training place.
    num_eval_places: places of each benchmark split, disjoint from the training places.
    eval_queries_per_place: queries per eval place.
    eval_database_per_place: database images per eval place.
    image_size: (height, width) of every image.
    cities: synthetic training city names.
    layouts: which of 'gsv_cities', 'gsv_xs', 'benchmarks' to write.
    benchmark_splits: benchmark folders to write (with 'benchmarks').
    max_images_per_place: optional upper bound of a random per-place image count.
    num_sparse_places: extra training places with too few images (see `make_training_places`).
    jpeg_quality: JPEG quality.
    view_params: view variability.

  Returns:
    A JSON-serialisable summary (also written to `<root>/synthetic_dataset.json`):
    {'root', 'seed', 'image_size', 'layouts', 'train': make_training_places' summary or None,
    'benchmarks': {split: make_benchmark_split's summary}}.
  """
  image_hw = _check_image_size(image_size)
  unknown = set(layouts) - set(LAYOUTS)
  if unknown:
    raise ValueError(f'unknown layouts {sorted(unknown)}; expected a subset of {LAYOUTS}')
  os.makedirs(root, exist_ok=True)
  summary = {'root': os.fspath(root), 'seed': seed, 'image_size': list(image_hw),
             'layouts': list(layouts), 'train': None, 'benchmarks': {},
             # What the data was generated from, so that a run asking for other data can tell.
             'params': {'seed': int(seed), 'num_train_places': int(num_train_places),
                        'images_per_place': int(images_per_place),
                        'num_eval_places': int(num_eval_places), 'image_size': list(image_hw)}}
  train_layouts = [l for l in layouts if l in ('gsv_cities', 'gsv_xs')]
  if train_layouts:
    summary['train'] = make_training_places(
        root, seed=seed, num_train_places=num_train_places, images_per_place=images_per_place,
        image_size=image_hw, cities=cities, layouts=train_layouts,
        max_images_per_place=max_images_per_place, num_sparse_places=num_sparse_places,
        jpeg_quality=jpeg_quality, view_params=view_params)
  if 'benchmarks' in layouts:
    for split in benchmark_splits:
      summary['benchmarks'][split] = make_benchmark_split(
          root, split=split, seed=seed, num_places=num_eval_places,
          database_per_place=eval_database_per_place, queries_per_place=eval_queries_per_place,
          image_size=image_hw, jpeg_quality=jpeg_quality, view_params=view_params)
  with open(os.path.join(root, SUMMARY_FILE), 'w') as f:
    json.dump(summary, f, indent=1)
  return summary
