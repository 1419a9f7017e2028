"""What `python -m vpr_jax.localize` prints and writes: JSON, text lines, PNG sheets."""

from __future__ import annotations

import json
import os
import re
from typing import Sequence

import numpy as np
from PIL import Image

from vpr_jax import fileio
from vpr_jax import visualize
from vpr_jax.localization import localizer


def results_json(results: Sequence[localizer.Localization]) -> str:
  """`{"queries": [{"image": ..., "matches": [{"image", "distance", "lat", "lon", ...}]}]}`."""
  return json.dumps({'queries': [r.to_dict() for r in results]}, indent=2) + '\n'


def format_result(result: localizer.Localization) -> str:
  """Printable lines for one photo: its path, then one line per match."""
  lines = [result.image]
  for m in result.matches:
    where = (f'lat {m.lat:.6f} lon {m.lon:.6f}' if m.lat is not None and m.lon is not None
             else 'no coordinates')
    if m.utm_east is not None:
      where += f' (UTM {m.utm_east:.1f} E {m.utm_north:.1f} N {m.utm_zone or ""})'.replace(' )',
                                                                                         ')')
    lines.append(f'  {m.rank}. {m.image}  distance {m.distance:.4f}  {where}')
  return '\n'.join(lines)


def write_sheet(result: localizer.Localization, photo: str | np.ndarray, out_dir: str,
                number: int, exif_transpose: bool = True,
                tile_size: tuple[int, int] = visualize.DEFAULT_TILE_SIZE) -> str:
  """Writes a PNG of the photo beside its matches, with their coordinates and distances.

  Args:
    result: the photo's `Localization`.
    photo: the photo (file or uint8 array).
    out_dir: folder of the sheets (created).
    number: position of the photo in its batch, the prefix of the file name.
    exif_transpose: show the photo upright by its EXIF orientation.
    tile_size: (height, width) of each image.

  Returns:
    The path of the PNG.
  """
  captions = ['query']
  for m in result.matches:
    where = (f'{m.lat:.5f}, {m.lon:.5f}' if m.lat is not None and m.lon is not None
             else 'no coordinates')
    captions.append(f'#{m.rank}  distance {m.distance:.3f}\n{where}')
  source = Image.fromarray(photo) if isinstance(photo, np.ndarray) else os.fspath(photo)
  sheet = visualize.render_tiles(
      [source] + [m.file for m in result.matches], captions,
      [visualize.QUERY_COLOR] + [visualize.MATCH_COLOR] * len(result.matches),
      result.image, tile_size,
      exif_transpose=[exif_transpose] * (1 + len(result.matches)))
  stem = os.path.splitext(os.path.basename(result.image))[0]
  stem = re.sub(r'[^A-Za-z0-9_.-]+', '_', stem).strip('_')[:80] or 'photo'
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f'{number:04d}_{stem}.png')
  with fileio.atomic_open(path, binary=True) as f:
    sheet.save(f, format='PNG')
  return path
