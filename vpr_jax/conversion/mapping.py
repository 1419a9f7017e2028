"""PyTorch state-dict names and layouts -> Flax variables (torchvision ResNets, family models).

Two kinds of PyTorch state dicts are understood:

* torchvision ImageNet state dicts of ResNet-18/34/50/101 (e.g. `resnet18-f37072fd.pth`), for the
  backbone. Keys of cropped stages (e.g. `layer4.*`) and of the classifier (`fc.*`) are ignored;
  every other key must match.
* whole-model checkpoints of the gsv-cities / MixVPR / mldl24-vpr family: names
  `backbone.model.<torchvision names>` and `aggregator.*` (`p` for GeM; `channel_pool.*` for
  ConvAP; `mix.<i>.mix.{0,1,3}.*`, `channel_proj.*`, `row_proj.*` for MixVPR). Every key must
  match.

In both, a `module.` prefix (DataParallel) is stripped and BatchNorm `num_batches_tracked` counters
are ignored. The names come from `transformer_mapping.torch_key`, the table that the exporter
writes with too. Mismatches are reported together (missing, unexpected and mis-shaped keys) in one
`StateDictMismatchError`. The functions take numpy state dicts (`torch_files` reads the files).
"""

import functools
from typing import Any, Callable, Mapping, Sequence

from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vpr_jax.conversion import torch_files
from vpr_jax.conversion import transformer_mapping
from vpr_jax.errors import CheckpointMismatchError
from vpr_jax.errors import StateDictMismatchError
from vpr_jax.models import aggregators
from vpr_jax.models import resnet
from vpr_jax.models import vpr_model

KINDS = ('auto', 'torchvision', 'family')


BACKBONE_PREFIX = transformer_mapping.CHECKPOINT_LAYOUTS['family'][0]


AGGREGATOR_PREFIX = transformer_mapping.AGGREGATOR_PREFIX


def detect_kind(state_dict: Mapping[str, Any]) -> str:
  """'family' (backbone.model.* / aggregator.* names) or 'torchvision' (conv1.weight, layer1.*)."""
  keys = list(torch_files.unwrap_state_dict(state_dict))
  if any(k.startswith(BACKBONE_PREFIX) for k in keys):
    return 'family'
  if 'conv1.weight' in keys:
    return 'torchvision'
  raise CheckpointMismatchError('Cannot tell the checkpoint kind: expected torchvision ResNet names '
                   f'(conv1.weight, layer1.0.conv1.weight, ...) or {BACKBONE_PREFIX}* / '
                   f'{AGGREGATOR_PREFIX}* names; the first keys are {keys[:8]}.')


def _convert(state_dict: Mapping[str, Any], expected: Mapping[str, Any],
             name_fn: Callable[[str, tuple, str], str], ignore_fn: Callable[[str], bool],
             source: str, dtype: Any = np.float32) -> dict[str, Any]:
  """Fills the tree `expected` (of ShapeDtypeStructs) from `state_dict` or raises with every issue.

  Args:
    state_dict: {torch name: tensor or array}.
    expected: {'params': ..., 'batch_stats': ...} abstract variables.
    name_fn: (collection, flax path, torch name of that path in its module, from
      `transformer_mapping.torch_key`) -> the state-dict key.
    ignore_fn: state-dict keys to skip silently.
    source: description of the state dict for error messages.
    dtype: numpy dtype of the result.

  Returns:
    Variables with the structure of `expected`, as numpy arrays of `dtype`.
  """
  state_dict = {k: torch_files.to_numpy(v)
                for k, v in torch_files.unwrap_state_dict(state_dict).items()}
  return transformer_mapping.fill_variables(
      state_dict, expected,
      lambda collection, path: name_fn(collection, path, transformer_mapping.torch_key(path)),
      ignore_fn, source, dtype)


def _abstract_variables(module, *args, **kwargs) -> dict[str, Any]:
  shapes = jax.eval_shape(lambda rng, *a: module.init(rng, *a, **kwargs), jax.random.key(0), *args)
  return {'params': shapes.get('params', {}), 'batch_stats': shapes.get('batch_stats', {})}


@functools.lru_cache(maxsize=16)
def _abstract_resnet_variables(depth: int, layers_to_crop: tuple[int, ...]) -> dict[str, Any]:
  return _abstract_variables(resnet.ResNet(depth=depth, layers_to_crop=layers_to_crop),
                             jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))


