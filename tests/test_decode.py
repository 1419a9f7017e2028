"""Tests for vpr_jax.data.imaging.decode: libjpeg-turbo decodes equal Pillow's, fallbacks, DCT scaling."""

import io
from pathlib import Path

import numpy as np
from PIL import Image
import pytest

from configs import default
from vpr_jax import errors
from vpr_jax.data.imaging import decode
from vpr_jax.data.training import gsv_cities
from vpr_jax.data.imaging import images
from vpr_jax.data import synthetic
from vpr_jax.data.tfds import records
from vpr_jax.data.tfds import training_set
from vpr_jax.data.training import train_pipeline

_REAL = Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'real'
_REAL_JPEGS = sorted(_REAL.glob('**/*.jpg')) if _REAL.is_dir() else []
needs_real = pytest.mark.skipif(
    not _REAL_JPEGS, reason=f'the real test photos are not in {_REAL} (shared/data/real)')


def _pil_rgb(data: bytes) -> np.ndarray:
  """The PyTorch references' decode: Image.open(f).convert('RGB')."""
  with Image.open(io.BytesIO(data)) as img:
    return np.asarray(img.convert('RGB'))


def _encode(img: Image.Image, **kwargs) -> bytes:
  buffer = io.BytesIO()
  img.save(buffer, format='JPEG', **kwargs)
  return buffer.getvalue()


@pytest.fixture
def turbo_only(monkeypatch):
  """Makes any Pillow fallback fail, so that equality below is libjpeg-turbo's own result."""

  def refuse(data, name, min_size=None):
    raise AssertionError(f'{name} fell back to Pillow')

  monkeypatch.setattr(decode, 'decode_pil', refuse)


@needs_real
def test_real_photos_decode_exactly_like_pil(turbo_only):
  assert len(_REAL_JPEGS) >= 50
  for path in _REAL_JPEGS:
    data = path.read_bytes()
    np.testing.assert_array_equal(decode.decode_rgb(data, str(path)), _pil_rgb(data),
                                  err_msg=str(path))
    np.testing.assert_array_equal(decode.read_rgb(path), _pil_rgb(data), err_msg=str(path))


@needs_real
@pytest.mark.parametrize('quality', [50, 75, 90, 95, 100])
@pytest.mark.parametrize('subsampling', [0, 1, 2])  # 4:4:4, 4:2:2, 4:2:0
def test_reencoded_photos_decode_exactly_like_pil(turbo_only, quality, subsampling):
  for number, path in enumerate(_REAL_JPEGS[::8]):
    with Image.open(path) as source:
      img = source.convert('RGB')
    # Odd sizes exercise the chroma edge handling of the upsampler.
    img = img.resize((181 + 2 * number, 127 + number))
    variants = {
        'baseline': _encode(img, quality=quality, subsampling=subsampling),
        'progressive': _encode(img, quality=quality, subsampling=subsampling, progressive=True),
        'grey': _encode(img.convert('L'), quality=quality),
    }
    for kind, data in variants.items():
      np.testing.assert_array_equal(decode.decode_rgb(data, kind), _pil_rgb(data),
                                    err_msg=f'{path} {kind} q{quality} s{subsampling}')


def test_jpeg_stored_as_rgb_decodes_like_pil(turbo_only):
  pixels = np.random.default_rng(0).integers(0, 256, (33, 47, 3), dtype=np.uint8)
  data = _encode(Image.fromarray(pixels), quality=90, keep_rgb=True)
  np.testing.assert_array_equal(decode.decode_rgb(data, 'rgb'), _pil_rgb(data))


def test_pil_decoder_gives_the_same_pixels():
  pixels = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
  data = _encode(Image.fromarray(pixels), quality=85)
  np.testing.assert_array_equal(decode.decode_rgb(data, 'x', decoder='pil'),
                                decode.decode_rgb(data, 'x', decoder='turbo'))
  with pytest.raises(ValueError, match='decoder'):
    decode.decode_rgb(data, 'x', decoder='opencv')


