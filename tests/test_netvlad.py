"""NetVLAD on the cropped ResNet-18 against the family's PyTorch definition and Lightning layout."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vpr_jax.conversion import transformer_mapping
from vpr_jax.models import netvlad
from vpr_jax.models import resnet

torch = pytest.importorskip('torch', reason='torch is the reference implementation')
torchvision = pytest.importorskip('torchvision', reason='torchvision builds the reference ResNet')
refs = pytest.importorskip('tests.torch_vpr_references')

NUM_CLUSTERS = 8


class FamilyResNet(torch.nn.Module):
  """The gsv-cities backbone wrapper: torchvision ResNet as `model`, layer4 cropped."""

  def __init__(self):
    super().__init__()
    self.model = torchvision.models.resnet18(weights=None)
    self.model.avgpool = None
    self.model.fc = None
    self.model.layer4 = None

  def forward(self, x):
    m = self.model
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    return m.layer3(m.layer2(m.layer1(x)))


class NetVLADModel(nn.Module):

  def setup(self):
    self.backbone = resnet.ResNet(depth=18, layers_to_crop=(4,), layers_to_freeze=2)
    self.aggregator = netvlad.NetVLAD(num_clusters=NUM_CLUSTERS)

  def __call__(self, x, train=False):
    return self.aggregator(self.backbone(x, train=train)['features'])


def test_netvlad_descriptors_match_the_family_model(tmp_path):
  torch.manual_seed(0)
  torch_model = refs.VPRModel(FamilyResNet(), refs.NetVLAD(clusters_num=NUM_CLUSTERS, dim=256))
  # Initialised from k-means as the family does, so that the assignment is not degenerate.
  descriptors = np.random.default_rng(0).normal(size=(500, 256)).astype(np.float32)
  descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
  centroids = netvlad.kmeans_centroids(descriptors, NUM_CLUSTERS, iterations=10)
  torch_model.aggregator.init_params(centroids, descriptors)
  torch_model = refs.perturb_(torch_model.eval(), 0.05, 0)
  torch.save({'state_dict': torch_model.state_dict()}, tmp_path / 'netvlad.ckpt')
  loaded = torch.load(tmp_path / 'netvlad.ckpt', map_location='cpu', weights_only=True)
  state_dict = {k: v.numpy() for k, v in loaded['state_dict'].items()}
  assert {'aggregator.conv.weight', 'aggregator.centroids'} <= set(state_dict)

  model = NetVLADModel()
  image_hw = (64, 48)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_hw, 3)))
  variables = transformer_mapping.checkpoint_to_flax(state_dict, shapes, 'family')
  x = np.random.default_rng(1).normal(size=(2, 3, *image_hw)).astype(np.float32)
  with torch.no_grad():
    want = torch_model(torch.from_numpy(x)).numpy()
  got = np.asarray(model.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1))))
  assert got.shape == (2, netvlad.descriptor_dim(NUM_CLUSTERS, 256))
  assert np.abs(got - want).max() <= 2e-4


def test_initialisation_matches_the_family_init_params():
  rng = np.random.default_rng(2)
  descriptors = rng.normal(size=(300, 16)).astype(np.float32)
  centroids = rng.normal(size=(4, 16)).astype(np.float32)
  reference = refs.NetVLAD(clusters_num=4, dim=16)
  reference.init_params(centroids.copy(), descriptors)
  params = netvlad.params_from_centroids(centroids, descriptors)
  np.testing.assert_allclose(params['conv']['kernel'],
                             reference.conv.weight.detach().numpy().transpose(2, 3, 1, 0),
                             rtol=1e-5)
  np.testing.assert_array_equal(params['centroids'], reference.centroids.detach().numpy())


def test_init_netvlad_finds_the_clusters_of_the_features():
  # Four well separated directions; features drawn around them on a 5x5 grid per image.
  rng = np.random.default_rng(3)
  centers = np.eye(4, 8, dtype=np.float32) * 10
  labels = rng.integers(0, 4, size=(6, 5, 5))
  features = centers[labels] + rng.normal(size=(6, 5, 5, 8)).astype(np.float32) * 0.5
  batches = [features[:3], features[3:]]
  descriptors = netvlad.sample_local_descriptors(batches, num_descriptors=120, per_image=20)
  assert descriptors.shape == (120, 8)
  np.testing.assert_allclose(np.linalg.norm(descriptors, axis=1), 1.0, rtol=1e-5)
  params = netvlad.init_netvlad(batches, num_clusters=4, num_descriptors=120, per_image=20,
                                iterations=20)
  found = params['centroids'] / np.linalg.norm(params['centroids'], axis=1, keepdims=True)
  # Every true direction has a centroid within a few degrees.
  assert np.all(np.max(found @ np.eye(4, 8).T, axis=0) > 0.95)
  # The initialised layer assigns features of the same direction to the same cluster.
  module = netvlad.NetVLAD(num_clusters=4)
  x = jnp.asarray(features)
  logits = np.asarray(jnp.einsum('bhwc,ck->bhwk', x / jnp.linalg.norm(x, axis=-1, keepdims=True),
                                 params['conv']['kernel'][0, 0]))
  hard = logits.argmax(-1)
  for label in range(4):
    assert len(np.unique(hard[labels == label])) == 1
  out = module.apply({'params': params}, x)
  assert out.shape == (6, 32)
