"""On-device RandAugment against torchvision's tensor backend (v2 functional on uint8 tensors)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vpr_jax.data.augmentation import augment_ops
from vpr_jax.data.augmentation import device_augment

torch = pytest.importorskip('torch', reason='torch is the reference for RandAugment ops')
tv_transforms = pytest.importorskip('torchvision.transforms',
                                    reason='torchvision is the reference for RandAugment ops')
from torchvision.transforms import InterpolationMode  # noqa: E402
from torchvision.transforms.v2 import functional as tvf  # noqa: E402

# Ops whose float32 arithmetic may differ from torch's in summation order (the Contrast mean).
_NEAR_EXACT_OPS = ('Contrast',)
_SIZES = ((29, 37), (32, 32))


def _reference_op(image_hwc: np.ndarray, op_name: str, magnitude: float) -> np.ndarray:
  """One RandAugment op as torchvision applies it to a uint8 tensor (nearest, fill 0)."""
  t = torch.from_numpy(np.ascontiguousarray(image_hwc)).permute(2, 0, 1).contiguous()
  nearest = InterpolationMode.NEAREST
  if op_name == 'Identity':
    out = t
  elif op_name == 'ShearX':
    out = tvf.affine(t, angle=0.0, translate=[0, 0], scale=1.0,
                     shear=[math.degrees(math.atan(magnitude)), 0.0], interpolation=nearest,
                     fill=None, center=[0, 0])
  elif op_name == 'ShearY':
    out = tvf.affine(t, angle=0.0, translate=[0, 0], scale=1.0,
                     shear=[0.0, math.degrees(math.atan(magnitude))], interpolation=nearest,
                     fill=None, center=[0, 0])
  elif op_name == 'TranslateX':
    out = tvf.affine(t, angle=0.0, translate=[int(magnitude), 0], scale=1.0, shear=[0.0, 0.0],
                     interpolation=nearest, fill=None)
  elif op_name == 'TranslateY':
    out = tvf.affine(t, angle=0.0, translate=[0, int(magnitude)], scale=1.0, shear=[0.0, 0.0],
                     interpolation=nearest, fill=None)
  elif op_name == 'Rotate':
    out = tvf.rotate(t, magnitude, interpolation=nearest, fill=None)
  elif op_name == 'Brightness':
    out = tvf.adjust_brightness(t, 1.0 + magnitude)
  elif op_name == 'Color':
    out = tvf.adjust_saturation(t, 1.0 + magnitude)
  elif op_name == 'Contrast':
    out = tvf.adjust_contrast(t, 1.0 + magnitude)
  elif op_name == 'Sharpness':
    out = tvf.adjust_sharpness(t, 1.0 + magnitude)
  elif op_name == 'Posterize':
    out = tvf.posterize(t, int(magnitude))
  elif op_name == 'Solarize':
    out = tvf.solarize(t, magnitude)
  elif op_name == 'AutoContrast':
    out = tvf.autocontrast(t)
  elif op_name == 'Equalize':
    out = tvf.equalize(t)
  else:
    raise ValueError(op_name)
  return out.permute(1, 2, 0).numpy()


def _torchvision_magnitude(op_name, magnitude, bins, height, width):
  """The signed-less magnitude `torchvision.transforms.RandAugment` (the seed's) uses."""
  space = tv_transforms.RandAugment(num_ops=1, magnitude=magnitude,
                                    num_magnitude_bins=bins)._augmentation_space(
                                        bins, (height, width))
  values, signed = space[op_name]
  value = float(values[magnitude].item()) if values.ndim > 0 else 0.0
  return value, signed


def _test_images(height, width, seed=0):
  rng = np.random.default_rng(seed)
  noise = rng.integers(0, 256, (2, height, width, 3), dtype=np.uint8)
  # A smooth gradient image, a low-contrast one and one with a constant channel exercise
  # AutoContrast / Equalize edge cases (flat channels, few distinct values).
  yy, xx = np.mgrid[0:height, 0:width]
  gradient = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1),
                       (xx + yy) % 256], axis=-1).astype(np.uint8)
  low = (rng.integers(0, 4, (height, width, 3)) * 9 + 100).astype(np.uint8)
  flat = noise[0].copy()
  flat[..., 1] = 77
  return np.concatenate([noise, gradient[None], low[None], flat[None]], axis=0)


@functools.lru_cache(maxsize=None)
def _jitted_apply(height, width, magnitude, bins):
  tables = device_augment.make_op_tables(height, width, magnitude, bins)
  return jax.jit(lambda x, ops, neg: device_augment.apply_ops(x, ops, neg, tables))


@pytest.mark.parametrize('magnitude,bins', [(9, 31), (0, 31), (30, 31), (5, 11)])
@pytest.mark.parametrize('height,width', [(224, 224), (29, 37)])
def test_magnitudes_match_torchvision(magnitude, bins, height, width):
  for op_name in augment_ops.OPS:
    expected, signed = _torchvision_magnitude(op_name, magnitude, bins, height, width)
    assert augment_ops.op_magnitude(op_name, magnitude, bins, height, width) == expected, op_name
    assert (op_name in augment_ops.SIGNED_OPS) == signed, op_name


