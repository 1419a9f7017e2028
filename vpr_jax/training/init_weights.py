"""Where a new run's weights come from, after the random initialisation.

In order: `model.backbone_weights` (torchvision ResNet or torch-hub DINOv2 state dict) ->
`init_from` (a converted or trained checkpoint: fine-tuning a released model) ->
`model.netvlad_init = 'kmeans'` (NetVLAD's centroids from k-means of backbone features of
training images). A run that resumes from its workdir's checkpoint skips all three.
"""

import copy
import os
from typing import Any, Mapping

from absl import logging
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vpr_jax.checkpoints import orbax_states
from vpr_jax.conversion import torch_files
from vpr_jax.conversion import transformer_mapping
from vpr_jax.data.training import train_pipeline
from vpr_jax.errors import CheckpointMismatchError
from vpr_jax.errors import ConfigError
from vpr_jax.models import netvlad
from vpr_jax.models import vpr_model

NETVLAD_INITS = ('random', 'kmeans')


def check_config(config: ml_collections.ConfigDict) -> None:
  """Checks init_from, model.netvlad_init and model.netvlad_kmeans_images."""
  init = str(config.model.get('netvlad_init', 'random'))
  if init not in NETVLAD_INITS:
    raise ConfigError(f'Unknown model.netvlad_init {init!r}; valid choices: '
                      f'{", ".join(NETVLAD_INITS)}.')
  if init == 'kmeans':
    if vpr_model.aggregator_name(config.model) != 'netvlad':
      raise ConfigError(f"model.netvlad_init='kmeans' needs model.aggregator='netvlad', got "
                        f'{config.model.aggregator!r}.')
    images = config.model.get('netvlad_kmeans_images', 0)
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
      raise ConfigError(f'model.netvlad_kmeans_images must be a positive integer, got {images!r}.')
  init_from = config.get('init_from', '')
  if init_from and not os.path.isdir(os.path.expanduser(init_from)):
    raise ConfigError(f'init_from={init_from!r}: no such folder (a checkpoint written by '
                      'vpr_jax.convert, or a training workdir).')


def load_vit_backbone(path: str, variables: Mapping[str, Any]) -> dict[str, Any]:
  """`variables` with the backbone params replaced by a torch-hub DINOv2 state dict's."""
  state_dict = torch_files.load_torch_state_dict(path)
  params = dict(jax.device_get(variables['params']))
  params['backbone'] = transformer_mapping.dinov2_hub_to_flax(
      state_dict, params['backbone'], source=os.fspath(path))
  return dict(variables, params=params)


def load_init_from(config: ml_collections.ConfigDict, variables: Mapping[str, Any]
                   ) -> dict[str, Any]:
  """`variables` replaced by those of the checkpoint `config.init_from` (shapes must agree)."""
  path = os.path.expanduser(config.init_from)
  _, loaded, step = orbax_states.load_for_eval(path)
  expected = {c: variables.get(c, {}) for c in ('params', 'batch_stats')}
  found = {c: loaded.get(c, {}) for c in ('params', 'batch_stats')}
  differences = orbax_states.tree_differences(expected, found)
  if differences:
    raise CheckpointMismatchError(
        f'init_from={config.init_from!r} (step {step}) does not fit this config\'s model; '
        'differences:\n  ' + '\n  '.join(differences))
  logging.info('Initialised every weight from %s (step %s).', path, step)
  return jax.tree.map(lambda x: np.asarray(x, np.float32), found)


def kmeans_netvlad(config: ml_collections.ConfigDict, variables: Mapping[str, Any], index,
                   prepared_source=None) -> dict[str, Any]:
  """`variables` with NetVLAD's params from k-means of backbone features of training images.

  The images are drawn by a training iterator of their own (seed config.seed + 1, no
  augmentation, every process reading the same images) so that the run's data order is unchanged
  and every process computes the same centroids.

  Args:
    config: the run's config (model.netvlad_num_clusters, model.netvlad_kmeans_images).
    variables: the model's variables, backbone weights already loaded.
    index: the training place index.
    prepared_source: the prepared images, if the run reads them.

  Returns:
    The variables with params['aggregator'] replaced.
  """
  sample_config = copy.deepcopy(config)
  with sample_config.unlocked():
    sample_config.data.augment = 'none'
  num_images = int(config.model.netvlad_kmeans_images)
  iterator = train_pipeline.make_train_iterator(
      index, sample_config, seed=int(config.seed) + 1, process_index=0, process_count=1,
      num_workers=0, prepared=prepared_source)
  model = vpr_model.build_model(config)
  features_of = jax.jit(lambda v, images: model.apply(v, images, train=False)['features'])
  model_variables = {'params': variables['params'], 'batch_stats': variables['batch_stats']}

  def feature_batches():
    seen = 0
    for batch in iterator:
      images = np.asarray(batch['images'])
      images = images.reshape((-1,) + images.shape[-3:])
      yield np.asarray(features_of(model_variables, jnp.asarray(images)), np.float32)
      seen += images.shape[0]
      if seen >= num_images:
        return

  per_image = netvlad.DESCRIPTORS_PER_IMAGE
  params = netvlad.init_netvlad(feature_batches(), int(config.model.netvlad_num_clusters),
                                num_descriptors=num_images * per_image, per_image=per_image,
                                seed=int(config.seed))
  close = getattr(iterator, 'close', None)
  if close is not None:
    close()
  old = traverse_util.flatten_dict(variables['params']['aggregator'])
  new = traverse_util.flatten_dict(params)
  if {k: np.shape(v) for k, v in old.items()} != {k: np.shape(v) for k, v in new.items()}:
    raise ValueError(f'k-means NetVLAD params {sorted(new)} do not fit the model {sorted(old)}.')
  logging.info('NetVLAD initialised from k-means of %d images\' backbone features.', num_images)
  all_params = dict(variables['params'], aggregator=params)
  return dict(variables, params=all_params)