def torchvision_resnet_to_flax(state_dict: Mapping[str, Any], depth: int,
                               layers_to_crop: Sequence[int] = (),
                               source: str = 'torchvision state dict',
                               dtype: Any = np.float32) -> dict[str, Any]:
  """Converts a torchvision ResNet state dict into `resnet.ResNet` variables.

  Args:
    state_dict: torchvision names (`conv1.weight`, `layer1.0.bn1.running_mean`, ...) to tensors
      or arrays. `fc.*` and the keys of cropped stages are ignored.
    depth: 18, 34, 50 or 101.
    layers_to_crop: stages the backbone drops, () / (4,) / (3, 4).
    source: name of the state dict in error messages (e.g. the file path).
    dtype: numpy dtype of the result.

  Returns:
    {'params': ..., 'batch_stats': ...} as numpy arrays (float32 by default).
  """
  crop = tuple(int(i) for i in layers_to_crop)
  expected = _abstract_resnet_variables(int(depth), crop)
  ignored_prefixes = ('fc.',) + tuple(f'layer{i}.' for i in crop)
  return _convert(state_dict, expected, lambda collection, path, name: name,
                  lambda key: key.startswith(ignored_prefixes), source, dtype)


def aggregator_to_flax(state_dict: Mapping[str, Any], model_config, in_channels: int,
                       in_hw: Sequence[int], source: str = 'aggregator state dict') -> dict:
  """Converts the state dict of a family aggregator module (keys without `aggregator.`).

  Args:
    state_dict: e.g. {'p': ...} (GeM), {'channel_pool.weight': ...} (ConvAP),
      {'mix.0.mix.0.weight': ..., 'channel_proj.weight': ..., 'row_proj.weight': ...} (MixVPR).
    model_config: `config.model` naming and sizing the aggregator.
    in_channels: backbone output channels.
    in_hw: backbone output (H, W).
    source: name of the state dict in error messages.

  Returns:
    {'params': ...} for the aggregator module (empty for AVG).
  """
  module = aggregators.make_aggregator(model_config, in_hw)
  expected = _abstract_variables(
      module, jnp.zeros((1, int(in_hw[0]), int(in_hw[1]), int(in_channels)), jnp.float32))
  del expected['batch_stats']
  return _convert(state_dict, expected, lambda collection, path, name: name,
                  lambda key: False, source)


def family_checkpoint_to_flax(state_dict: Mapping[str, Any], config: ml_collections.ConfigDict,
                              source: str = 'checkpoint') -> dict[str, Any]:
  """Converts a gsv-cities / MixVPR / mldl24-vpr checkpoint into VPRModel variables.

  Args:
    state_dict: a state dict with `backbone.model.*` and `aggregator.*` names, or a Lightning
      checkpoint dict holding one under 'state_dict'; an optional `module.` prefix is removed.
    config: the full config describing the same model (backbone, crop, aggregator and sizes,
      image_size).
    source: name of the state dict in error messages (e.g. the file path).

  Returns:
    {'params': {'backbone', 'aggregator'}, 'batch_stats': {'backbone'}} as float32 numpy arrays.
  """
  model = vpr_model.build_model(config)
  h, w = config.image_size
  expected = _abstract_variables(model, jnp.zeros((1, int(h), int(w), 3), jnp.uint8))
  family_keys = transformer_mapping.CheckpointKeys('family')
  return _convert(state_dict, expected,
                  lambda collection, path, name: family_keys(collection, path),
                  lambda key: False, source)


def with_backbone(variables: Mapping[str, Any], backbone_variables: Mapping[str, Any]) -> dict:
  """Returns model `variables` with the backbone's params and batch_stats replaced.

  Shapes must agree leaf by leaf (a CheckpointMismatchError lists the differences otherwise).
  """
  result = {}
  for collection in ('params', 'batch_stats'):
    current = dict(variables.get(collection, {}))
    old = traverse_util.flatten_dict(current.get('backbone', {}))
    new = traverse_util.flatten_dict(backbone_variables.get(collection, {}))
    mismatched = sorted(('/'.join(p), tuple(old[p].shape), tuple(new[p].shape))
                        for p in set(old) & set(new) if tuple(old[p].shape) != tuple(new[p].shape))
    missing = sorted('/'.join(p) for p in set(old) - set(new))
    unexpected = sorted('/'.join(p) for p in set(new) - set(old))
    if missing or unexpected or mismatched:
      raise StateDictMismatchError(f'backbone {collection}', missing, unexpected, mismatched)
    current['backbone'] = backbone_variables[collection]
    result[collection] = current
  return result
