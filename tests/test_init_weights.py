"""Where a new run's weights come from: init_from (fine-tuning) and k-means NetVLAD."""

import jax
import numpy as np
import pytest

from tests import test_training
from vpr_jax import errors
from vpr_jax.checkpoints import orbax_states
from vpr_jax.models import vpr_model
from vpr_jax.training import setup


def run_config(synthetic_root, cache_dir, aggregator='netvlad'):
  """test_training's tiny run (ResNet-18 cut after layer2, 32x32, P=8 K=2) with `aggregator`."""
  config = test_training.run_config(synthetic_root, cache_dir)
  config.model.aggregator = aggregator
  config.model.netvlad_num_clusters = 4
  config.model.netvlad_kmeans_images = 16
  config.num_epochs = 1
  return config


def _params(run):
  return jax.tree.map(np.asarray, run.host_state().params)


def test_kmeans_netvlad_replaces_the_random_aggregator(synthetic_root, tmp_path):
  config = run_config(synthetic_root, tmp_path / 'cache')
  random_params = _params(setup.setup_run(config, str(tmp_path / 'random')))
  config.model.netvlad_init = 'kmeans'
  first = _params(setup.setup_run(config, str(tmp_path / 'kmeans')))
  again = _params(setup.setup_run(config, str(tmp_path / 'kmeans_again')))

  # The backbone is untouched; the aggregator is k-means's (deterministic for a seed).
  jax.tree.map(np.testing.assert_array_equal, first['backbone'], random_params['backbone'])
  jax.tree.map(np.testing.assert_array_equal, first['aggregator'], again['aggregator'])
  centroids = first['aggregator']['centroids']
  kernel = first['aggregator']['conv']['kernel'][0, 0]  # [C, K]
  assert centroids.shape == (4, 128) and kernel.shape == (128, 4)
  assert not np.allclose(centroids, random_params['aggregator']['centroids'])
  # k-means of unit-norm features: centroids inside the unit ball, conv = alpha * unit centroid.
  norms = np.linalg.norm(centroids, axis=1)
  assert np.all(norms <= 1.0 + 1e-5) and np.all(norms > 0.1)
  unit = centroids / norms[:, None]
  alpha = np.linalg.norm(kernel, axis=0)
  np.testing.assert_allclose(kernel / alpha, unit.T, atol=1e-5)
  assert np.all(alpha > 1.0) and np.allclose(alpha, alpha[0])


def test_init_from_starts_training_from_a_checkpoint(synthetic_root, tmp_path):
  config = run_config(synthetic_root, tmp_path / 'cache', aggregator='gem')
  model = vpr_model.build_model(config)
  saved = jax.tree.map(np.asarray, vpr_model.init_variables(model, jax.random.PRNGKey(7)))
  orbax_states.save_inference_checkpoint(str(tmp_path / 'converted'), config, saved)
  config.init_from = str(tmp_path / 'converted')
  run = setup.setup_run(config, str(tmp_path / 'run'))
  jax.tree.map(np.testing.assert_array_equal, _params(run), saved['params'])
  jax.tree.map(np.testing.assert_array_equal,
               jax.tree.map(np.asarray, run.host_state().batch_stats), saved['batch_stats'])

  # A checkpoint of another model: the differences are listed, nothing is written.
  config.model.aggregator = 'netvlad'
  with pytest.raises(errors.CheckpointMismatchError, match='aggregator'):
    setup.setup_run(config, str(tmp_path / 'other'))
  assert not (tmp_path / 'other').exists()


def test_config_mistakes_name_the_field(synthetic_root, tmp_path):
  config = run_config(synthetic_root, tmp_path / 'cache', aggregator='mixvpr')
  config.model.netvlad_init = 'kmeans'
  with pytest.raises(errors.ConfigError, match="netvlad_init='kmeans' needs"):
    setup.check_config(config)
  config = run_config(synthetic_root, tmp_path / 'cache')
  config.init_from = str(tmp_path / 'missing')
  with pytest.raises(errors.ConfigError, match='init_from=.*no such folder'):
    setup.check_config(config)
  config = run_config(synthetic_root, tmp_path / 'cache')
  config.data.eval_interpolation = 'nearest'
  with pytest.raises(errors.ConfigError, match='eval_interpolation.*bilinear, bicubic'):
    setup.check_config(config)
  config = run_config(synthetic_root, tmp_path / 'cache')
  config.model.backbone = 'dinov2_vits14'
  config.model.aggregator = 'salad'
  config.image_size = (32, 32)
  with pytest.raises(errors.ConfigError, match=r'image_size=\(32, 32\).*multiples of .*14'):
    setup.check_config(config)
  config.image_size = (28, 28)
  config.model.num_trainable_blocks = 13
  with pytest.raises(errors.ConfigError, match='num_trainable_blocks must be in -1..12'):
    setup.check_config(config)
  config = run_config(synthetic_root, tmp_path / 'cache', aggregator='salad')
  with pytest.raises(errors.ConfigError, match='salad needs a DINOv2 backbone'):
    setup.check_config(config)
  config = run_config(synthetic_root, tmp_path / 'cache', aggregator='mixvpr')
  config.eval_image_size = (64, 64)
  with pytest.raises(errors.ConfigError, match='MixVPR'):
    setup.check_config(config)

