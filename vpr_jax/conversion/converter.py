"""A PyTorch checkpoint of the family -> an inference checkpoint that `vpr_jax.eval` loads.

file -> `torch_files.load_torch_state_dict` -> `mapping` (names and layouts -> Flax variables) ->
`checkpoints.orbax_states.save_inference_checkpoint` (config.json + variables, written whole or
not at all). Also the ImageNet backbone weights of a training run (`load_torchvision_backbone`).
"""

import copy
import os
import sys
from typing import Any, Mapping

from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vpr_jax.checkpoints import orbax_states
from vpr_jax.conversion import mapping
from vpr_jax.conversion import torch_files
from vpr_jax.conversion import transformer_mapping
from vpr_jax.errors import CheckpointMismatchError
from vpr_jax.errors import ConfigError
from vpr_jax.models import aggregators
from vpr_jax.models import vpr_model

def load_torchvision_backbone(path: str, model_config) -> dict[str, Any]:
  """Reads torchvision ImageNet weights (e.g. resnet18-f37072fd.pth) for the configured backbone.

  Args:
    path: the `.pth` file (never downloaded).
    model_config: `config.model` (backbone and layers_to_crop).

  Returns:
    Backbone {'params': ..., 'batch_stats': ...}, to place under the model's 'backbone' entries
    (see `with_backbone`).
  """
  state_dict = torch_files.load_torch_state_dict(path)
  return mapping.torchvision_resnet_to_flax(state_dict, vpr_model.backbone_depth(model_config),
                                    tuple(model_config.layers_to_crop), source=os.fspath(path))


# Released whole-model layouts of SALAD and BoQ (`transformer_mapping.CHECKPOINT_LAYOUTS`).
RELEASED_LAYOUTS = ('salad', 'boq_dinov2', 'boq_resnet')
KINDS = mapping.KINDS + RELEASED_LAYOUTS


def detect_kind(state_dict: Mapping[str, Any]) -> str:
  """The file's layout from its keys: a released SALAD / BoQ layout, 'family' or 'torchvision'.

  `backbone.dino.*` is BoQ-DINOv2, `backbone.net.*` BoQ-ResNet, `backbone.model.blocks.*` (a hub
  ViT) SALAD; other `backbone.model.*` files are the family's (ResNet backbones, NetVLAD too).
  """
  keys = list(torch_files.unwrap_state_dict(state_dict))
  for layout in ('boq_dinov2', 'boq_resnet'):
    prefix = transformer_mapping.CHECKPOINT_LAYOUTS[layout][0]
    if any(k.startswith(prefix) for k in keys):
      return layout
  if any(k.startswith('backbone.model.blocks.') for k in keys):
    return 'salad'
  return mapping.detect_kind(state_dict)


