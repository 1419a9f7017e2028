"""Query sheets: a query image and its top-k predictions side by side (PNG, PIL only).

Each prediction gets a green border when it is a positive (within the positive radius of the
query), red otherwise; its rank and UTM distance to the query in metres are written under it. The
query has a blue border; the sheet's title is the query file name.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from vpr_jax import fileio

# Border colours (RGB).
QUERY_COLOR = (40, 90, 220)
POSITIVE_COLOR = (0, 170, 60)
NEGATIVE_COLOR = (220, 30, 30)
# Localisation matches: no ground truth, so one neutral colour.
MATCH_COLOR = (120, 120, 120)
BACKGROUND = (255, 255, 255)
TILE_BACKGROUND = (235, 235, 235)
TEXT_COLOR = (0, 0, 0)

# Layout in pixels.
MARGIN = 10
BORDER = 6
GAP = 10
TITLE_HEIGHT = 28
CAPTION_HEIGHT = 24
DEFAULT_TILE_SIZE = (180, 240)  # (height, width)


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow without scalable default font.
    return ImageFont.load_default()


def tile_box(column: int, tile_size: tuple[int, int] = DEFAULT_TILE_SIZE
             ) -> tuple[int, int, int, int]:
  """Outer box (left, top, right, bottom; right/bottom exclusive) of a bordered tile.

  Column 0 is the query, column r the prediction of rank r.

  Args:
    column: tile position from the left.
    tile_size: (height, width) of the image inside the border.

  Returns:
    The box including the border.
  """
  height, width = tile_size
  left = MARGIN + column * (width + 2 * BORDER + GAP)
  top = MARGIN + TITLE_HEIGHT
  return left, top, left + width + 2 * BORDER, top + height + 2 * BORDER


def _load_tile(source: str | Image.Image, tile_size: tuple[int, int],
               exif_transpose: bool = False) -> Image.Image:
  height, width = tile_size
  tile = Image.new('RGB', (width, height), TILE_BACKGROUND)
  try:
    if isinstance(source, Image.Image):
      image = source
    else:
      with Image.open(source) as opened:
        image = ImageOps.exif_transpose(opened) if exif_transpose else opened.copy()
    image = ImageOps.contain(image.convert('RGB'), (width, height), Image.Resampling.BILINEAR)
  except (OSError, ValueError):
    ImageDraw.Draw(tile).text((8, height // 2 - 8), 'unreadable image', fill=NEGATIVE_COLOR,
                              font=_font(14))
    return tile
  tile.paste(image, ((width - image.width) // 2, (height - image.height) // 2))
  return tile


def render_sheet(query_path: str, prediction_paths: Sequence[str], distances_m: Sequence[float],
                 correct: Sequence[bool], title: str,
                 tile_size: tuple[int, int] = DEFAULT_TILE_SIZE) -> Image.Image:
  """One query sheet.

  Args:
    query_path: query image file.
    prediction_paths: image files of the predictions, best first.
    distances_m: UTM distance of each prediction to the query, in metres.
    correct: whether each prediction is a positive.
    title: text above the images.
    tile_size: (height, width) of each image.

  Returns:
    The RGB sheet.
  """
  captions = ['query'] + [f'#{r + 1}  {d:.1f} m' if np.isfinite(d) else f'#{r + 1}'
                          for r, d in enumerate(distances_m)]
  colors = [QUERY_COLOR] + [POSITIVE_COLOR if c else NEGATIVE_COLOR for c in correct]
  return render_tiles([query_path] + list(prediction_paths), captions, colors, title, tile_size)


def render_tiles(sources: Sequence[str | Image.Image], captions: Sequence[str],
                 colors: Sequence[tuple[int, int, int]], title: str,
                 tile_size: tuple[int, int] = DEFAULT_TILE_SIZE,
                 exif_transpose: Sequence[bool] | None = None) -> Image.Image:
  """A row of bordered images with captions (one or more lines, '\\n'-separated) under a title.

  Args:
    sources: image files or PIL images, left to right.
    captions: text under each image.
    colors: border colour of each image.
    title: text above the images.
    tile_size: (height, width) of each image.
    exif_transpose: per source file, whether to show it upright by its EXIF orientation.

  Returns:
    The RGB sheet.
  """
  exif_transpose = list(exif_transpose) if exif_transpose is not None else [False] * len(sources)
  caption_lines = max([c.count('\n') + 1 for c in captions] or [1])
  right = tile_box(len(sources) - 1, tile_size)[2]
  bottom = tile_box(0, tile_size)[3]
  sheet = Image.new('RGB', (right + MARGIN, bottom + CAPTION_HEIGHT * caption_lines + MARGIN),
                    BACKGROUND)
  draw = ImageDraw.Draw(sheet)
  draw.text((MARGIN, MARGIN), title, fill=TEXT_COLOR, font=_font(16))
  caption_font = _font(14)
  for column, (source, color, caption, upright) in enumerate(
      zip(sources, colors, captions, exif_transpose)):
    left, top, box_right, box_bottom = tile_box(column, tile_size)
    draw.rectangle((left, top, box_right - 1, box_bottom - 1), fill=color)
    sheet.paste(_load_tile(source, tile_size, upright), (left + BORDER, top + BORDER))
    for line, text in enumerate(caption.split('\n')):
      draw.text((left + BORDER, box_bottom + 4 + line * (CAPTION_HEIGHT - 4)), text,
                fill=TEXT_COLOR, font=caption_font)
  return sheet


def select_queries(correct: np.ndarray, num: int, only_failures: bool = False) -> np.ndarray:
  """Indices of the queries to draw: the first `num`, or the first `num` whose top-1 is wrong."""
  candidates = np.arange(correct.shape[0])
  if only_failures:
    candidates = candidates[~np.asarray(correct, bool)[:, 0]]
  return candidates[:max(int(num), 0)]


def sheet_folder(base: str, dataset: str) -> str:
  """The folder of a dataset's sheets: `base/<dataset name as one file-name component>`."""
  return os.path.join(base, fileio.safe_file_name(dataset))


