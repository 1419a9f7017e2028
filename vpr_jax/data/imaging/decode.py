"""The one image decoder of vpr_jax: encoded bytes or a file -> 8-bit RGB pixels.

Training (original files and prepared records), preparation and evaluation all decode through
`decode_rgb` / `read_rgb` (`decode_stored` for the records of prepared data), so the rules below
hold everywhere.

Decoders. JPEGs in YCbCr, greyscale or RGB colour space are decoded by libjpeg-turbo through
simplejpeg, straight into a numpy array (no PIL image in between). Everything else goes through
Pillow, with the mode conversions of `ensure_rgb`: other formats (PNG, GIF, TIFF, BMP, WebP...),
CMYK/YCCK JPEGs (Pillow's inverted-Adobe handling), 12-bit JPEGs, and any JPEG libjpeg-turbo
reports a problem with (simplejpeg runs in strict mode, so truncated or corrupt data raises
instead of returning grey) - Pillow then either decodes it as it always did or raises, and the
error message is Pillow's. `decoder='pil'` sends every file through Pillow.

Same pixels. Pillow decodes JPEGs with the same library (libjpeg-turbo) and settings: the
accurate integer IDCT (JDCT_ISLOW; simplejpeg `fastdct=False`) and "fancy" (triangular) chroma
upsampling (simplejpeg `fastupsample=False`), colour conversion by libjpeg itself (greyscale is
replicated into R, G and B, as Pillow's `convert('RGB')` does). A full decode therefore gives
exactly Pillow's `Image.open(f).convert('RGB')` pixels; tests/test_decode.py checks it on the real
photos and on re-encodings at several qualities, chroma subsamplings, progressive and greyscale.

DCT-scaled decodes (`min_size`). libjpeg can skip high-frequency DCT coefficients and produce the
image at 1/2, 1/4 or 1/8 of its size directly, several times faster than a full decode. With
`min_size=(H, W)` a JPEG is decoded at the smallest of those scales (powers of two only: they have
SIMD IDCTs) whose result is still at least H x W; the caller then resizes exactly. The pixels are
close to, but not the same as, a full decode followed by the same resize (bounded in the tests);
evaluation never uses it. Non-JPEG files are decoded at full size.

Errors. Every failure is an `ImageDecodeError` naming the file (or record) and the reason:
missing, unreadable, empty, truncated, corrupt, or not an image. Pillow's global
`ImageFile.LOAD_TRUNCATED_IMAGES` must be False: with it set, Pillow fills the missing part of a
truncated JPEG with grey and reports success, so decoding refuses to run.

Mode conversions (`ensure_rgb`, for what Pillow decodes):
  - 'RGB' is kept; 'L', '1', 'P' (without transparency), 'CMYK', 'YCbCr', 'LAB', 'HSV' go through
    Pillow's own `convert('RGB')` (what `Image.open(path).convert('RGB')` gives in the PyTorch
    references);
  - modes with transparency ('RGBA', 'LA', 'PA', 'RGBa', 'La', and 'P' with a transparency
    entry) are composited on black: out = colour * alpha / 255 (Pillow's `paste` with the alpha
    as mask). Plain `convert('RGB')` would instead drop alpha and expose whatever colour the
    fully transparent pixels carry, which is often garbage;
  - 16-bit greyscale ('I;16', 'I;16B', 'I;16L', 'I;16N') and 32-bit integer 'I' (how Pillow opens
    16-bit PNGs) are read as 16-bit intensities and scaled to 8 bits (value / 257, rounded);
    Pillow's `convert` would clip them at 255 instead;
  - 'F' (float) is clipped to [0, 255] as Pillow's `convert` does.
EXIF orientation is NOT applied (neither torchvision nor the PyTorch references apply it, and
descriptors must match theirs). Multi-frame files (GIF, TIFF) give their first frame.

Nothing here imports JAX (it runs in data worker processes).
"""

from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np
from PIL import Image
from PIL import ImageFile
import simplejpeg

from vpr_jax.errors import ImageDecodeError

DECODERS = ('turbo', 'pil')
# Colour spaces libjpeg-turbo converts to RGB exactly as Pillow does.
_TURBO_COLOR_SPACES = frozenset({'YCbCr', 'Gray', 'RGB'})
_JPEG_MAGIC = b'\xff\xd8\xff'
# DCT scales tried by `min_size` decodes, largest reduction first.
_DCT_FACTORS = (8, 4, 2)

