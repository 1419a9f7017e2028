"""RandAugment and the train transform: hand-computed expectations and torchvision parity."""

import collections
import pickle

import ml_collections
import numpy as np
from PIL import Image
import pytest

from vpr_jax.data.augmentation import augment
from vpr_jax.data.augmentation import augment_ops

# The seed's setting: magnitude 9 of 31 bins.
MAGNITUDE, BINS = 9, 31


def _random_image(height=37, width=53, seed=0):
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 256, size=(height, width, 3))
  # Smooth structure plus noise, so geometric ops and filters have something to move.
  yy, xx = np.mgrid[0:height, 0:width]
  ramp = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 127 // (width + height)], -1)
  return Image.fromarray(((base // 3 + ramp * 2 // 3) % 256).astype(np.uint8), 'RGB')


def _gray(values):
  values = np.asarray(values, dtype=np.uint8)
  return Image.fromarray(np.stack([values] * 3, axis=-1), 'RGB')


def _magnitude(op_name, image_size=(37, 53)):
  magnitudes, _ = augment_ops.augmentation_space(BINS, image_size)[op_name]
  return float(magnitudes[MAGNITUDE]) if magnitudes.ndim else 0.0


# Hand-computed expectations (numpy, from the definitions of the operations).


def test_seed_magnitudes():
  assert _magnitude('Posterize') == 7.0  # 8 - round(9 / 7.5)
  assert _magnitude('Solarize') == 178.5  # 255 - 9 * 255 / 30
  assert _magnitude('Rotate') == pytest.approx(9.0)
  assert _magnitude('ShearX') == pytest.approx(0.09)
  assert _magnitude('Brightness') == pytest.approx(0.27)
  assert _magnitude('TranslateX', (224, 224)) == pytest.approx(150 / 331 * 224 * 9 / 30, 1e-6)
  assert _magnitude('TranslateY', (48, 64)) == pytest.approx(150 / 331 * 48 * 9 / 30, 1e-6)


def test_identity():
  img = _random_image()
  np.testing.assert_array_equal(np.asarray(augment.apply_op(img, 'Identity', 0.0)), img)


@pytest.mark.parametrize('bits', [7, 4, 1])
def test_posterize_keeps_the_high_bits(bits):
  img = _random_image()
  expected = np.asarray(img) & np.uint8((0xFF << (8 - bits)) & 0xFF)
  np.testing.assert_array_equal(np.asarray(augment.apply_op(img, 'Posterize', float(bits))),
                                expected)


def test_solarize_inverts_at_and_above_the_threshold():
  values = np.arange(256).reshape(16, 16)
  out = np.asarray(augment.apply_op(_gray(values), 'Solarize', 178.5))[..., 0]
  np.testing.assert_array_equal(out, np.where(values >= 178.5, 255 - values, values))


@pytest.mark.parametrize('sign', [1, -1])
def test_brightness_scales_and_truncates(sign):
  magnitude = sign * _magnitude('Brightness')
  img = _random_image()
  factor = np.float32(1.0 + magnitude)
  # PIL blends with black in float32 and truncates: out = clip(floor(x * factor)).
  expected = np.clip(np.floor(np.asarray(img).astype(np.float32) * factor), 0, 255)
  np.testing.assert_array_equal(np.asarray(augment.apply_op(img, 'Brightness', magnitude)),
                                expected.astype(np.uint8))


@pytest.mark.parametrize('sign', [1, -1])
def test_contrast_on_grey_blends_with_the_mean(sign):
  magnitude = sign * _magnitude('Contrast')
  values = np.random.default_rng(1).integers(0, 256, size=(9, 11))
  mean = int(values.mean() + 0.5)
  factor = np.float32(1.0 + magnitude)
  expected = np.clip(np.floor(np.float32(mean) + factor * (values - mean).astype(np.float32)),
                     0, 255)
  out = np.asarray(augment.apply_op(_gray(values), 'Contrast', magnitude))
  np.testing.assert_array_equal(out[..., 0], expected)
  np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_color_leaves_grey_alone():
  values = np.random.default_rng(2).integers(0, 256, size=(9, 11))
  for magnitude in (_magnitude('Color'), -_magnitude('Color')):
    np.testing.assert_array_equal(np.asarray(augment.apply_op(_gray(values), 'Color', magnitude)),
                                  np.asarray(_gray(values)))


def test_autocontrast_stretches_each_channel():
  rng = np.random.default_rng(3)
  pixels = rng.integers(40, 200, size=(10, 12, 3)).astype(np.uint8)
  out = np.asarray(augment.apply_op(Image.fromarray(pixels, 'RGB'), 'AutoContrast', 0.0))
  for c in range(3):
    lo, hi = int(pixels[..., c].min()), int(pixels[..., c].max())
    scale = 255.0 / (hi - lo)
    lut = np.array([min(max(int(i * scale - lo * scale), 0), 255) for i in range(256)])
    np.testing.assert_array_equal(out[..., c], lut[pixels[..., c]])
  assert out.min() == 0 and out.max() == 255


@pytest.mark.parametrize('op_name,sign', [('TranslateX', 1), ('TranslateX', -1),
                                          ('TranslateY', 1), ('TranslateY', -1)])
def test_translate_shifts_by_whole_pixels_with_black_fill(op_name, sign):
  img = _random_image(24, 32)
  magnitude = sign * _magnitude(op_name, (24, 32))
  shift = int(magnitude)
  assert abs(shift) == int(150 / 331 * (32 if op_name == 'TranslateX' else 24) * 9 / 30)
  pixels = np.asarray(img)
  axis = 1 if op_name == 'TranslateX' else 0
  expected = np.zeros_like(pixels)
  n = pixels.shape[axis]
  src = [slice(None)] * 3
  dst = [slice(None)] * 3
  src[axis] = slice(max(0, -shift), n - max(0, shift))
  dst[axis] = slice(max(0, shift), n - max(0, -shift))
  expected[tuple(dst)] = pixels[tuple(src)]
  np.testing.assert_array_equal(np.asarray(augment.apply_op(img, op_name, magnitude)), expected)


def test_equalize_spreads_equal_levels_evenly():
  # Four grey levels of 255 pixels each: the cumulative histogram maps them to 0, 85, 170, 255.
  values = np.random.default_rng(4).permutation(np.repeat([10, 20, 30, 40], 255)).reshape(30, 34)
  out = np.asarray(augment.apply_op(_gray(values), 'Equalize', 0.0))[..., 0]
  lut = {10: 0, 20: 85, 30: 170, 40: 255}
  np.testing.assert_array_equal(out, np.vectorize(lut.get)(values))


def test_unknown_op():
  with pytest.raises(ValueError, match='Unknown RandAugment op'):
    augment.apply_op(_random_image(), 'Invert', 0.0)


# The reference: torchvision's RandAugment tables and ops on PIL images.


@pytest.mark.parametrize('image_size', [(224, 224), (48, 64), (13, 7), (320, 320)])
@pytest.mark.parametrize('num_bins', [31, 10, 2])
def test_augmentation_space_matches_torchvision(image_size, num_bins):
  transforms = pytest.importorskip('torchvision.transforms', reason='torchvision is the reference')
  reference = transforms.RandAugment()._augmentation_space(num_bins, image_size)
  ours = augment_ops.augmentation_space(num_bins, image_size)
  assert list(reference) == list(ours) == list(augment_ops.OPS)
  for name, (magnitudes, signed) in reference.items():
    assert ours[name][1] == signed, name
    np.testing.assert_array_equal(ours[name][0], magnitudes.numpy().astype(np.float32),
                                  err_msg=name)


@pytest.mark.parametrize('op_name', augment_ops.OPS)
@pytest.mark.parametrize('sign', [1, -1])
def test_each_op_matches_torchvision(op_name, sign):
  pytest.importorskip('torchvision', reason='torchvision is the reference')
  from torchvision.transforms import autoaugment  # pylint: disable=g-import-not-at-top
  from torchvision.transforms import InterpolationMode  # pylint: disable=g-import-not-at-top
  img = _random_image()
  for magnitude_bin in (MAGNITUDE, BINS - 1, 3):
    magnitudes, signed = augment_ops.augmentation_space(BINS, (img.height, img.width))[op_name]
    magnitude = float(magnitudes[magnitude_bin]) if magnitudes.ndim else 0.0
    if signed:
      magnitude *= sign
    expected = autoaugment._apply_op(img, op_name, magnitude,
                                     interpolation=InterpolationMode.BILINEAR, fill=None)
    ours = augment.apply_op(img, op_name, magnitude)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(expected),
                                  err_msg=f'{op_name} magnitude {magnitude}')


def test_train_transform_matches_torchvision_for_the_same_draws():
  transforms = pytest.importorskip('torchvision.transforms', reason='torchvision is the reference')
  from torchvision.transforms import autoaugment  # pylint: disable=g-import-not-at-top
  bilinear = transforms.InterpolationMode.BILINEAR
  source = _random_image(60, 80, seed=4)
  randaugment = augment.RandAugment(num_ops=3, magnitude=MAGNITUDE)
  transform = augment.TrainTransform((32, 48), randaugment)
  for seed in range(8):
    ops = randaugment.sample_ops(np.random.default_rng(seed), (32, 48))
    reference = transforms.Resize((32, 48), interpolation=bilinear)(source)
    for name, magnitude in ops:
      reference = autoaugment._apply_op(reference, name, magnitude, interpolation=bilinear,
                                        fill=None)
    ours = transform(source, np.random.default_rng(seed))
    assert ours.dtype == np.uint8 and ours.shape == (32, 48, 3)
    np.testing.assert_array_equal(ours, np.asarray(reference), err_msg=str(ops))


def test_resize_matches_torchvision():
  transforms = pytest.importorskip('torchvision.transforms', reason='torchvision is the reference')
  source = _random_image(61, 83, seed=5)
  for size in ((32, 48), (224, 224), (61, 83)):
    expected = transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR)(source)
    np.testing.assert_array_equal(np.asarray(augment.resize_image(source, size)), expected)


# Sampling: uniform ops, random signs, determinism.


def test_ops_uniform_and_signs_balanced():
  randaugment = augment.RandAugment(num_ops=3, magnitude=MAGNITUDE)
  rng = np.random.default_rng(0)
  counts, negative, signed = collections.Counter(), 0, 0
  for _ in range(1400):
    for name, magnitude in randaugment.sample_ops(rng, (224, 224)):
      counts[name] += 1
      if name in augment_ops.SIGNED_OPS:
        signed += 1
        negative += magnitude < 0
  assert set(counts) == set(augment_ops.OPS)
  # 4200 draws over 14 ops: 300 each, standard deviation ~17.
  assert all(220 < c < 380 for c in counts.values()), counts
  assert abs(negative / signed - 0.5) < 0.05


def test_randaugment_deterministic_from_the_generator():
  img = _random_image()
  randaugment = augment.RandAugment(num_ops=3, magnitude=MAGNITUDE)
  first = randaugment(img, np.random.default_rng(7))
  again = pickle.loads(pickle.dumps(randaugment))(img, np.random.default_rng(7))
  np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
  outputs = {np.asarray(randaugment(img, np.random.default_rng(s))).tobytes() for s in range(10)}
  assert len(outputs) > 5


def _config(mode):
  config = ml_collections.ConfigDict()
  config.image_size = (16, 24)
  config.data = ml_collections.ConfigDict({
      'augment': mode, 'randaugment_num_ops': 3, 'randaugment_magnitude': 9,
      'randaugment_num_magnitude_bins': 31})
  return config


def test_make_train_transform_modes():
  img = _random_image()
  plain = augment.make_train_transform(_config('none'))
  assert plain.randaugment is None
  np.testing.assert_array_equal(plain(img, np.random.default_rng(0)),
                                np.asarray(augment.resize_image(img, (16, 24))))
  assert augment.make_train_transform(_config('device')).randaugment is None
  ra = augment.make_train_transform(_config('randaugment')).randaugment
  assert (ra.num_ops, ra.magnitude, ra.num_magnitude_bins) == (3, 9, 31)
  with pytest.raises(ValueError, match='data.augment must be one of'):
    augment.make_train_transform(_config('autoaugment'))
  with pytest.raises(ValueError, match='randaugment_magnitude'):
    augment.RandAugment(num_ops=2, magnitude=31, num_magnitude_bins=31)
