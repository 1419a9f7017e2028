"""Robust image decoding and torchvision-exact resizing on PIL images.

Every pipeline of vpr_jax reads images through `load_rgb`, so the rules below hold everywhere:

* The whole file is decoded (`Image.load()` is forced), so a truncated or corrupt file fails at
  read time, inside the worker that reads it, with the file named in the error. PIL's global
  `ImageFile.LOAD_TRUNCATED_IMAGES` must be False: with it set, PIL fills the missing part of a
  truncated JPEG with grey and reports success, so `load_rgb` refuses to run.
* Every mode becomes 8-bit RGB:
  - 'RGB' is kept; 'L', '1', 'P' (without transparency), 'CMYK', 'YCbCr', 'LAB', 'HSV' go through
    PIL's own `convert('RGB')` (what `Image.open(path).convert('RGB')` gives in the PyTorch
    references);
  - modes with transparency ('RGBA', 'LA', 'PA', 'RGBa', 'La', and 'P' with a transparency
    entry) are composited on black: out = colour * alpha / 255 (PIL's `paste` with the alpha as
    mask). Plain `convert('RGB')` would instead drop alpha and expose whatever colour the fully
    transparent pixels carry, which is often garbage;
  - 16-bit greyscale ('I;16', 'I;16B', 'I;16L', 'I;16N') and 32-bit integer 'I' (how PIL opens
    16-bit PNGs) are read as 16-bit intensities and scaled to 8 bits (value / 257, rounded);
    PIL's `convert` would clip them at 255 instead;
  - 'F' (float) is clipped to [0, 255] as PIL's `convert` does.
* EXIF orientation is NOT applied: neither torchvision nor the PyTorch references apply it, and
  descriptors must match theirs.
* Multi-frame files (GIF, TIFF) give their first frame.

`resize` reproduces `torchvision.transforms.Resize((H, W))` on PIL images bit for bit: torchvision
calls `img.resize((W, H), Image.BILINEAR)`, which in PIL is an antialiased (support-scaled)
bilinear filter, and returns the image untouched when it already has the target size.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image
from PIL import ImageFile

from vpr_jax.errors import ImageDecodeError
from vpr_jax.models import torch_resize

# Modes whose conversion to RGB goes through PIL's `convert('RGB')` as is.
_PLAIN_CONVERT_MODES = frozenset({'1', 'L', 'P', 'CMYK', 'YCbCr', 'LAB', 'HSV', 'RGBX'})
# Modes carrying an alpha channel (premultiplied ones included).
_ALPHA_MODES = frozenset({'RGBA', 'LA', 'PA', 'RGBa', 'La'})
_SIXTEEN_BIT_MODES = frozenset({'I;16', 'I;16B', 'I;16L', 'I;16N', 'I'})


def _check_truncation_policy():
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


def load_rgb(path: str | os.PathLike, draft_size: tuple[int, int] | None = None) -> Image.Image:
  """Reads an image file completely and returns it as an 8-bit RGB PIL image.

  Args:
    path: the image file.
    draft_size: optional (H, W). For JPEG files, lets libjpeg decode at a reduced scale (1/2,
      1/4, 1/8) that is still at least this size, which is faster but no longer bit-identical to
      a full decode followed by `resize`. None (the default) decodes at full size.

  Returns:
    The decoded image, mode 'RGB' (see the module doc for the conversions).

  Raises:
    ImageDecodeError: missing, empty, truncated, corrupt or not an image.
    RuntimeError: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process.
  """
  _check_truncation_policy()
  path = os.fspath(path)
  try:
    size = os.path.getsize(path)
  except OSError as e:
    raise ImageDecodeError(path, f'cannot read file ({e.strerror or e})') from None
  if size == 0:
    raise ImageDecodeError(path, 'empty file (0 bytes)')
  try:
    # Leaving the block closes the file only; the decoded pixels stay in memory.
    with Image.open(path) as img:
      if draft_size is not None and img.format == 'JPEG':
        img.draft('RGB', (int(draft_size[1]), int(draft_size[0])))
      img.load()
      rgb = ensure_rgb(img)
  except Image.UnidentifiedImageError:
    raise ImageDecodeError(path, 'not a recognised image format') from None
  except MemoryError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # Decoders raise OSError, SyntaxError, ValueError, EOFError, struct.error... on bad data.
    raise ImageDecodeError(path, f'{type(e).__name__}: {e}') from None
  return rgb


def _check_size(size: Sequence[int]) -> tuple[int, int]:
  if len(size) != 2 or any(int(s) != s or int(s) <= 0 for s in size):
    raise ValueError(f'image size must be (height, width) of positive integers, got {size!r}')
  return int(size[0]), int(size[1])


def resize(img: Image.Image, size: Sequence[int]) -> Image.Image:
  """Resizes like `torchvision.transforms.Resize((H, W))` on a PIL image (bilinear, antialiased).

  Args:
    img: a PIL image.
    size: (height, width) in pixels.

  Returns:
    The resized image; `img` itself when it already has that size (as torchvision does).
  """
  height, width = _check_size(size)
  if img.size == (width, height):
    return img
  return img.resize((width, height), Image.BILINEAR)


def to_uint8_array(img: Image.Image) -> np.ndarray:
  """Returns the pixels of an RGB PIL image as a writable uint8 array [H, W, 3]."""
  if img.mode != 'RGB':
    raise ValueError(f'expected an RGB image, got mode {img.mode!r}')
  array = np.array(img, dtype=np.uint8)
  if array.ndim != 3 or array.shape[-1] != 3:
    raise ValueError(f'expected pixels of shape [H, W, 3], got {array.shape}')
  return array


def resize_bicubic_array(pixels: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """torch's antialiased bicubic resize of an image tensor, quantised back to uint8.

  BoQ evaluates with `ToTensor()` then `Resize(size, BICUBIC, antialias=True)` on the float
  tensor (torch's `_upsample_bicubic2d_aa`); the same per-axis weights are applied here to the
  uint8 pixels, and the result is rounded to uint8 (at most 0.5 / 255 from BoQ's float image).

  Args:
    pixels: uint8 [H0, W0, 3].
    size: (height, width).

  Returns:
    uint8 [H, W, 3]; `pixels` itself when it already has that size.
  """
  height, width = _check_size(size)
  if pixels.shape[:2] == (height, width):
    return pixels
  rows = torch_resize.bicubic_matrix(pixels.shape[0], height, antialias=True)
  cols = torch_resize.bicubic_matrix(pixels.shape[1], width, antialias=True)
  out = np.einsum('hi,ijc,wj->hwc', rows, pixels.astype(np.float32), cols, optimize=True)
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# Evaluation resize kinds (config data.eval_interpolation).
EVAL_INTERPOLATIONS = ('bilinear', 'bicubic')


def load_resized_array(path: str | os.PathLike, size: Sequence[int],
                       interpolation: str = 'bilinear') -> np.ndarray:
  """`load_rgb` + `resize` + `to_uint8_array`: the evaluation transform before normalisation.

  Args:
    path: the image file.
    size: (height, width).
    interpolation: 'bilinear' (torchvision's Resize on PIL images, the family's) or 'bicubic'
      (torch's antialiased bicubic on tensors, BoQ's; see `resize_bicubic_array`).

  Returns:
    uint8 [H, W, 3].

  Raises:
    ImageDecodeError: the file cannot be decoded.
  """
  if interpolation == 'bicubic':
    return resize_bicubic_array(to_uint8_array(load_rgb(path)), size)
  if interpolation != 'bilinear':
    raise ValueError(f'Unknown interpolation {interpolation!r}; valid choices: '
                     f'{", ".join(EVAL_INTERPOLATIONS)}.')
  return to_uint8_array(resize(load_rgb(path), size))
