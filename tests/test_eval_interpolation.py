"""The evaluation resize kinds: 'bicubic' is torch's antialiased bicubic on the image tensor."""

import numpy as np
import pytest
from PIL import Image

from vpr_jax.data.evaluation import eval_pipeline
from vpr_jax.data.imaging import images

torch = pytest.importorskip('torch', reason='torch is the reference implementation')
F = pytest.importorskip('torch.nn.functional')


@pytest.mark.parametrize('size', [(40, 52), (90, 70), (64, 48)])
def test_bicubic_matches_torch_antialiased_bicubic_on_the_tensor(size):
  pixels = np.random.default_rng(0).integers(0, 256, size=(64, 48, 3), dtype=np.uint8)
  # BoQ: ToTensor() then Resize(size, BICUBIC, antialias=True) on the float tensor.
  tensor = torch.from_numpy(pixels.transpose(2, 0, 1).astype(np.float32) / 255.0)[None]
  want = F.interpolate(tensor, size=size, mode='bicubic', align_corners=False,
                       antialias=True)[0].numpy().transpose(1, 2, 0) * 255.0
  got = images.resize_bicubic_array(pixels, size)
  assert got.shape == (*size, 3) and got.dtype == np.uint8
  # Quantised to uint8: within half a level of torch's float image (plus float32 rounding).
  assert np.abs(got.astype(np.float32) - np.clip(want, 0, 255)).max() <= 0.5 + 1e-3


def test_eval_pipeline_uses_the_interpolation(tmp_path):
  pixels = np.random.default_rng(1).integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(tmp_path / 'a.png')
  batches = {}
  for kind in ('bilinear', 'bicubic'):
    batch = next(iter(eval_pipeline.make_eval_iterator(
        str(tmp_path), ['a.png'], (30, 40), 1,
        decode_options=images.DecodeOptions(interpolation=kind))))
    batches[kind] = batch['images'][0]
  np.testing.assert_array_equal(batches['bicubic'], images.resize_bicubic_array(pixels, (30, 40)))
  np.testing.assert_array_equal(batches['bilinear'],
                                np.asarray(Image.fromarray(pixels).resize((40, 30),
                                                                          Image.BILINEAR)))
  with pytest.raises(ValueError, match='valid choices: bilinear, bicubic'):
    images.DecodeOptions(interpolation='nearest')
