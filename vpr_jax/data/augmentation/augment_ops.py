"""torchvision's RandAugment op table, shared by the CPU (PIL) and the accelerator paths.

The op names in torchvision's order (an op index drawn uniformly in [0, 14) names the op), which
ops take a signed magnitude, each op's float32 magnitude table (`torch.linspace` value for value)
and the inverse affine map of the geometric ops. Nothing here imports JAX or PIL.
"""

import math
from typing import Sequence

import numpy as np

# torchvision's order (RandAugment._augmentation_space).
OPS = ('Identity', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate', 'Brightness', 'Color',
       'Contrast', 'Sharpness', 'Posterize', 'Solarize', 'AutoContrast', 'Equalize')
NUM_OPS = len(OPS)
SIGNED_OPS = frozenset({'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate', 'Brightness',
                        'Color', 'Contrast', 'Sharpness'})


def torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
  """`torch.linspace(start, end, steps)` in float32, value for value.

  torch computes the step in float32 and fills the first half forwards from `start`, the second
  half backwards from `end`, each value as one fused multiply-add (a single rounding, emulated
  here in float64, where the product is exact). numpy's linspace would move some magnitudes by
  one float32 ulp.
  """
  start32, end32 = np.float32(start), np.float32(end)
  if steps == 1:
    return np.array([start32], dtype=np.float32)
  step = np.float64(np.float32((end32 - start32) / np.float32(steps - 1)))
  i = np.arange(steps, dtype=np.float64)
  forward = np.float64(start32) + step * i
  backward = np.float64(end32) - step * (steps - 1 - i)
  return np.where(i < steps // 2, forward, backward).astype(np.float32)


def augmentation_space(num_bins: int, image_size: Sequence[int]) -> dict[str, tuple[np.ndarray,
                                                                                   bool]]:
  """Magnitude table of each op, as torchvision's `RandAugment._augmentation_space`.

  Args:
    num_bins: number of magnitude bins (31 in torchvision's RandAugment).
    image_size: (height, width) of the image being augmented.

  Returns:
    {op name: (float32 magnitudes [num_bins] or a 0-d zero for magnitude-free ops, signed)}.
  """
  height, width = int(image_size[0]), int(image_size[1])
  zero = np.zeros((), dtype=np.float32)
  posterize_bits = 8 - np.round(np.arange(num_bins, dtype=np.float32) /
                                np.float32((num_bins - 1) / 4)).astype(np.int32)
  return {
      'Identity': (zero, False),
      'ShearX': (torch_linspace(0.0, 0.3, num_bins), True),
      'ShearY': (torch_linspace(0.0, 0.3, num_bins), True),
      'TranslateX': (torch_linspace(0.0, 150.0 / 331.0 * width, num_bins), True),
      'TranslateY': (torch_linspace(0.0, 150.0 / 331.0 * height, num_bins), True),
      'Rotate': (torch_linspace(0.0, 30.0, num_bins), True),
      'Brightness': (torch_linspace(0.0, 0.9, num_bins), True),
      'Color': (torch_linspace(0.0, 0.9, num_bins), True),
      'Contrast': (torch_linspace(0.0, 0.9, num_bins), True),
      'Sharpness': (torch_linspace(0.0, 0.9, num_bins), True),
      'Posterize': (posterize_bits.astype(np.float32), False),
      'Solarize': (torch_linspace(255.0, 0.0, num_bins), False),
      'AutoContrast': (zero, False),
      'Equalize': (zero, False),
  }


def op_magnitude(op_name: str, magnitude: int, num_magnitude_bins: int, height: int,
                 width: int) -> float:
  """The unsigned magnitude torchvision's RandAugment gives `op_name` (0.0 for unparameterised).

  Args:
    op_name: one of OPS.
    magnitude: the magnitude bin (torchvision's `magnitude`).
    num_magnitude_bins: number of bins (torchvision's `num_magnitude_bins`).
    height: image height (TranslateY's range).
    width: image width (TranslateX's range).

  Returns:
    The magnitude as a Python float (shear factor, pixels, degrees, enhancement delta, bits or
    threshold).
  """
  if op_name not in OPS:
    raise ValueError(f'unknown RandAugment op {op_name!r}; expected one of {OPS}')
  table, _ = augmentation_space(num_magnitude_bins, (height, width))[op_name]
  return float(table[magnitude]) if table.ndim else 0.0


def inverse_affine_matrix(center: Sequence[float], angle: float, translate: Sequence[float],
                          scale: float, shear: Sequence[float]) -> list[float]:
  """Output-to-input affine map [a, b, c, d, e, f] of torchvision's affine (float64).

  The forward map is T * C * R(angle) * S(scale) * ShearY * ShearX * C^-1 (C: translation to
  `center`, T: `translate`), angles in degrees; torchvision samples the input at the inverse,
  computed here in torchvision's order of operations (`_get_inverse_affine_matrix`), so the
  rounding is the same. PIL's `Image.transform(AFFINE)` takes this matrix with `center` in pixel
  coordinates; the tensor path takes it with centred coordinates.

  Args:
    center: (cx, cy).
    angle: rotation in degrees (counter-clockwise positive in torchvision's `affine`).
    translate: (tx, ty) in pixels.
    scale: isotropic scale.
    shear: (sx, sy) in degrees.

  Returns:
    Six floats: x_in = a x + b y + c, y_in = d x + e y + f.
  """
  rot = math.radians(angle)
  sx, sy = math.radians(shear[0]), math.radians(shear[1])
  cx, cy = center
  tx, ty = translate
  # R * Sh as [[a, b], [c, d]]; its determinant is 1, so the inverse is [[d, -b], [-c, a]].
  a = math.cos(rot - sy) / math.cos(sy)
  b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
  c = math.sin(rot - sy) / math.cos(sy)
  d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
  matrix = [x / scale for x in (d, -b, 0.0, -c, a, 0.0)]
  matrix[2] += matrix[0] * (-cx - tx) + matrix[1] * (-cy - ty)
  matrix[5] += matrix[3] * (-cx - tx) + matrix[4] * (-cy - ty)
  matrix[2] += cx
  matrix[5] += cy
  return matrix
