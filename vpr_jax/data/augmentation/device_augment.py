"""RandAugment on the accelerator, inside the jitted train step (`data.augment = 'device'`).

`rand_augment` applies torchvision's RandAugment (num_ops ops per image, each drawn uniformly
from the 14 ops below, with a random sign for the signed ones) to a batch of uint8 images with
jnp, so the data workers only decode (ideally prepared, pre-resized JPEGs: `vpr_jax.prepare`)
and the accelerator never waits for the CPU.

When to use which path:

* `data.augment = 'randaugment'` (CPU, `vpr_jax.data.augmentation.augment`): PIL images and the seed's
  `torchvision.transforms.RandAugment` on PIL images, drawn in the data workers. Use it for
  parity with the seed, or when the CPUs keep up (small models, few accelerators, many cores).
* `data.augment = 'device'` (this module): the same ops, magnitudes and sampling rule, computed
  like torchvision's *tensor* backend (`torchvision.transforms.v2.functional` on uint8 tensors),
  which differs from its PIL backend in rounding (PIL works in integer arithmetic, the tensor
  backend in float32 and truncates), in the Contrast mean (PIL rounds it) and in pixel-centre
  conventions of the geometric ops. Random numbers come from a JAX key, so the draws differ from
  the CPU path's. Use it for speed: decoding a pre-resized 224x224 JPEG costs ~10x less CPU than
  decode + resize + RandAugment of a 640x480 original.

Exactness against torchvision's tensor backend (tests/test_device_augment.py compares every op):

* Identity, ShearX/Y, TranslateX/Y, Rotate, Brightness, Color, Sharpness, Posterize, Solarize,
  AutoContrast, Equalize: identical on the tested images. The geometric ops use the same inverse
  matrix (float64, then float32, as torchvision builds it), the same pixel-centre grid
  (`align_corners=False`), round-half-to-even nearest sampling and fill 0; a source coordinate
  within float32 rounding of a .5 tie could pick the neighbouring pixel on another backend
  (rare: none at the tested sizes). torch's `add_(other, alpha=w)` is a fused multiply-add,
  which XLA has no primitive for; Color's and Sharpness's results depend only on two uint8
  inputs, so they come from a 65,536-entry table per sign computed with the fused rounding.
  The greyscale image (Color, Contrast) is not fused here: 21 of the 2^24 (r, g, b) triples
  floor to a grey level one lower or higher than torchvision's.
* Contrast: the greyscale mean is exact (an integer sum), but the final blend is not fused here:
  about one value in 10^6 differs by 1 intensity level.
* XLA rewrites a division by a broadcast value as a multiplication by its reciprocal, which
  rounds differently; the AutoContrast scale and the Contrast mean keep the true division
  behind `lax.optimization_barrier`.
* Solarize uses the `torchvision.transforms.RandAugment` (v1) threshold, linspace(255, 0)[bin],
  which the seed uses; v2 scales linspace(1, 0)[bin] by 255 in float32 and can differ by one
  level at a bin edge.

Why a fixed pipeline instead of `lax.switch` over the ops: under `vmap` a switch whose index
differs per image is lowered to a select over the outputs of *all* 14 branches, so it computes
14 ops per image per step. Here every op is a member of one of four families that share their
work, each computed once from the step's input and selected per image:
  1. affine warp with nearest sampling (Identity, ShearX/Y, TranslateX/Y, Rotate): one gather
     with a per-image 2x3 matrix from a constant table indexed by (op, sign);
  2. Color: blend with the greyscale image (a table lookup);
  3. Sharpness: blend with the 3x3-blurred image (a stencil and a table lookup);
  4. per-channel 256-entry lookup table (Brightness, Contrast, Posterize, Solarize,
     AutoContrast, Equalize): each LUT is built from 256 values and per-image statistics (the
     greyscale mean, channel min/max, channel histograms), then applied with one gather.
So an op step costs about four elementwise/gather passes and one histogram over the batch,
mostly fused by XLA, instead of fourteen.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vpr_jax.data.augmentation import augment_ops

_OP = {name: i for i, name in enumerate(augment_ops.OPS)}
# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)


def _geometric_matrix(op_name: str, signed_magnitude: float, height: int,
                      width: int) -> list[float]:
  """The inverse affine matrix RandAugment's geometric op uses (identity for the others)."""
  if op_name == 'ShearX':
    # Sheared about the top-left corner (center=[0, 0] in pixels), as RandAugment does.
    return augment_ops.inverse_affine_matrix([-0.5 * width, -0.5 * height], 0.0, [0.0, 0.0], 1.0,
                                 [math.degrees(math.atan(signed_magnitude)), 0.0])
  if op_name == 'ShearY':
    return augment_ops.inverse_affine_matrix([-0.5 * width, -0.5 * height], 0.0, [0.0, 0.0], 1.0,
                                 [0.0, math.degrees(math.atan(signed_magnitude))])
  if op_name == 'TranslateX':
    return augment_ops.inverse_affine_matrix([0.0, 0.0], 0.0, [float(int(signed_magnitude)), 0.0], 1.0,
                                 [0.0, 0.0])
  if op_name == 'TranslateY':
    return augment_ops.inverse_affine_matrix([0.0, 0.0], 0.0, [0.0, float(int(signed_magnitude))], 1.0,
                                 [0.0, 0.0])
  if op_name == 'Rotate':
    # `rotate` takes the angle modulo 360 and passes its negative to the affine matrix.
    return augment_ops.inverse_affine_matrix([0.0, 0.0], -(signed_magnitude % 360), [0.0, 0.0], 1.0,
                                 [0.0, 0.0])
  return [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


class OpTables(NamedTuple):
  """Per-(op, sign) constants of one RandAugment configuration and image size (numpy).

  Attributes:
    grid_matrix: float32 [augment_ops.NUM_OPS, 2, 3, 2]: the inverse affine matrix, transposed and divided by
      (W/2, H/2) so that it maps centred output pixel coordinates (x, y, 1) to normalised input
      coordinates in [-1, 1] (torchvision's `_affine_grid`). Index [op, negative].
    factor: float32 [augment_ops.NUM_OPS, 2]: enhancement factor 1 + magnitude (Brightness, Color, Contrast,
      Sharpness); 1 for the other ops.
    other_weight: float32 [augment_ops.NUM_OPS, 2]: 1 - factor, formed in float64 before the cast as
      torchvision does (the weight of the degenerate image in a blend).
    color_table: uint8 [2, 256 * 256]: Color's output for (negative, value * 256 + grey).
    sharpness_table: uint8 [2, 256 * 256]: Sharpness's output for (negative, value * 256 +
      rounded blur), inner pixels.
    posterize_mask: the bit mask Posterize keeps.
    solarize_threshold: values >= this are inverted by Solarize.
  """
  grid_matrix: np.ndarray
  factor: np.ndarray
  other_weight: np.ndarray
  color_table: np.ndarray
  sharpness_table: np.ndarray
  posterize_mask: int
  solarize_threshold: float


def _fused_multiply_add(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
  """float32 a * b + c with one rounding, as torch's `add_(other, alpha=...)` computes it.

  The product of two float32 values is exact in float64, so only the final sum is rounded
  (twice: to float64, then float32; the two can disagree only on exact float32 ties).
  """
  a, b, c = (np.asarray(v, np.float32).astype(np.float64) for v in (a, b, c))
  return (a * b + c).astype(np.float32)


def _blend_table(factor: np.float32, other_weight: np.float32, mode: str) -> np.ndarray:
  """uint8 [256 * 256] results of a blend for every pair of uint8 inputs (value, other).

  torchvision computes `image.mul(ratio).add_(other, alpha=1 - ratio)` (Color) and
  `view.add_(blurred - view, alpha=1 - ratio)` (Sharpness) in float32, where `add_` with `alpha`
  is a fused multiply-add; a table of the 65,536 results reproduces that rounding exactly on
  backends whose own float32 arithmetic does not fuse.
  """
  value = np.repeat(np.arange(256, dtype=np.float32), 256)
  other = np.tile(np.arange(256, dtype=np.float32), 256)
  if mode == 'color':
    result = _fused_multiply_add(other, other_weight, value * factor)
  else:
    result = _fused_multiply_add(other - value, other_weight, value)
  return np.floor(np.clip(result, 0.0, 255.0)).astype(np.uint8)


def make_op_tables(height: int, width: int, magnitude: int = 9,
                   num_magnitude_bins: int = 31) -> OpTables:
  """Builds the constants of every (op, sign) for images of (height, width).

  Args:
    height: image height.
    width: image width.
    magnitude: magnitude bin, 0 <= magnitude < num_magnitude_bins.
    num_magnitude_bins: number of magnitude bins (>= 2).

  Returns:
    The OpTables.
  """
  if num_magnitude_bins < 2 or not 0 <= magnitude < num_magnitude_bins:
    raise ValueError(f'RandAugment magnitude must be in [0, num_magnitude_bins) with '
                     f'num_magnitude_bins >= 2; got magnitude={magnitude}, '
                     f'num_magnitude_bins={num_magnitude_bins}')
  grid_matrix = np.zeros((augment_ops.NUM_OPS, 2, 3, 2), np.float32)
  factor = np.ones((augment_ops.NUM_OPS, 2), np.float32)
  other_weight = np.zeros((augment_ops.NUM_OPS, 2), np.float32)
  half_size = np.asarray([0.5 * width, 0.5 * height], np.float32)
  for op_name, op in _OP.items():
    value = augment_ops.op_magnitude(op_name, magnitude, num_magnitude_bins, height, width)
    for negative in (0, 1):
      signed = -value if negative and op_name in augment_ops.SIGNED_OPS else value
      # torchvision casts the float64 matrix to float32, then divides by (W/2, H/2) in float32.
      theta = np.asarray(_geometric_matrix(op_name, signed, height, width),
                         np.float64).astype(np.float32).reshape(2, 3)
      grid_matrix[op, negative] = theta.T / half_size
      if op_name in ('Brightness', 'Color', 'Contrast', 'Sharpness'):
        factor[op, negative] = np.float32(1.0 + signed)
        other_weight[op, negative] = np.float32(1.0 - (1.0 + signed))
  color_table = np.stack([
      _blend_table(factor[_OP['Color'], s], other_weight[_OP['Color'], s], 'color')
      for s in (0, 1)])
  sharpness_table = np.stack([
      _blend_table(factor[_OP['Sharpness'], s], other_weight[_OP['Sharpness'], s], 'sharpness')
      for s in (0, 1)])
  bits = int(augment_ops.op_magnitude('Posterize', magnitude, num_magnitude_bins, height, width))
  bits = min(max(bits, 0), 8)
  posterize_mask = (((1 << bits) - 1) << (8 - bits)) & 0xFF
  solarize_threshold = augment_ops.op_magnitude('Solarize', magnitude, num_magnitude_bins, height, width)
  return OpTables(grid_matrix, factor, other_weight, color_table, sharpness_table,
                  posterize_mask, solarize_threshold)


def _truncate_to_uint8(x: jax.Array) -> jax.Array:
  """torchvision's `.clamp_(0, 255).to(torch.uint8)`: clamp, then truncate toward zero."""
  return jnp.floor(jnp.clip(x, 0.0, 255.0)).astype(jnp.uint8)


def _pair_lookup(table: jax.Array, sign: jax.Array, value: jax.Array,
                 other: jax.Array) -> jax.Array:
  """table[sign, value * 256 + other] for uint8 images `value`, `other` and per-image `sign`."""
  index = (sign[:, None, None, None] * 65536 + value.astype(jnp.int32) * 256
           + other.astype(jnp.int32))
  n = value.shape[0]
  return jnp.take(table.reshape(-1), index.reshape(n, -1), axis=0).reshape(index.shape)


def _grayscale(image_f32: jax.Array) -> jax.Array:
  """Floor of the luma of float32 RGB [N, H, W, 3] -> [N, H, W, 1] (torchvision, uint8 input)."""
  r, g, b = image_f32[..., 0:1], image_f32[..., 1:2], image_f32[..., 2:3]
  return jnp.floor(r * _LUMA[0] + g * _LUMA[1] + b * _LUMA[2])


def _affine_nearest(images: jax.Array, grid_matrix: jax.Array) -> jax.Array:
  """Warps [N, H, W, C] uint8 by per-image grid matrices [N, 3, 2], nearest, fill 0."""
  n, h, w, c = images.shape
  # Pixel centres relative to the image centre (torchvision's base grid; exact half-integers).
  xs = jnp.arange(w, dtype=jnp.float32) - (w - 1) * 0.5
  ys = jnp.arange(h, dtype=jnp.float32) - (h - 1) * 0.5
  m = grid_matrix[:, :, :, None, None]
  gx = xs[None, None, :] * m[:, 0, 0] + ys[None, :, None] * m[:, 1, 0] + m[:, 2, 0]
  gy = xs[None, None, :] * m[:, 0, 1] + ys[None, :, None] * m[:, 1, 1] + m[:, 2, 1]
  # grid_sample(align_corners=False): -1 and +1 are the outer edges of the border pixels;
  # nearest rounds half to even (std::nearbyint), as jnp.round does.
  ix = jnp.round((gx + 1.0) * (w * 0.5) - 0.5)
  iy = jnp.round((gy + 1.0) * (h * 0.5) - 0.5)
  inside = (ix >= 0) & (ix <= w - 1) & (iy >= 0) & (iy <= h - 1)
  flat = (jnp.clip(iy, 0, h - 1).astype(jnp.int32) * w
          + jnp.clip(ix, 0, w - 1).astype(jnp.int32))
  warped = jnp.take_along_axis(images.reshape(n, h * w, c), flat.reshape(n, h * w, 1), axis=1)
  warped = warped.reshape(n, h, w, c)
  return jnp.where(inside[..., None], warped, jnp.zeros((), images.dtype))


def _sharpen(images: jax.Array, image_f32: jax.Array, sign: jax.Array,
             table: jax.Array) -> jax.Array:
  """torchvision's adjust_sharpness of uint8 [N, H, W, 3] (factor given by `sign` and `table`)."""
  _, h, w, _ = images.shape
  if h <= 2 or w <= 2:
    return images
  edge, centre = np.float32(1.0 / 13.0), np.float32(5.0 / 13.0)
  blurred = None
  for dy in range(3):
    for dx in range(3):
      tap = image_f32[:, dy:h - 2 + dy, dx:w - 2 + dx, :]
      term = tap * (centre if (dy, dx) == (1, 1) else edge)
      blurred = term if blurred is None else blurred + term
  # Sums of 9 integers / 13 are never within 1/26 of a .5 tie: the summation order is harmless.
  blurred = jnp.round(blurred).astype(jnp.int32)
  inner = _pair_lookup(table, sign, images[:, 1:-1, 1:-1, :], blurred)
  # The one-pixel border keeps its values.
  return images.at[:, 1:-1, 1:-1, :].set(inner)


def _channel_histograms(images: jax.Array) -> jax.Array:
  """Histograms [N, C, 256] int32 of uint8 images [N, H, W, C]."""
  n, h, w, c = images.shape
  # One flat bincount over (image, channel, value): a single scatter-add for the whole batch.
  bins = (jnp.arange(n, dtype=jnp.int32)[:, None, None, None] * c
          + jnp.arange(c, dtype=jnp.int32)) * 256 + images.astype(jnp.int32)
  return jnp.bincount(bins.reshape(-1), length=n * c * 256).reshape(n, c, 256)


def _equalize_luts(images: jax.Array) -> jax.Array:
  """torchvision's (PIL-style) histogram-equalisation LUTs [N, C, 256] uint8."""
  n, h, w, c = images.shape
  hist = _channel_histograms(images)
  cum = jnp.cumsum(hist, axis=-1)
  # The last non-empty bin is where the cumulative histogram first reaches its maximum.
  last = jnp.argmax(cum, axis=-1)
  last_count = jnp.take_along_axis(hist, last[..., None], axis=-1)
  step = (h * w - last_count) // 255
  lut = (cum[..., :-1] + step // 2) // jnp.maximum(step, 1)
  lut = jnp.concatenate([jnp.zeros((n, c, 1), lut.dtype), jnp.clip(lut, 0, 255)], axis=-1)
  identity = jnp.arange(256, dtype=lut.dtype)
  # Channels with a single value (step 0) are left unchanged.
  return jnp.where(step == 0, identity, lut).astype(jnp.uint8)


def _autocontrast_luts(image_f32: jax.Array) -> jax.Array:
  """torchvision's autocontrast as per-channel LUTs [N, C, 256] uint8."""
  low = jnp.min(image_f32, axis=(1, 2))  # [N, C]
  high = jnp.max(image_f32, axis=(1, 2))
  flat = high == low
  inv_scale = jnp.where(flat, 1.0, (high - low) * np.float32(1.0 / 255.0))
  low = jnp.where(flat, 0.0, low)
  values = jnp.arange(256, dtype=jnp.float32)
  # XLA rewrites x / broadcast(s) as x * broadcast(1 / s), which rounds differently; the barrier
  # keeps the true division torchvision does.
  inv_scale = jax.lax.optimization_barrier(
      jnp.broadcast_to(inv_scale[..., None], low.shape + (256,)))
  return _truncate_to_uint8((values - low[..., None]) / inv_scale)


def _lut_family(images: jax.Array, image_f32: jax.Array, gray: jax.Array, op: jax.Array,
                factor: jax.Array, other_weight: jax.Array, tables: OpTables) -> jax.Array:
  """Applies the LUT ops (identity for images whose op is not one) -> uint8 [N, H, W, C]."""
  n, h, w, c = images.shape
  values = jnp.arange(256, dtype=jnp.float32)
  f = factor[:, None]
  brightness = _truncate_to_uint8(values * f)  # [N, 256]
  # The grey values are integers, so an integer sum is exact (torchvision sums in float32, exact
  # below 2**24, i.e. for images of up to ~65k pixels).
  gray_sum = jnp.sum(gray.astype(jnp.int32).reshape(n, -1), axis=1)
  count = jax.lax.optimization_barrier(jnp.full((n,), h * w, jnp.float32))  # True division.
  mean = (gray_sum.astype(jnp.float32) / count)[:, None]
  contrast = _truncate_to_uint8(values * f + mean * other_weight[:, None])
  ints = jnp.arange(256, dtype=jnp.int32)
  posterize = (ints & tables.posterize_mask).astype(jnp.uint8)
  solarize = jnp.where(values >= tables.solarize_threshold, 255 - ints, ints).astype(jnp.uint8)
  per_channel = lambda lut: jnp.broadcast_to(lut[..., None, :], (n, c, 256))
  lut = jnp.broadcast_to(ints.astype(jnp.uint8), (n, c, 256))
  op = op[:, None, None]
  lut = jnp.where(op == _OP['Brightness'], per_channel(brightness), lut)
  lut = jnp.where(op == _OP['Contrast'], per_channel(contrast), lut)
  lut = jnp.where(op == _OP['Posterize'], posterize, lut)
  lut = jnp.where(op == _OP['Solarize'], solarize, lut)
  lut = jnp.where(op == _OP['AutoContrast'], _autocontrast_luts(image_f32), lut)
  lut = jnp.where(op == _OP['Equalize'], _equalize_luts(images), lut)
  index = images.astype(jnp.int32) + jnp.arange(c, dtype=jnp.int32) * 256
  out = jnp.take_along_axis(lut.reshape(n, c * 256), index.reshape(n, h * w * c), axis=1)
  return out.reshape(n, h, w, c)


def apply_ops(images: jax.Array, ops: jax.Array, negative: jax.Array,
              tables: OpTables) -> jax.Array:
  """Applies one RandAugment op per image.

  Args:
    images: uint8 [N, H, W, 3].
    ops: int [N], indices into augment_ops.OPS.
    negative: bool [N]; True negates the magnitude of signed ops (ignored by the others).
    tables: `make_op_tables(H, W, magnitude, num_magnitude_bins)`.

  Returns:
    uint8 [N, H, W, 3].
  """
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != jnp.uint8:
    raise ValueError(f'expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}')
  ops = jnp.asarray(ops, jnp.int32)
  sign = jnp.asarray(negative, jnp.int32)
  image_f32 = images.astype(jnp.float32)
  gray = _grayscale(image_f32)
  factor = jnp.asarray(tables.factor)[ops, sign]
  other_weight = jnp.asarray(tables.other_weight)[ops, sign]
  out = _lut_family(images, image_f32, gray, ops, factor, other_weight, tables)
  family = ops[:, None, None, None]
  color = _pair_lookup(jnp.asarray(tables.color_table), sign, images, gray.astype(jnp.int32))
  out = jnp.where(family == _OP['Color'], color, out)
  sharp = _sharpen(images, image_f32, sign, jnp.asarray(tables.sharpness_table))
  out = jnp.where(family == _OP['Sharpness'], sharp, out)
  is_geometric = (family >= _OP['ShearX']) & (family <= _OP['Rotate'])
  warped = _affine_nearest(images, jnp.asarray(tables.grid_matrix)[ops, sign])
  return jnp.where(is_geometric, warped, out)


def sample_ops(rng: jax.Array, num_images: int, num_ops: int) -> tuple[jax.Array, jax.Array]:
  """Draws RandAugment's ops and signs: op uniform over the 14, sign +-1 with probability 1/2.

  Args:
    rng: PRNG key.
    num_images: N.
    num_ops: ops per image.

  Returns:
    (ops int32 [N, num_ops], negative bool [N, num_ops]).
  """
  op_rng, sign_rng = jax.random.split(rng)
  ops = jax.random.randint(op_rng, (num_images, num_ops), 0, augment_ops.NUM_OPS, dtype=jnp.int32)
  negative = jax.random.bernoulli(sign_rng, 0.5, (num_images, num_ops))
  return ops, negative


def rand_augment(images: jax.Array, rng: jax.Array, num_ops: int = 3, magnitude: int = 9,
                 num_magnitude_bins: int = 31) -> jax.Array:
  """RandAugment on the accelerator: `num_ops` random ops per image, drawn per image.

  Jit-safe (call it inside the train step); every image draws its own ops and signs.

  Args:
    images: uint8 [..., H, W, 3] (e.g. [N, H, W, 3] or the train batch's [P, K, H, W, 3]).
    rng: PRNG key (fold in the step so each step draws afresh).
    num_ops: ops applied in sequence to every image (torchvision's `num_ops`).
    magnitude: magnitude bin (torchvision's `magnitude`).
    num_magnitude_bins: torchvision's `num_magnitude_bins`.

  Returns:
    uint8 images of the input's shape.
  """
  images = jnp.asarray(images)
  if images.ndim < 4 or images.shape[-1] != 3 or images.dtype != jnp.uint8:
    raise ValueError(f'rand_augment expects uint8 images [..., H, W, 3], got {images.dtype} '
                     f'{images.shape}')
  if num_ops < 0:
    raise ValueError(f'num_ops must be >= 0, got {num_ops}')
  shape = images.shape
  h, w = shape[-3], shape[-2]
  tables = make_op_tables(h, w, magnitude, num_magnitude_bins)
  flat = images.reshape((-1, h, w, 3))
  ops, negative = sample_ops(rng, flat.shape[0], num_ops)
  for i in range(num_ops):
    flat = apply_ops(flat, ops[:, i], negative[:, i], tables)
  return flat.reshape(shape)


def make_augment_fn(config) -> Callable:
  """On-device RandAugment for data.augment='device': (images, rng, axis_name) -> images.

  Under pmap, the ops of the whole global batch are drawn and each device takes its slice, so
  the draws do not depend on the number of devices.
  """
  data = config.data
  num_ops, magnitude = int(data.randaugment_num_ops), int(data.randaugment_magnitude)
  bins = int(data.randaugment_num_magnitude_bins)

  def augment(images, rng, axis_name):
    if axis_name is None:
      return rand_augment(images, rng, num_ops, magnitude, bins)
    n, h, w = images.shape[0], images.shape[1], images.shape[2]
    tables = make_op_tables(h, w, magnitude, bins)
    total = n * jax.lax.axis_size(axis_name)
    ops, negative = sample_ops(rng, total, num_ops)
    start = jax.lax.axis_index(axis_name) * n
    ops = jax.lax.dynamic_slice_in_dim(ops, start, n)
    negative = jax.lax.dynamic_slice_in_dim(negative, start, n)
    for i in range(num_ops):
      images = apply_ops(images, ops[:, i], negative[:, i], tables)
    return images

  return augment
