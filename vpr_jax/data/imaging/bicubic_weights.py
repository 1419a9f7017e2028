"""torch.nn.functional.interpolate's bicubic resampling (align_corners=False), as weight matrices.

Resizing along one axis is a linear map, so torch's separable bicubic kernels are written here as
[out, in] weight matrices computed in numpy at trace time (shapes are static) and applied with one
einsum (numpy only: data workers use it too). Two kernels exist in torch:

* antialias=False (`upsample_bicubic2d`): Keys' cubic convolution with a = -0.75 on 4 taps around
  the source coordinate `(i + 0.5) * scale - 0.5`, taps clamped to the border. `scale` is 1 / the
  scale factor when one is given (not in / out), which is why DINOv2's position-embedding
  interpolation with scale factor (h0 + 0.1) / M differs from a plain resize to h0.
* antialias=True (`_upsample_bicubic2d_aa`, also used by torchvision's Resize on tensors): the
  a = -0.5 cubic, stretched by in / out when downsampling, weights normalised to sum to one.

jax.image.resize's 'bicubic' uses a = -0.5 with a different border handling, so it matches neither.
Weights are computed in float32 as torch's CPU kernels compute them.
"""

import math
from typing import Optional

import numpy as np


def _cubic_near(x: np.ndarray, a: float) -> np.ndarray:
  # |x| <= 1: ((a + 2) |x| - (a + 3)) x^2 + 1.
  return ((a + 2) * x - (a + 3)) * x * x + 1


def _cubic_far(x: np.ndarray, a: float) -> np.ndarray:
  # 1 < |x| < 2: ((a |x| - 5a) |x| + 8a) |x| - 4a.
  return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


def _source_scale(in_size: int, out_size: int, scale_factor: Optional[float]) -> np.float32:
  # torch's area_pixel_compute_scale for align_corners=False.
  if scale_factor is not None and scale_factor > 0:
    return np.float32(1.0 / scale_factor)
  return np.float32(in_size / out_size)


def bicubic_matrix(in_size: int, out_size: int, scale_factor: Optional[float] = None,
                   antialias: bool = False) -> np.ndarray:
  """Weights [out_size, in_size] of torch's bicubic interpolation along one axis.

  Args:
    in_size: input length.
    out_size: output length.
    scale_factor: the scale factor given to `F.interpolate` for this axis (None when a size is
      given); it sets the sampling step, as torch does.
    antialias: torch's antialias flag.

  Returns:
    A float32 matrix W with out = W @ in along the axis.
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f'Cannot resize an axis of length {in_size} to {out_size}.')
  scale = _source_scale(in_size, out_size, scale_factor)
  matrix = np.zeros((out_size, in_size), np.float32)
  if not antialias:
    a = np.float32(-0.75)
    one = np.float32(1.0)
    for i in range(out_size):
      real = scale * np.float32(i + 0.5) - np.float32(0.5)
      index = min(int(math.floor(real)), in_size - 1)
      t = np.float32(min(max(real - np.float32(index), np.float32(0.0)), one))
      coeffs = (_cubic_far(t + one, a), _cubic_near(t, a), _cubic_near(one - t, a),
                _cubic_far(one - t + one, a))
      for j, coeff in enumerate(coeffs):
        matrix[i, min(max(index - 1 + j, 0), in_size - 1)] += coeff
    return matrix

  a = np.float32(-0.5)
  support = np.float32(2.0) * scale if scale >= 1.0 else np.float32(2.0)
  inv_scale = np.float32(1.0) / scale if scale >= 1.0 else np.float32(1.0)
  for i in range(out_size):
    center = scale * np.float32(i + 0.5)
    lo = max(int(center - support + np.float32(0.5)), 0)
    hi = min(int(center + support + np.float32(0.5)), in_size)
    x = np.abs((np.arange(lo, hi, dtype=np.float32) - center + np.float32(0.5)) * inv_scale)
    weights = np.where(x < 1, _cubic_near(x, a), np.where(x < 2, _cubic_far(x, a), 0.0))
    weights = weights.astype(np.float32)
    total = weights.sum(dtype=np.float32)
    if total != 0:
      weights = weights / total
    matrix[i, lo:hi] = weights
  return matrix
