"""Decoding to PIL images and torchvision-exact resizing.

Every pipeline of vpr_jax decodes through `vpr_jax.data.imaging.decode` (libjpeg-turbo for JPEGs, Pillow
for the rest; its module doc has the rules: full decodes, mode conversions, errors); `load_rgb`
is that decoder with the result as a PIL image, for the steps that work on PIL images.

EXIF orientation is NOT applied by default: neither torchvision nor the PyTorch references apply
it, and benchmark descriptors must match theirs. `DecodeOptions(exif_transpose=True)` turns users'
phone and camera photos upright (localisation), and `fast_decode=True` lets libjpeg decode large
JPEGs at a reduced (DCT) scale that is still at least the model's input size.

`resize` reproduces `torchvision.transforms.Resize((H, W))` on PIL images bit for bit: torchvision
calls `img.resize((W, H), Image.BILINEAR)`, which in PIL is an antialiased (support-scaled)
bilinear filter, and returns the image untouched when it already has the target size.
`resized_size` is torchvision's `Resize(int)` size rule (shorter side, aspect ratio kept), and
`encode_jpeg` the JPEG encoding of prepared data (`vpr_jax.data.tfds`).
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Sequence

import numpy as np
from PIL import Image

from vpr_jax.data.imaging import bicubic_weights
from vpr_jax.data.imaging import decode

# JPEG quality of prepared (resized, re-encoded) images.
DEFAULT_QUALITY = 95
# Chroma subsampling names -> PIL's `subsampling` values.
SUBSAMPLING = {'4:4:4': 0, '4:2:2': 1, '4:2:0': 2}

# Evaluation resize kinds (config data.eval_interpolation).
EVAL_INTERPOLATIONS = ('bilinear', 'bicubic')
# EXIF orientation tag and PIL's transposition for each value (as `ImageOps.exif_transpose`).
_EXIF_ORIENTATION_TAG = 0x0112
_ORIENTATION_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}
# Orientations whose upright image is the stored one turned by 90 degrees.
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """How image files are decoded before the resize.

  Attributes:
    interpolation: the resize to the model's input size: 'bilinear' (torchvision's Resize on PIL
      images, the family's) or 'bicubic' (torch's antialiased bicubic on tensors, BoQ's; see
      `resize_bicubic_array`).
    exif_transpose: turn the pixels as the EXIF orientation tag says (the photo as a viewer shows
      it). False (benchmark evaluation) keeps the stored pixel order, as the references do.
    fast_decode: let libjpeg decode JPEGs at 1/2, 1/4 or 1/8 scale (DCT scaling) when the result
      is still at least the target size: much faster for 12-48 MP photos, but no longer
      bit-identical to the full decode followed by the resize.
  """
  exif_transpose: bool = False
  fast_decode: bool = False
  interpolation: str = 'bilinear'

  def __post_init__(self):
    if self.interpolation not in EVAL_INTERPOLATIONS:
      raise ValueError(f'Unknown interpolation {self.interpolation!r}; valid choices: '
                       f'{", ".join(EVAL_INTERPOLATIONS)}.')


def exif_orientation(data: bytes) -> int:
  """The EXIF orientation (1..8) of an encoded image; 1 when it has none or it is unreadable."""
  try:
    with Image.open(io.BytesIO(data)) as img:
      value = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
  except Exception:  # pylint: disable=broad-except  (decoding errors are reported by the decoder)
    return 1
  return value if value in _ORIENTATION_TRANSPOSES or value == 1 else 1


def load_rgb(path: str | os.PathLike, draft_size: tuple[int, int] | None = None,
             exif_transpose: bool = False) -> Image.Image:
  """Reads an image file completely and returns it as an 8-bit RGB PIL image.

  Args:
    path: the image file.
    draft_size: optional (H, W). For JPEG files, lets libjpeg decode at a reduced scale (1/2,
      1/4, 1/8) that is still at least this size, which is faster but no longer bit-identical to
      a full decode followed by `resize`. None (the default) decodes at full size. With
      `exif_transpose`, the size is that of the upright image.
    exif_transpose: apply the EXIF orientation tag (the upright photo); False keeps the stored
      pixel order.

  Returns:
    The decoded image, mode 'RGB' (see the module doc for the conversions).

  Raises:
    ImageDecodeError: missing, empty, truncated, corrupt or not an image.
    RuntimeError: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process.
  """
  return Image.fromarray(read_upright(path, draft_size, exif_transpose))


def read_upright(path: str | os.PathLike, min_size: Sequence[int] | None = None,
                 exif_transpose: bool = False) -> np.ndarray:
  """`decode.read_rgb`, optionally turned upright by the file's EXIF orientation.

  Args:
    path: the image file.
    min_size: (H, W) of the upright image that a reduced-scale (DCT) JPEG decode must still
      reach; None decodes at full size.
    exif_transpose: apply the EXIF orientation tag.

  Returns:
    uint8 [H, W, 3].

  Raises:
    ImageDecodeError: missing, empty, truncated, corrupt or not an image.
  """
  if not exif_transpose:
    return decode.read_rgb(path, min_size=min_size)
  decode.check_truncation_policy()
  path = os.fspath(path)
  data = decode.read_file(path)
  orientation = exif_orientation(data)
  if min_size is not None and orientation in _SWAPPING_ORIENTATIONS:
    # The stored image is the upright one turned by 90 degrees.
    min_size = (int(min_size[1]), int(min_size[0]))
  pixels = decode.decode_rgb(data, path, min_size)
  if orientation != 1:
    pixels = np.ascontiguousarray(
        Image.fromarray(pixels).transpose(_ORIENTATION_TRANSPOSES[orientation]))
  return pixels


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


def load_resized_array(path: str | os.PathLike, size: Sequence[int],
                       options: DecodeOptions | None = None) -> np.ndarray:
  """`load_rgb` + `resize` + `to_uint8_array`: the evaluation transform before normalisation.

  Args:
    path: the image file.
    size: (height, width).
    options: how to decode; default `DecodeOptions()` (exact, EXIF ignored).

  Returns:
    uint8 [H, W, 3].

  Raises:
    ImageDecodeError: the file cannot be decoded.
  """
  options = options or DecodeOptions()
  pixels = read_upright(path, _check_size(size) if options.fast_decode else None,
                        options.exif_transpose)
  if options.interpolation == 'bicubic':
    return resize_bicubic_array(pixels, size)
  return resize_array(pixels, size)


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
  rows = bicubic_weights.bicubic_matrix(pixels.shape[0], height, antialias=True)
  cols = bicubic_weights.bicubic_matrix(pixels.shape[1], width, antialias=True)
  out = np.einsum('hi,ijc,wj->hwc', rows, pixels.astype(np.float32), cols, optimize=True)
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resized_array_from_pixels(pixels: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """The evaluation transform of an image already in memory (as `load_resized_array` of a file).

  Args:
    pixels: uint8 [H, W, 3] (RGB) or [H, W] (grey) array.
    size: (height, width).

  Returns:
    uint8 [height, width, 3].

  Raises:
    ValueError: `pixels` is not a uint8 image array.
  """
  pixels = np.asarray(pixels)
  if pixels.dtype != np.uint8 or not (
      pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] == 3)) or 0 in pixels.shape:
    raise ValueError(f'expected a uint8 image array [H, W, 3] or [H, W], got {pixels.dtype} '
                     f'{pixels.shape}')
  if pixels.ndim == 2:
    pixels = np.repeat(pixels[:, :, None], 3, axis=2)
  return resize_array(np.ascontiguousarray(pixels), size)


def resize_array(pixels: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """`resize` on uint8 [h, w, 3] pixels: the array itself when it already has the size.

  Args:
    pixels: uint8 [h, w, 3].
    size: (height, width).

  Returns:
    uint8 [height, width, 3], torchvision-exact (PIL's antialiased bilinear).
  """
  height, width = _check_size(size)
  if pixels.shape[:2] == (height, width):
    return pixels
  return to_uint8_array(resize(Image.fromarray(pixels), (height, width)))


def resized_size(width: int, height: int, image_size: Sequence[int] | None,
                 short_side: int | None) -> tuple[int, int]:
  """(width, height) an image of (width, height) is stored at when prepared.

  Args:
    width: source width.
    height: source height.
    image_size: (H, W) to resize to exactly, or None.
    short_side: length of the shorter side (aspect ratio kept, torchvision's `Resize(int)`
      rule: the long side is int(short_side * long / short)), or None.

  Returns:
    The stored (width, height): the source size when both image_size and short_side are None.
  """
  if image_size is not None:
    return int(image_size[1]), int(image_size[0])
  if short_side is None:
    return width, height
  if width <= height:
    return int(short_side), int(short_side * height / width)
  return int(short_side * width / height), int(short_side)


def encode_jpeg(img: Image.Image, quality: int, subsampling: str) -> bytes:
  """JPEG bytes of an RGB PIL image (baseline, no metadata).

  Args:
    img: the image.
    quality: JPEG quality, 1..100.
    subsampling: chroma subsampling, a key of SUBSAMPLING ('4:2:0' is PIL's default).

  Returns:
    The encoded bytes.
  """
  buffer = io.BytesIO()
  img.save(buffer, format='JPEG', quality=int(quality), subsampling=SUBSAMPLING[subsampling])
  return buffer.getvalue()