# Modes whose conversion to RGB goes through PIL's `convert('RGB')` as is.
_PLAIN_CONVERT_MODES = frozenset({'1', 'L', 'P', 'CMYK', 'YCbCr', 'LAB', 'HSV', 'RGBX'})
# Modes carrying an alpha channel (premultiplied ones included).
_ALPHA_MODES = frozenset({'RGBA', 'LA', 'PA', 'RGBa', 'La'})
_SIXTEEN_BIT_MODES = frozenset({'I;16', 'I;16B', 'I;16L', 'I;16N', 'I'})


def check_truncation_policy():
  """Raises RuntimeError when PIL would silently accept truncated images in this process."""
  if ImageFile.LOAD_TRUNCATED_IMAGES:
    raise RuntimeError(
        'PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process: PIL would silently accept '
        'truncated images (filling them with grey). Something in this process set it; vpr_jax '
        'requires it to be False.')


def _alpha_on_black(img: Image.Image) -> Image.Image:
  rgba = img.convert('RGBA')
  out = Image.new('RGB', rgba.size, (0, 0, 0))
  out.paste(rgba.convert('RGB'), mask=rgba.getchannel('A'))
  return out


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
  values = np.asarray(img).astype(np.float64)
  values = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
  return Image.fromarray(np.stack([values] * 3, axis=-1), mode='RGB')


def ensure_rgb(img: Image.Image) -> Image.Image:
  """Converts a decoded PIL image of any supported mode to 8-bit RGB (rules in the module doc).

  Args:
    img: a loaded PIL image.

  Returns:
    An 'RGB' PIL image (the same object when it already is one).

  Raises:
    ValueError: the mode has no defined conversion.
  """
  mode = img.mode
  if mode == 'RGB':
    return img
  if mode == 'P' and 'transparency' in img.info:
    return _alpha_on_black(img)
  if mode in _ALPHA_MODES:
    return _alpha_on_black(img)
  if mode in _PLAIN_CONVERT_MODES:
    return img.convert('RGB')
  if mode in _SIXTEEN_BIT_MODES:
    return _high_bit_depth_to_rgb(img)
  if mode == 'F':
    return img.convert('RGB')
  raise ValueError(f'unsupported image mode {mode!r}')


def _check_decoder(decoder: str):
  if decoder not in DECODERS:
    raise ValueError(f'decoder must be one of {DECODERS}, got {decoder!r}')


def decode_pil(data: bytes, name: str, min_size: Sequence[int] | None = None) -> Image.Image:
  """Decodes encoded bytes completely with Pillow into an 8-bit RGB PIL image.

  Args:
    data: the encoded image.
    name: what to call the image in errors (its file).
    min_size: optional (H, W): a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (Pillow's `draft`)
      as long as it stays at least this size.

  Returns:
    The decoded image, mode 'RGB' (`ensure_rgb` rules).

  Raises:
    ImageDecodeError: empty, truncated, corrupt or not an image.
  """
  check_truncation_policy()
  if not data:
    raise ImageDecodeError(name, 'empty file (0 bytes)')
  try:
    with Image.open(io.BytesIO(data)) as img:
      if min_size is not None and img.format == 'JPEG':
        img.draft('RGB', (int(min_size[1]), int(min_size[0])))
      img.load()
      return ensure_rgb(img)
  except Image.UnidentifiedImageError:
    raise ImageDecodeError(name, 'not a recognised image format') from None
  except MemoryError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # Decoders raise OSError, SyntaxError, ValueError, EOFError, struct.error... on bad data.
    raise ImageDecodeError(name, f'{type(e).__name__}: {e}') from None


