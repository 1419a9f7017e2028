"""Tests for vpr_jax.data.imaging.images: decoding of good and bad files, torchvision-exact resize."""

import io
import pickle

import numpy as np
from PIL import Image
from PIL import ImageFile
import pytest

from vpr_jax import errors
from vpr_jax.data.imaging import images


def _pixels(shape, seed=0):
  return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


@pytest.fixture(scope='module')
def good_jpeg(tmp_path_factory):
  path = tmp_path_factory.mktemp('images') / 'good.jpg'
  Image.fromarray(_pixels((40, 50, 3))).save(path, quality=90)
  return path


def test_rgb_jpeg_decodes_like_pil(good_jpeg):
  img = images.load_rgb(good_jpeg)
  assert img.mode == 'RGB' and img.size == (50, 40)
  with Image.open(good_jpeg) as reference:
    np.testing.assert_array_equal(np.asarray(img), np.asarray(reference.convert('RGB')))


@pytest.mark.parametrize('cut', [0.5, 0.9])
def test_truncated_jpeg_is_an_error(good_jpeg, tmp_path, cut):
  data = good_jpeg.read_bytes()
  path = tmp_path / 'truncated.jpg'
  path.write_bytes(data[:int(len(data) * cut)])
  with pytest.raises(errors.ImageDecodeError, match='truncated') as info:
    images.load_rgb(path)
  assert info.value.path == str(path)


def test_jpeg_missing_only_its_end_marker_is_an_error(good_jpeg, tmp_path):
  path = tmp_path / 'no_eoi.jpg'
  path.write_bytes(good_jpeg.read_bytes()[:-2])
  with pytest.raises(errors.ImageDecodeError):
    images.load_rgb(path)


def test_zero_byte_file(tmp_path):
  path = tmp_path / 'empty.jpg'
  path.write_bytes(b'')
  with pytest.raises(errors.ImageDecodeError, match='empty file') as info:
    images.load_rgb(path)
  assert str(path) in str(info.value)


def test_corrupt_header(good_jpeg, tmp_path):
  data = bytearray(good_jpeg.read_bytes())
  data[2:40] = _pixels((38,), seed=1).tobytes()
  path = tmp_path / 'corrupt.jpg'
  path.write_bytes(bytes(data))
  with pytest.raises(errors.ImageDecodeError):
    images.load_rgb(path)


def test_corrupt_png_data(tmp_path):
  path = tmp_path / 'corrupt.png'
  Image.fromarray(_pixels((30, 30))).save(path)
  data = bytearray(path.read_bytes())
  data[60:90] = bytes(30)
  path.write_bytes(bytes(data))
  with pytest.raises(errors.ImageDecodeError):
    images.load_rgb(path)


def test_text_file(tmp_path):
  path = tmp_path / 'notes.jpg'
  path.write_text('not an image\n')
  with pytest.raises(errors.ImageDecodeError, match='not a recognised image format'):
    images.load_rgb(path)


def test_missing_file(tmp_path):
  with pytest.raises(errors.ImageDecodeError, match='cannot read file'):
    images.load_rgb(tmp_path / 'missing.jpg')


@pytest.mark.parametrize('suffix', ['.png', '.jpg'])
def test_grayscale_becomes_three_equal_channels(tmp_path, suffix):
  path = tmp_path / f'gray{suffix}'
  Image.fromarray(_pixels((20, 30))).save(path)
  img = images.load_rgb(path)
  pixels = images.to_uint8_array(img)
  assert pixels.shape == (20, 30, 3)
  with Image.open(path) as reference:
    gray = np.asarray(reference)
  for channel in range(3):
    np.testing.assert_array_equal(pixels[..., channel], gray)


def test_cmyk_jpeg_converts_like_pil(tmp_path):
  path = tmp_path / 'cmyk.jpg'
  Image.fromarray(_pixels((20, 30, 3))).convert('CMYK').save(path)
  with Image.open(path) as reference:
    assert reference.mode == 'CMYK'
    expected = np.asarray(reference.convert('RGB'))
  np.testing.assert_array_equal(np.asarray(images.load_rgb(path)), expected)


def test_png_with_alpha_is_composited_on_black(tmp_path):
  rgb = _pixels((16, 16, 3), seed=2)
  alpha = np.zeros((16, 16), np.uint8)
  alpha[:, 4:8] = 255
  alpha[:, 8:12] = 128
  path = tmp_path / 'rgba.png'
  Image.fromarray(np.dstack([rgb, alpha]), 'RGBA').save(path)
  out = np.asarray(images.load_rgb(path)).astype(int)
  assert (out[:, :4] == 0).all()  # Fully transparent: black.
  np.testing.assert_array_equal(out[:, 4:8], rgb[:, 4:8])  # Opaque: unchanged.
  np.testing.assert_allclose(out[:, 8:12], rgb[:, 8:12].astype(float) * 128 / 255, atol=1.0)
  assert (out[:, 12:] == 0).all()