def test_non_jpeg_and_cmyk_fall_back_to_pillow(tmp_path):
  pixels = np.random.default_rng(2).integers(0, 256, (30, 20, 3), dtype=np.uint8)
  img = Image.fromarray(pixels)
  cmyk = _encode(img.convert('CMYK'), quality=90)
  with Image.open(io.BytesIO(cmyk)) as reference:
    assert reference.mode == 'CMYK'
    expected = np.asarray(reference.convert('RGB'))
  np.testing.assert_array_equal(decode.decode_rgb(cmyk, 'cmyk'), expected)
  png = io.BytesIO()
  img.save(png, format='PNG')
  np.testing.assert_array_equal(decode.decode_rgb(png.getvalue(), 'png'), pixels)
  sixteen = tmp_path / 'sixteen.png'
  Image.fromarray(np.full((4, 5), 65535, dtype=np.uint16)).save(sixteen)
  assert np.all(decode.read_rgb(sixteen) == 255)


def test_broken_files_are_named_errors(tmp_path):
  pixels = np.random.default_rng(3).integers(0, 256, (40, 50, 3), dtype=np.uint8)
  data = _encode(Image.fromarray(pixels), quality=90)
  truncated = tmp_path / 'truncated.jpg'
  truncated.write_bytes(data[:len(data) // 2])
  with pytest.raises(errors.ImageDecodeError, match='truncated') as info:
    decode.read_rgb(truncated)
  assert info.value.path == str(truncated)
  garbage = tmp_path / 'garbage.jpg'
  garbage.write_bytes(b'\xff\xd8\xff' + b'\x00' * 100)
  with pytest.raises(errors.ImageDecodeError, match='garbage.jpg'):
    decode.read_rgb(garbage)
  empty = tmp_path / 'empty.jpg'
  empty.write_bytes(b'')
  with pytest.raises(errors.ImageDecodeError, match='empty file'):
    decode.read_rgb(empty)
  with pytest.raises(errors.ImageDecodeError, match='cannot read file'):
    decode.read_rgb(tmp_path / 'missing.jpg')
  with pytest.raises(errors.ImageDecodeError, match='not a recognised image format'):
    decode.decode_rgb(b'not an image', 'text')
  # The error class is still the one the rest of the package catches.


def test_decodes_into_a_given_array():
  pixels = np.random.default_rng(4).integers(0, 256, (24, 32, 3), dtype=np.uint8)
  data = _encode(Image.fromarray(pixels), quality=90)
  batch = np.zeros((2, 24, 32, 3), dtype=np.uint8)
  for decoder in decode.DECODERS:
    batch[:] = 0
    out = decode.decode_rgb(data, 'x', decoder=decoder, out=batch[1])
    assert out is batch[1] or np.shares_memory(out, batch)
    np.testing.assert_array_equal(batch[1], _pil_rgb(data))
    assert not batch[0].any()
  other = np.zeros((8, 8, 3), dtype=np.uint8)
  result = decode.decode_rgb(data, 'x', out=other)
  assert result.shape == (24, 32, 3) and not other.any()


@needs_real
def test_dct_scaled_decode_is_pillow_draft_and_close_to_exact():
  """DCT-scaled decode + exact resize stays within a small bound of the exact path."""
  mean_diffs = []
  for path in _REAL_JPEGS:
    with Image.open(path) as source:
      img = source.convert('RGB').resize((640, 480), Image.BICUBIC)
    data = _encode(img, quality=90)
    scaled = decode.decode_rgb(data, str(path), min_size=(224, 224))
    # The smallest power-of-two reduction that stays >= 224 x 224: 1/2.
    assert scaled.shape == (240, 320, 3)
    with Image.open(io.BytesIO(data)) as draft:
      draft.draft('RGB', (224, 224))
      np.testing.assert_array_equal(scaled, np.asarray(draft.convert('RGB')))
    fast = images.resize_array(scaled, (224, 224)).astype(np.int16)
    exact = images.resize_array(decode.decode_rgb(data, str(path)), (224, 224)).astype(np.int16)
    diff = np.abs(fast - exact)
    # Measured on these photos: mean |diff| <= 2.2 per image (1.0 on average), max 35.
    assert diff.mean() < 3.0, path
    assert diff.max() <= 64, path
    mean_diffs.append(diff.mean())
  assert np.mean(mean_diffs) < 1.5


def test_dct_scale_never_goes_below_the_target():
  pixels = np.random.default_rng(5).integers(0, 256, (450, 700, 3), dtype=np.uint8)
  data = _encode(Image.fromarray(pixels), quality=80)
  for target, expected in [((224, 224), (225, 350)), ((226, 100), (450, 700)),
                           ((56, 87), (57, 88)), ((10, 10), (57, 88))]:
    assert decode.decode_rgb(data, 'x', min_size=target).shape[:2] == expected, target


def _train_config(image_size, decode_mode, augment='none'):
  config = default.get_config()
  config.image_size = image_size
  config.num_epochs = 1
  data = config.data
  data.cities = ('SynthA', 'SynthB')
  data.places_per_batch = 4
  data.images_per_place = 2
  data.min_img_per_place = 2
  data.augment = augment
  data.decode = decode_mode
  return config


@pytest.fixture(scope='module')
def prepared_places(tmp_path_factory):
  root = tmp_path_factory.mktemp('decode_train')
  summary = synthetic.make_training_places(str(root), seed=0, num_train_places=8,
                                           images_per_place=2, image_size=(96, 128),
                                           cities=('SynthA', 'SynthB'), layouts=('gsv_cities',))
  index = gsv_cities.build_place_index(summary['gsv_cities_dir'], 'gsv_cities',
                                       ['SynthA', 'SynthB'], 2)
  folder = training_set.build_training_set(
      summary['gsv_cities_dir'], str(root / 'tfds'), layout='gsv_cities',
      cities=('SynthA', 'SynthB'), min_img_per_place=2,
      encoding=records.ImageEncoding((32, 48)))
  return index, training_set.open_training_set(folder)


def _all_batches(index, config, source=None, num_workers=0):
  with train_pipeline.make_train_iterator(index, config, seed=3, num_workers=num_workers,
                                          prepared=source) as it:
    return [next(it) for _ in range(it.num_steps)]


@pytest.mark.parametrize('augment', ['none', 'randaugment'])
def test_pipeline_pixels_equal_pillow_path(prepared_places, augment):
  index, (prepared_index, source) = prepared_places
  for idx, src, size in [(index, None, (32, 48)), (prepared_index, source, (32, 48)),
                         (index, None, (96, 128))]:
    pil = _all_batches(idx, _train_config(size, 'pil', augment), src)
    turbo = _all_batches(idx, _train_config(size, 'exact', augment), src)
    assert len(pil) == len(turbo) == 2
    for a, b in zip(pil, turbo):
      np.testing.assert_array_equal(a['images'], b['images'])
      np.testing.assert_array_equal(a['labels'], b['labels'])


def test_pipeline_worker_batches_equal_in_process_ones(prepared_places):
  _, (prepared_index, source) = prepared_places
  config = _train_config((32, 48), 'exact')
  in_process = _all_batches(prepared_index, config, source, num_workers=0)
  in_worker = _all_batches(prepared_index, config, source, num_workers=1)
  for a, b in zip(in_process, in_worker):
    assert type(b['images']) is np.ndarray and b['images'].shape == (4, 2, 32, 48, 3)
    np.testing.assert_array_equal(a['images'], b['images'])
    np.testing.assert_array_equal(a['labels'], b['labels'])


def test_pipeline_dct_scaled_decode_is_close_to_exact(prepared_places):
  index, _ = prepared_places
  exact = _all_batches(index, _train_config((32, 48), 'exact'))
  fast = _all_batches(index, _train_config((32, 48), 'dct_scaled'))
  for a, b in zip(exact, fast):
    diff = np.abs(a['images'].astype(np.int16) - b['images'])
    assert 0 < diff.mean() < 6.0
    np.testing.assert_array_equal(a['labels'], b['labels'])


def test_unknown_decode_mode_is_rejected(prepared_places):
  index, _ = prepared_places
  with pytest.raises(ValueError, match='data.decode'):
    train_pipeline.make_train_iterator(index, _train_config((32, 48), 'fastest'), seed=0,
                                       num_workers=0)


def test_decode_stored_refuses_empty_records_and_decodes_the_rest():
  with pytest.raises(errors.ImageDecodeError, match='could not be decoded when the data was '
                     'prepared') as error:
    decode.decode_stored(b'', 'a.jpg (record 3)')
  assert error.value.path == 'a.jpg (record 3)'
  pixels = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
  data = images.encode_jpeg(Image.fromarray(pixels), 95, '4:2:0')
  np.testing.assert_array_equal(decode.decode_stored(data, 'x'), _pil_rgb(data))