def _dct_factor(height: int, width: int, min_size: Sequence[int] | None) -> int:
  """Largest power-of-two reduction that keeps a (height, width) image >= min_size (1: none)."""
  if min_size is None:
    return 1
  min_height, min_width = int(min_size[0]), int(min_size[1])
  for factor in _DCT_FACTORS:
    # libjpeg's scaled output size is ceil(dim / factor).
    if -(-height // factor) >= min_height and -(-width // factor) >= min_width:
      return factor
  return 1


def _decode_turbo(data: bytes, min_size: Sequence[int] | None,
                  out: np.ndarray | None) -> np.ndarray | None:
  """libjpeg-turbo decode of a JPEG it handles like Pillow; None sends the bytes to Pillow."""
  if not data.startswith(_JPEG_MAGIC):
    return None
  try:
    height, width, color_space, _ = simplejpeg.decode_jpeg_header(data)
    if color_space not in _TURBO_COLOR_SPACES:
      return None
    factor = _dct_factor(height, width, min_size)
    height, width = -(-height // factor), -(-width // factor)
    buffer = out if out is not None and out.shape == (height, width, 3) else None
    if factor == 1:
      return simplejpeg.decode_jpeg(data, 'RGB', fastdct=False, fastupsample=False, strict=True,
                                    buffer=buffer)
    # Asking for exactly the size at `factor` keeps libjpeg from picking an M/8 scale in between.
    return simplejpeg.decode_jpeg(data, 'RGB', fastdct=False, fastupsample=False, strict=True,
                                  min_height=height, min_width=width, min_factor=factor,
                                  buffer=buffer)
  except ValueError:
    # Truncated, corrupt, 12-bit...: Pillow decodes it as before or names the problem.
    return None


def decode_rgb(data: bytes, name: str, min_size: Sequence[int] | None = None,
               decoder: str = 'turbo', out: np.ndarray | None = None) -> np.ndarray:
  """Decodes encoded image bytes completely into 8-bit RGB pixels.

  Args:
    data: the encoded image (bytes, or any object supporting the buffer protocol).
    name: what to call the image in errors (its file, or record).
    min_size: optional (H, W): JPEGs may be decoded at a DCT-reduced scale that is still at least
      this size (faster; not bit-identical to a full decode). None decodes at full size.
    decoder: 'turbo' (libjpeg-turbo for JPEGs, Pillow for the rest) or 'pil' (Pillow only; the
      same pixels, slower).
    out: optional C-contiguous uint8 array: when the decoded image has exactly its shape, the
      pixels are written into it (e.g. a slot of a batch) and it is returned.

  Returns:
    uint8 [H, W, 3], C-contiguous and writable: `out`, or a new array when `out` is None or of
    another shape.

  Raises:
    ImageDecodeError: empty, truncated, corrupt or not an image.
    RuntimeError: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process.
  """
  _check_decoder(decoder)
  data = bytes(data) if not isinstance(data, bytes) else data
  if out is not None and (out.dtype != np.uint8 or not out.flags.c_contiguous
                          or not out.flags.writeable):
    raise ValueError('out must be a writable C-contiguous uint8 array')
  if decoder == 'turbo' and data:
    pixels = _decode_turbo(data, min_size, out)
    if pixels is not None:
      return pixels
  pixels = np.asarray(decode_pil(data, name, min_size), dtype=np.uint8)
  if out is not None and out.shape == pixels.shape:
    out[...] = pixels
    return out
  return np.array(pixels)


def read_file(path: str | os.PathLike) -> bytes:
  """The bytes of an image file.

  Raises:
    ImageDecodeError: the file is missing, unreadable or empty.
  """
  path = os.fspath(path)
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise ImageDecodeError(path, f'cannot read file ({e.strerror or e})') from None
  if not data:
    raise ImageDecodeError(path, 'empty file (0 bytes)')
  return data


def read_rgb(path: str | os.PathLike, min_size: Sequence[int] | None = None,
             decoder: str = 'turbo', out: np.ndarray | None = None) -> np.ndarray:
  """Reads an image file completely: `decode_rgb` of its bytes, errors naming the file.

  Args:
    path: the image file.
    min_size: see `decode_rgb`.
    decoder: see `decode_rgb`.
    out: see `decode_rgb`.

  Returns:
    uint8 [H, W, 3] (`out` when it has the decoded shape).

  Raises:
    ImageDecodeError: missing, unreadable, empty, truncated, corrupt or not an image.
    RuntimeError: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process.
  """
  _check_decoder(decoder)
  check_truncation_policy()
  path = os.fspath(path)
  return decode_rgb(read_file(path), path, min_size, decoder, out)


def decode_stored(data: bytes, name: str, min_size: Sequence[int] | None = None,
                  decoder: str = 'turbo', out: np.ndarray | None = None) -> np.ndarray:
  """`decode_rgb` of an image stored in prepared data, where empty bytes mark a bad source.

  Prepared data (`vpr_jax.data.tfds`) stores a source image that could not be decoded
  as empty bytes, so that reading it fails like reading the source would.

  Args:
    data: the stored bytes.
    name: what to call the image in errors (its source file and record).
    min_size: see `decode_rgb`.
    decoder: see `decode_rgb`.
    out: see `decode_rgb`.

  Returns:
    uint8 [H, W, 3] (`out` when it has the decoded shape).

  Raises:
    ImageDecodeError: empty (bad source) or undecodable bytes.
  """
  if not data:
    raise ImageDecodeError(
        name, 'the source image could not be decoded when the data was prepared (empty record)')
  return decode_rgb(data, name, min_size, decoder, out)
