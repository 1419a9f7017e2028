"""The training transform on the CPU: resize + RandAugment with torchvision's semantics.

`RandAugment` follows `torchvision.transforms.RandAugment` applied to PIL images, as the seed
recipe uses it (`RandAugment(num_ops=3, interpolation=BILINEAR)`, magnitude 9 of 31 bins): each
of `num_ops` rounds picks one of 14 operations uniformly, flips the sign of a signed magnitude
with probability 1/2, and applies the operation with the PIL calls of torchvision's PIL backend
(affine warps with fill 0). Magnitudes are torchvision's float32 `linspace` tables; translations
are up to 150/331 of the image width/height. Only the random numbers differ: they come from a
numpy Generator, so an element's augmentation is a pure function of its seed.

Nothing here imports JAX (it runs in data worker processes).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps

from vpr_jax.data.augmentation import augment_ops
from vpr_jax.data.imaging import images
from vpr_jax.errors import ConfigError

AUGMENT_MODES = ('randaugment', 'device', 'none')


def resize_image(img: Image.Image, size: Sequence[int]) -> Image.Image:
  """torchvision `Resize((H, W))` on a PIL image (bilinear, antialiased); size is (H, W)."""
  return images.resize(img, size)


def _fill_color(img: Image.Image, fill: float | Sequence[float]):
  bands = len(img.getbands())
  if isinstance(fill, (int, float)):
    fill = [fill] * bands
  fill = tuple(int(v) for v in fill)
  return fill if bands > 1 else fill[0]


def _affine(img: Image.Image, center, angle, translate, shear, interpolation, fill):
  matrix = augment_ops.inverse_affine_matrix(center, angle, translate, 1.0, shear)
  return img.transform(img.size, Image.AFFINE, matrix, interpolation,
                       fillcolor=_fill_color(img, fill))


def apply_op(img: Image.Image, op_name: str, magnitude: float,
             interpolation: int = Image.BILINEAR, fill: float | Sequence[float] = 0
             ) -> Image.Image:
  """One RandAugment operation on a PIL image (torchvision's `_apply_op`, PIL backend).

  Args:
    img: an RGB (or L) PIL image.
    op_name: one of augment_ops.OPS.
    magnitude: the signed magnitude (from `augment_ops.augmentation_space`).
    interpolation: PIL resampling filter for the geometric ops.
    fill: value of pixels coming from outside the image.

  Returns:
    The transformed image.
  """
  width, height = img.size
  if op_name == 'Identity':
    return img
  if op_name in ('ShearX', 'ShearY'):
    # The shear angle is atan(magnitude), so the image is sheared by `magnitude` per pixel.
    angle = math.degrees(math.atan(magnitude))
    shear = [angle, 0.0] if op_name == 'ShearX' else [0.0, angle]
    return _affine(img, [0, 0], 0.0, [0, 0], shear, interpolation, fill)
  if op_name in ('TranslateX', 'TranslateY'):
    pixels = int(magnitude)
    translate = [pixels, 0] if op_name == 'TranslateX' else [0, pixels]
    return _affine(img, [width * 0.5, height * 0.5], 0.0, translate, [0.0, 0.0], interpolation,
                   fill)
  if op_name == 'Rotate':
    return img.rotate(magnitude, interpolation, False, None, fillcolor=_fill_color(img, fill))
  if op_name == 'Brightness':
    return ImageEnhance.Brightness(img).enhance(1.0 + magnitude)
  if op_name == 'Color':
    return ImageEnhance.Color(img).enhance(1.0 + magnitude)
  if op_name == 'Contrast':
    return ImageEnhance.Contrast(img).enhance(1.0 + magnitude)
  if op_name == 'Sharpness':
    return ImageEnhance.Sharpness(img).enhance(1.0 + magnitude)
  if op_name == 'Posterize':
    return ImageOps.posterize(img, int(magnitude))
  if op_name == 'Solarize':
    return ImageOps.solarize(img, magnitude)
  if op_name == 'AutoContrast':
    return ImageOps.autocontrast(img)
  if op_name == 'Equalize':
    return ImageOps.equalize(img)
  raise ValueError(f'Unknown RandAugment op {op_name!r}; expected one of {augment_ops.OPS}.')


class RandAugment:
  """torchvision's RandAugment on PIL images, driven by a numpy Generator (picklable).

  Attributes:
    num_ops: operations applied in sequence.
    magnitude: magnitude bin index (0 .. num_magnitude_bins - 1).
    num_magnitude_bins: number of bins.
    interpolation: PIL filter of the geometric ops (the seed uses bilinear).
    fill: fill value of the geometric ops.
  """

  def __init__(self, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31,
               interpolation: int = Image.BILINEAR, fill: float | Sequence[float] = 0):
    if num_ops < 0:
      raise ValueError(f'randaugment_num_ops must be >= 0, got {num_ops}.')
    if not 0 <= magnitude < num_magnitude_bins:
      raise ValueError(f'randaugment_magnitude must be in [0, {num_magnitude_bins - 1}] '
                       f'(randaugment_num_magnitude_bins={num_magnitude_bins}), got {magnitude}.')
    self.num_ops = int(num_ops)
    self.magnitude = int(magnitude)
    self.num_magnitude_bins = int(num_magnitude_bins)
    self.interpolation = interpolation
    self.fill = fill

  def sample_ops(self, rng: np.random.Generator, image_size: Sequence[int]
                 ) -> list[tuple[str, float]]:
    """Draws the (op name, signed magnitude) sequence for one image of size (H, W)."""
    space = augment_ops.augmentation_space(self.num_magnitude_bins, image_size)
    ops = []
    for _ in range(self.num_ops):
      op_name = augment_ops.OPS[int(rng.integers(augment_ops.NUM_OPS))]
      magnitudes, signed = space[op_name]
      magnitude = float(magnitudes[self.magnitude]) if magnitudes.ndim > 0 else 0.0
      if signed and rng.integers(2):
        magnitude = -magnitude
      ops.append((op_name, magnitude))
    return ops

  def apply_ops(self, img: Image.Image, ops: Sequence[tuple[str, float]]) -> Image.Image:
    """Applies a sequence from `sample_ops`."""
    for op_name, magnitude in ops:
      img = apply_op(img, op_name, magnitude, self.interpolation, self.fill)
    return img

  def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return self.apply_ops(img, self.sample_ops(rng, (img.height, img.width)))

  def __repr__(self) -> str:
    return (f'RandAugment(num_ops={self.num_ops}, magnitude={self.magnitude}, '
            f'num_magnitude_bins={self.num_magnitude_bins}, interpolation={self.interpolation}, '
            f'fill={self.fill})')


class TrainTransform:
  """Resize to (H, W) -> optional RandAugment -> uint8 [H, W, 3] (picklable).

  Takes a PIL image or decoded uint8 [h, w, 3] pixels.

  Normalisation is left to the model on the device, so batches travel as uint8.
  """

  def __init__(self, image_size: Sequence[int], randaugment: RandAugment | None):
    self.image_size = (int(image_size[0]), int(image_size[1]))
    self.randaugment = randaugment

  @property
  def augments(self) -> bool:
    """Whether the pixels change beyond the resize (False: decoded arrays pass through)."""
    return self.randaugment is not None

  def __call__(self, img: Image.Image | np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if isinstance(img, np.ndarray):
      if self.randaugment is None:
        # Decoded pixels at the training size pass through untouched (no PIL round trip).
        return images.resize_array(img, self.image_size)
      img = Image.fromarray(img)
    img = resize_image(img, self.image_size)
    if self.randaugment is not None:
      img = self.randaugment(img, rng)
    return images.to_uint8_array(img)


def make_train_transform(config) -> TrainTransform:
  """The train transform of a full config (image_size, data.augment, data.randaugment_*).

  Args:
    config: the run's ConfigDict.

  Returns:
    A TrainTransform; RandAugment is skipped when data.augment is 'none' or 'device' (the latter
    augments on the accelerator).
  """
  mode = config.data.augment
  if mode not in AUGMENT_MODES:
    raise ConfigError(f'data.augment must be one of {AUGMENT_MODES}, got {mode!r}.')
  randaugment = None
  if mode == 'randaugment':
    randaugment = RandAugment(num_ops=config.data.randaugment_num_ops,
                              magnitude=config.data.randaugment_magnitude,
                              num_magnitude_bins=config.data.randaugment_num_magnitude_bins)
  return TrainTransform(config.image_size, randaugment)


def check_config(data_config) -> None:
  """Checks data.augment and the RandAugment fields (ConfigError naming the field)."""
  if data_config.augment not in AUGMENT_MODES:
    raise ConfigError(f'Unknown data.augment {data_config.augment!r}; valid choices: '
                      f'{", ".join(AUGMENT_MODES)}.')
  bins = int(data_config.randaugment_num_magnitude_bins)
  if int(data_config.randaugment_num_ops) < 0:
    raise ConfigError('data.randaugment_num_ops must be >= 0, got '
                      f'{data_config.randaugment_num_ops}.')
  if not 0 <= int(data_config.randaugment_magnitude) < bins:
    raise ConfigError(f'data.randaugment_magnitude must be in [0, {bins - 1}] '
                      f'(data.randaugment_num_magnitude_bins={bins}), got '
                      f'{data_config.randaugment_magnitude}.')