@pytest.mark.parametrize('height,width', _SIZES)
@pytest.mark.parametrize('op_name', augment_ops.OPS)
def test_op_matches_torchvision(op_name, height, width):
  images = _test_images(height, width)
  n = images.shape[0]
  apply = _jitted_apply(height, width, 9, 31)
  value, signed = _torchvision_magnitude(op_name, 9, 31, height, width)
  op = augment_ops.OPS.index(op_name)
  for negative in ((False, True) if signed else (False,)):
    magnitude = -value if negative else value
    expected = np.stack([_reference_op(im, op_name, magnitude) for im in images])
    got = np.asarray(apply(jnp.asarray(images), jnp.full((n,), op, jnp.int32),
                           jnp.full((n,), negative)))
    assert got.shape == expected.shape and got.dtype == np.uint8
    diff = np.abs(got.astype(np.int32) - expected.astype(np.int32))
    context = f'{op_name} negative={negative} {height}x{width}'
    if op_name in _NEAR_EXACT_OPS:
      assert diff.max() <= 1, context
      assert np.mean(diff > 0) <= 0.01, context
    else:
      # Geometric ops are documented as exact up to coordinates within float32 rounding of a .5
      # tie; none occur at these sizes, so any difference is a bug.
      np.testing.assert_array_equal(got, expected, err_msg=context)


def test_extreme_magnitude_matches_torchvision():
  """Bin 30 of 31: Posterize keeps 4 bits, Solarize inverts everything, largest shears."""
  height, width = 29, 37
  images = _test_images(height, width, seed=3)
  n = images.shape[0]
  apply = _jitted_apply(height, width, 30, 31)
  for op_name in ('ShearX', 'Rotate', 'TranslateY', 'Posterize', 'Solarize', 'Color',
                  'Sharpness', 'Brightness'):
    value, signed = _torchvision_magnitude(op_name, 30, 31, height, width)
    magnitude = -value if signed else value
    expected = np.stack([_reference_op(im, op_name, magnitude) for im in images])
    got = np.asarray(apply(jnp.asarray(images),
                           jnp.full((n,), augment_ops.OPS.index(op_name), jnp.int32),
                           jnp.full((n,), signed)))
    np.testing.assert_array_equal(got, expected, err_msg=op_name)


def test_rand_augment_jit_matches_sequential_torchvision_ops():
  n, height, width = 8, 32, 32
  images = _test_images(height, width, seed=1)
  images = np.concatenate([images, images[:n - images.shape[0]]], axis=0)
  rng = jax.random.key(7)
  augment = jax.jit(functools.partial(device_augment.rand_augment, num_ops=3))
  got = np.asarray(augment(jnp.asarray(images), rng))
  assert got.shape == images.shape and got.dtype == np.uint8
  np.testing.assert_array_equal(got, np.asarray(augment(jnp.asarray(images), rng)))
  assert not np.array_equal(got, np.asarray(augment(jnp.asarray(images), jax.random.key(8))))

  # The same draws, applied one by one with torchvision's ops.
  ops, negative = device_augment.sample_ops(rng, n, 3)
  ops, negative = np.asarray(ops), np.asarray(negative)
  for i in range(n):
    expected = images[i]
    for step in range(3):
      name = augment_ops.OPS[ops[i, step]]
      value, signed = _torchvision_magnitude(name, 9, 31, height, width)
      expected = _reference_op(expected, name, -value if signed and negative[i, step] else value)
    diff = np.abs(got[i].astype(np.int32) - expected.astype(np.int32))
    assert np.mean(diff > 1) <= 0.01, (i, ops[i], negative[i])


def test_sample_ops_is_uniform_with_fair_signs():
  ops, negative = device_augment.sample_ops(jax.random.key(0), 7000, 2)
  ops, negative = np.asarray(ops), np.asarray(negative)
  assert ops.min() == 0 and ops.max() == augment_ops.NUM_OPS - 1
  counts = np.bincount(ops.reshape(-1), minlength=augment_ops.NUM_OPS)
  expected = ops.size / augment_ops.NUM_OPS
  # 5 standard deviations of a binomial count.
  assert np.all(np.abs(counts - expected) < 5 * math.sqrt(expected)), counts
  assert abs(negative.mean() - 0.5) < 5 * math.sqrt(0.25 / negative.size)
  # Images draw independently: not all images of a batch share their first op.
  assert len(set(ops[:16, 0].tolist())) > 1


def test_rand_augment_keeps_leading_dims_and_zero_ops_is_identity():
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 3, 16, 24, 3), np.uint8))
  augment = jax.jit(device_augment.rand_augment, static_argnames='num_ops')
  out = augment(images, jax.random.key(0), num_ops=1)
  assert out.shape == images.shape and out.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(augment(images, jax.random.key(0), num_ops=0)),
                                np.asarray(images))


def test_bad_input_raises():
  with pytest.raises(ValueError, match='uint8'):
    device_augment.rand_augment(jnp.zeros((2, 8, 8, 3), jnp.float32), jax.random.key(0))
  with pytest.raises(ValueError, match=r'\[\.\.\., H, W, 3\]'):
    device_augment.rand_augment(jnp.zeros((2, 8, 8, 4), jnp.uint8), jax.random.key(0))
  with pytest.raises(ValueError, match='magnitude'):
    device_augment.make_op_tables(8, 8, magnitude=31, num_magnitude_bins=31)
  with pytest.raises(ValueError, match='unknown RandAugment op'):
    augment_ops.op_magnitude('Invert', 9, 31, 8, 8)