def visualize_predictions(result, out_dir: str, num_queries: int, top_k: int = 5,
                          only_failures: bool = False,
                          tile_size: tuple[int, int] = DEFAULT_TILE_SIZE) -> list[str]:
  """Writes one PNG per query with its top-k predictions.

  Args:
    result: an `evaluation.benchmark_eval.EvalResult` (with its benchmark).
    out_dir: output folder (created).
    num_queries: number of sheets.
    top_k: predictions per sheet (at most those searched).
    only_failures: draw only queries whose top-1 prediction is not a positive.
    tile_size: (height, width) of each image.

  Returns:
    The written file paths, in query order.
  """
  benchmark = result.benchmark
  k = min(int(top_k), result.predictions.shape[1])
  database_utm = np.asarray(benchmark.database_utm, np.float64)
  queries_utm = np.asarray(benchmark.queries_utm, np.float64)
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for q in select_queries(result.correct, num_queries, only_failures):
    predictions = result.predictions[q, :k]
    metres = np.linalg.norm(database_utm[predictions] - queries_utm[q], axis=-1)
    query_name = os.path.basename(benchmark.queries_paths[q])
    sheet = render_sheet(
        os.path.join(benchmark.root, benchmark.queries_paths[q]),
        [os.path.join(benchmark.root, benchmark.database_paths[d]) for d in predictions],
        metres, result.correct[q, :k], f'{result.dataset}  query {q}: {query_name}', tile_size)
    stem = fileio.safe_file_name(os.path.splitext(query_name)[0])[:80]
    path = os.path.join(out_dir, f'{q:06d}_{stem}.png')
    sheet.save(path)
    written.append(path)
  return written