def released_checkpoint_to_flax(state_dict: Mapping[str, Any], config: ml_collections.ConfigDict,
                                layout: str, source: str = 'checkpoint') -> dict[str, Any]:
  """Converts a released SALAD / BoQ file (or a family NetVLAD) into the config's variables.

  Args:
    state_dict: the file's state dict (a Lightning dict holding one under 'state_dict' and a
      `module.` prefix are accepted).
    config: the full config of the same model.
    layout: a `transformer_mapping.CHECKPOINT_LAYOUTS` name.
    source: the file's name in error messages.

  Returns:
    {'params': ..., 'batch_stats': ...} as float32 numpy arrays (batch_stats empty for a ViT).
  """
  state_dict = torch_files.unwrap_state_dict(state_dict)
  model = vpr_model.build_model(config)
  expected = jax.eval_shape(lambda: vpr_model.init_variables(model, jax.random.key(0)))
  variables = transformer_mapping.checkpoint_to_flax(state_dict, expected, layout, source=source)
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def _adapt_config_to_checkpoint(config: ml_collections.ConfigDict,
                                state_dict: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Copies `config`, setting choices that the checkpoint itself settles (MixVPR row_proj bias)."""
  config = copy.deepcopy(config)
  keys = set(state_dict)
  if (str(config.model.aggregator).lower() == 'mixvpr'
      and mapping.AGGREGATOR_PREFIX + 'row_proj.weight' in keys):
    with config.unlocked():
      config.model.mixvpr_row_proj_bias = mapping.AGGREGATOR_PREFIX + 'row_proj.bias' in keys
  return config


def _with_new_aggregator(config: ml_collections.ConfigDict,
                         backbone: Mapping[str, Any]) -> dict[str, Any]:
  """Whole-model variables: `backbone` plus a freshly initialised aggregator (config.seed)."""
  model = vpr_model.build_model(config)
  abstract = jax.eval_shape(lambda: vpr_model.init_variables(model, jax.random.key(0)))
  h, w, c = vpr_model.backbone_output_shape(config.model, config.image_size)
  aggregator = aggregators.make_aggregator(config.model, (h, w))
  # Only the aggregator is initialised: a whole-model init would also draw (and compile the
  # random programs for) every backbone weight, to be thrown away.
  aggregator_params = jax.jit(aggregator.init)(
      jax.random.key(int(config.seed)), jnp.zeros((1, h, w, c), jnp.float32)).get('params', {})
  variables = {'params': {'backbone': backbone['params']},
               'batch_stats': {'backbone': backbone['batch_stats']}}
  if aggregator_params:
    variables['params']['aggregator'] = aggregator_params
  found = {k: np.shape(v) for k, v in traverse_util.flatten_dict(variables).items()}
  wanted = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(abstract)).items()}
  if found != wanted:
    differences = sorted('/'.join(k) for k in set(found) ^ set(wanted))
    differences += sorted('/'.join(k) for k in set(found) & set(wanted) if found[k] != wanted[k])
    raise ValueError(f'Converted variables do not match the model at: {differences}.')
  return variables


def convert_checkpoint(config: ml_collections.ConfigDict, torch_checkpoint: str, out: str,
                       kind: str = 'auto', overwrite: bool = False
                       ) -> tuple[ml_collections.ConfigDict, dict]:
  """Converts a PyTorch file and writes an inference checkpoint that `vpr_jax.eval` loads.

  Nothing is written unless the whole conversion succeeds.

  Args:
    config: the full config of the model the weights belong to.
    torch_checkpoint: `.pth` / `.ckpt` path.
    out: output checkpoint directory (must not exist or be empty, unless `overwrite`).
    kind: 'auto' (from the keys), 'torchvision' (backbone only: the aggregator is initialised from
      config.seed), 'family' (whole model) or a released layout: 'salad' (`dino_salad.ckpt`),
      'boq_dinov2' (`dinov2_12288.pth`), 'boq_resnet' (`resnet50_16384.pth`).
    overwrite: replace a non-empty `out` that holds a checkpoint written by this function (and
      nothing else: a folder with other files is refused).

  Returns:
    (the config saved with the checkpoint, the variables written).
  """
  if kind not in KINDS:
    raise ConfigError(f'Unknown kind {kind!r}; valid choices: {", ".join(KINDS)}.')
  # Fails before the slow part: a file, a folder that is not empty, or (overwrite) one holding
  # anything this converter did not write.
  orbax_states.check_inference_checkpoint_target(out, overwrite, '--out')
  state_dict = torch_files.load_torch_state_dict(torch_checkpoint)
  if kind == 'auto':
    kind = detect_kind(state_dict)
  source = os.fspath(torch_checkpoint)
  vit = vpr_model.is_vit(config.model)
  if kind in RELEASED_LAYOUTS or (kind == 'family' and vpr_model.aggregator_name(config.model)
                                  in vpr_model.NEW_AGGREGATORS):
    if (transformer_mapping.CHECKPOINT_LAYOUTS[kind][1] == 'vit') != vit:
      raise CheckpointMismatchError(
          f'{source} has the {kind} layout (a {"ViT" if not vit else "ResNet"} backbone) but the '
          f'config\'s model.backbone is {config.model.backbone!r}; pass the matching --config.')
    variables = released_checkpoint_to_flax(state_dict, config, kind, source=source)
  elif vit:
    raise CheckpointMismatchError(
        f'{source} holds a {kind} ResNet checkpoint but the config\'s model.backbone is '
        f'{config.model.backbone!r}; pass the matching --config.')
  elif kind == 'family':
    config = _adapt_config_to_checkpoint(config, state_dict)
    variables = mapping.family_checkpoint_to_flax(state_dict, config, source=source)
  else:
    backbone = mapping.torchvision_resnet_to_flax(
        state_dict, vpr_model.backbone_depth(config.model), tuple(config.model.layers_to_crop),
        source=source)
    variables = jax.tree.map(np.asarray, _with_new_aggregator(config, backbone))
    print(f'{source}: backbone only; the {config.model.aggregator} aggregator is randomly '
          f'initialised (seed {config.seed}).', file=sys.stderr)
  orbax_states.save_inference_checkpoint(out, config, variables, overwrite=overwrite)
  return config, variables