def test_grayscale_with_alpha_and_palette_with_transparency(tmp_path):
  gray = _pixels((8, 8), seed=3)
  alpha = np.full((8, 8), 255, np.uint8)
  alpha[0] = 0
  path = tmp_path / 'la.png'
  Image.fromarray(np.dstack([gray, alpha]), 'LA').save(path)
  out = np.asarray(images.load_rgb(path))
  assert (out[0] == 0).all()
  np.testing.assert_array_equal(out[1:, :, 1], gray[1:])

  palette_img = Image.fromarray(_pixels((8, 8, 3), seed=4)).convert('P')
  palette_img.info['transparency'] = int(np.asarray(palette_img)[0, 0])
  path = tmp_path / 'p.png'
  palette_img.save(path, transparency=palette_img.info['transparency'])
  out = np.asarray(images.load_rgb(path))
  assert out.shape == (8, 8, 3)
  assert (out[0, 0] == 0).all()


def test_sixteen_bit_grayscale_is_scaled(tmp_path):
  values = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
  path = tmp_path / 'g16.png'
  Image.fromarray(values).save(path)
  with Image.open(path) as raw:
    assert raw.mode.startswith('I')
  out = np.asarray(images.load_rgb(path))
  np.testing.assert_array_equal(out[..., 0], [[0, 1, 255, 128]])
  np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_load_truncated_images_flag_is_refused(good_jpeg, monkeypatch):
  monkeypatch.setattr(ImageFile, 'LOAD_TRUNCATED_IMAGES', True)
  with pytest.raises(RuntimeError, match='LOAD_TRUNCATED_IMAGES'):
    images.load_rgb(good_jpeg)


def test_decode_error_pickles():
  error = pickle.loads(pickle.dumps(errors.ImageDecodeError('/a/b.jpg', 'broken')))
  assert isinstance(error, errors.ImageDecodeError)
  assert error.path == '/a/b.jpg' and error.reason == 'broken'
  assert '/a/b.jpg' in str(error)


def test_draft_decodes_smaller_but_not_below_target(tmp_path):
  path = tmp_path / 'big.jpg'
  Image.fromarray(_pixels((256, 320, 3))).save(path, quality=90)
  img = images.load_rgb(path, draft_size=(64, 60))
  assert img.mode == 'RGB'
  assert img.size[0] < 320 and img.size[0] >= 60 and img.size[1] >= 64


def test_to_uint8_array_and_resized_array(good_jpeg):
  array = images.to_uint8_array(images.load_rgb(good_jpeg))
  assert array.dtype == np.uint8 and array.shape == (40, 50, 3) and array.flags.writeable
  resized = images.load_resized_array(good_jpeg, (24, 32))
  assert resized.shape == (24, 32, 3)
  with pytest.raises(ValueError):
    images.to_uint8_array(Image.new('L', (4, 4)))


def test_resize_rejects_bad_sizes(good_jpeg):
  img = images.load_rgb(good_jpeg)
  for size in [(0, 4), (4,), (4.5, 4)]:
    with pytest.raises(ValueError):
      images.resize(img, size)


@pytest.mark.parametrize('source_hw, target_hw', [
    ((480, 640), (224, 224)),  # Downscale (antialiased), aspect change.
    ((37, 53), (224, 224)),  # Upscale.
    ((120, 90), (64, 48)),
    ((64, 64), (64, 64)),  # Same size: torchvision returns the image as is.
    ((100, 30), (33, 77)),
])
def test_resize_matches_torchvision(tmp_path, source_hw, target_hw):
  transforms = pytest.importorskip('torchvision.transforms',
                                   reason='torchvision is the reference for Resize')
  path = tmp_path / 'photo.jpg'
  Image.fromarray(_pixels((*source_hw, 3), seed=5)).save(path, quality=90)
  img = images.load_rgb(path)
  expected = transforms.Resize(target_hw)(img)
  ours = images.resize(img, target_hw)
  assert ours.size == expected.size == (target_hw[1], target_hw[0])
  np.testing.assert_array_equal(images.to_uint8_array(ours), np.asarray(expected))


def test_resized_size_short_side_follows_torchvision_resize():
  transforms = pytest.importorskip('torchvision.transforms',
                                   reason='torchvision defines the Resize(int) size rule')
  for width, height, side in ((640, 480, 256), (480, 640, 224), (333, 101, 50), (64, 64, 32)):
    img = Image.new('RGB', (width, height))
    expected = transforms.Resize(side)(img).size
    assert images.resized_size(width, height, None, side) == expected
  assert images.resized_size(640, 480, (224, 200), None) == (200, 224)
  assert images.resized_size(640, 480, None, None) == (640, 480)


@pytest.mark.parametrize('subsampling', sorted(images.SUBSAMPLING))
def test_encode_jpeg_quality_and_subsampling(subsampling):
  from PIL import JpegImagePlugin  # pylint: disable=g-import-not-at-top
  pixels = np.random.default_rng(1).integers(0, 256, (16, 24, 3), dtype=np.uint8)
  data = images.encode_jpeg(Image.fromarray(pixels), 80, subsampling)
  with Image.open(io.BytesIO(data)) as img:
    assert img.format == 'JPEG' and img.size == (24, 16)
    assert JpegImagePlugin.get_sampling(img) == images.SUBSAMPLING[subsampling]
