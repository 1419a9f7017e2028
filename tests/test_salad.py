"""SALAD on DINOv2 against the authors' PyTorch definitions, through the released-file mapping."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vpr_jax.conversion import transformer_mapping
from vpr_jax.models import dinov2
from vpr_jax.models import salad

torch = pytest.importorskip('torch', reason='torch is the reference implementation')
refs = pytest.importorskip('tests.torch_vpr_references')


class SaladModel(nn.Module):
  """DINOv2 (final norm applied) + SALAD, named as the released `dino_salad.ckpt`."""
  num_clusters: int
  cluster_dim: int
  token_dim: int

  def setup(self):
    self.backbone = dinov2.DinoV2(embed_dim=64, depth=2, num_heads=2, pretrained_grid=4,
                                  num_trainable_blocks=1, apply_final_norm=True)
    self.aggregator = salad.SALAD(self.num_clusters, self.cluster_dim, self.token_dim)

  def __call__(self, x, train=False):
    out = self.backbone(x)
    return self.aggregator(out['features'], out['class_token'], train=train)


def _torch_salad(seed, num_clusters, cluster_dim, token_dim):
  torch.manual_seed(seed)
  vit = refs.DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=64, depth=2,
                                   num_heads=2)
  model = refs.VPRModel(
      refs.SaladDINOv2(vit, num_trainable_blocks=1, norm_layer=True, return_token=True),
      refs.SALAD(num_channels=64, num_clusters=num_clusters, cluster_dim=cluster_dim,
                 token_dim=token_dim))
  return refs.perturb_(model.eval(), 0.1, seed)


def test_salad_descriptors_match_the_authors_model(tmp_path):
  sizes = dict(num_clusters=8, cluster_dim=16, token_dim=32)
  torch_model = _torch_salad(0, **sizes)
  # Saved and read back as the released bare state dict.
  torch.save(torch_model.state_dict(), tmp_path / 'dino_salad.ckpt')
  loaded = torch.load(tmp_path / 'dino_salad.ckpt', map_location='cpu', weights_only=True)
  state_dict = {k: v.numpy() for k, v in loaded.items()}
  assert 'backbone.model.mask_token' in state_dict and 'aggregator.dust_bin' in state_dict
  assert state_dict['aggregator.dust_bin'].shape == ()

  model = SaladModel(**sizes)
  image_hw = (70, 84)  # 5 x 6 tokens, a grid other than the learned 4 x 4.
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_hw, 3)))
  variables = transformer_mapping.checkpoint_to_flax(state_dict, shapes, 'salad')
  x = np.random.default_rng(0).normal(size=(3, 3, *image_hw)).astype(np.float32)
  with torch.no_grad():
    want = torch_model(torch.from_numpy(x)).numpy()
  got = np.asarray(model.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1))))
  assert got.shape == (3, salad.descriptor_dim(**sizes)) == (3, 32 + 16 * 8)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
  assert np.abs(got - want).max() <= 2e-4


def test_sinkhorn_matches_the_authors_solver():
  rng = np.random.default_rng(3)
  scores = rng.normal(size=(2, 5, 12)).astype(np.float32) * 3
  want = refs.get_matching_probs(torch.from_numpy(scores), torch.tensor(0.7), 3).numpy()
  got = salad.log_optimal_transport(jnp.asarray(scores), 0.7, 3)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
  # After the column update, every token's mass (times n + m) is exactly 1.
  np.testing.assert_allclose(np.exp(np.asarray(got)).sum(axis=1), 1.0, atol=1e-5)


def test_salad_trains_with_dropout_and_learns_the_dustbin():
  module = salad.SALAD(num_clusters=4, cluster_dim=8, token_dim=8, dropout_rate=0.3)
  features = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 3, 16)), jnp.float32)
  token = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16)), jnp.float32)
  params = module.init(jax.random.key(0), features, token)['params']

  def loss(p, key):
    out = module.apply({'params': p}, features, token, train=True, rngs={'dropout': key})
    return jnp.sum(out[0] * out[1])

  grads = jax.grad(loss)(params, jax.random.key(1))
  assert float(jnp.abs(grads['dust_bin'])) > 0
  a = module.apply({'params': params}, features, token, train=True,
                   rngs={'dropout': jax.random.key(1)})
  b = module.apply({'params': params}, features, token, train=True,
                   rngs={'dropout': jax.random.key(2)})
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 0  # Dropout is active in training.
  c = module.apply({'params': params}, features, token)
  d = module.apply({'params': params}, features, token)
  np.testing.assert_array_equal(np.asarray(c), np.asarray(d))


def test_salad_needs_more_tokens_than_clusters():
  module = salad.SALAD(num_clusters=9, cluster_dim=4, token_dim=4)
  with pytest.raises(ValueError, match='9 tokens for 9 clusters'):
    module.init(jax.random.key(0), jnp.zeros((1, 3, 3, 8)), jnp.zeros((1, 8)))


def test_published_descriptor_size():
  assert salad.descriptor_dim(64, 128, 256) == 8448


def test_bfloat16_compute_stays_close_to_float32():
  image = jnp.asarray(np.random.default_rng(4).normal(size=(2, 70, 84, 3)), jnp.float32)
  model = SaladModel(num_clusters=8, cluster_dim=16, token_dim=32)
  variables = model.init(jax.random.key(0), image)

  class HalfModel(SaladModel):

    def setup(self):
      self.backbone = dinov2.DinoV2(embed_dim=64, depth=2, num_heads=2, pretrained_grid=4,
                                    num_trainable_blocks=1, dtype=jnp.bfloat16)
      self.aggregator = salad.SALAD(self.num_clusters, self.cluster_dim, self.token_dim,
                                    dtype=jnp.bfloat16)

  full = np.asarray(model.apply(variables, image))
  half = HalfModel(num_clusters=8, cluster_dim=16, token_dim=32).apply(variables, image)
  assert half.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(half)))
  assert 0 < np.abs(np.asarray(half) - full).max() < 2e-2
