"""The VPR model: ImageNet normalisation, ResNet backbone and aggregator, built from a config."""

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vpr_jax.errors import ConfigError
from vpr_jax.models import aggregators
from vpr_jax.models import resnet

BACKBONES = {'resnet18': 18, 'resnet34': 34, 'resnet50': 50, 'resnet101': 101}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
_AGGREGATOR_TYPES = {'avg': 'AVG', 'gem': 'GeM', 'convap': 'ConvAP', 'mixvpr': 'MixVPR'}


def resolve_dtype(name: Any) -> Any:
  """Compute dtype from its config name.

  Args:
    name: 'auto' (bfloat16 on GPU/TPU, float32 on CPU), 'float32' or 'bfloat16' (or a dtype).

  Returns:
    The jnp dtype.
  """
  if not isinstance(name, str):
    return jnp.dtype(name).type
  if name == 'auto':
    return jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16
  if name not in _DTYPES:
    raise ConfigError(f'Unknown model.dtype {name!r}; valid choices: auto, {", ".join(_DTYPES)}.')
  return _DTYPES[name]


def backbone_depth(model_config) -> int:
  """ResNet depth of `model_config.backbone` ('resnet18' -> 18); ValueError if unknown."""
  name = str(model_config.backbone).lower()
  if name not in BACKBONES:
    raise ConfigError(f'Unknown model.backbone {model_config.backbone!r}; valid choices: '
                     f'{", ".join(BACKBONES)}.')
  return BACKBONES[name]


def backbone_output_shape(model_config, image_size: Sequence[int]) -> tuple[int, int, int]:
  """(H, W, C) of the backbone features for images of `image_size` (H, W)."""
  depth = backbone_depth(model_config)
  crop = tuple(model_config.layers_to_crop)
  h, w = resnet.resnet_out_hw(image_size, crop)
  return h, w, resnet.resnet_out_channels(depth, crop)


def model_descriptor_dim(model_config, image_size: Sequence[int]) -> int:
  """Descriptor length D of the configured model for images of `image_size`."""
  h, w, c = backbone_output_shape(model_config, image_size)
  return aggregators.descriptor_dim(model_config, c, (h, w))


class VPRModel(nn.Module):
  """Backbone + aggregator; takes uint8 (or float 0..255) NHWC images.

  Attributes:
    model_config: the `config.model` ConfigDict (frozen by `build_model`).
    image_size: input (H, W); fixes the aggregator's input size.
    bn_axis_name: pmap axis name for cross-device BatchNorm statistics (None under jit).
  """
  model_config: Any
  image_size: Sequence[int]
  bn_axis_name: Optional[str] = None

  def setup(self):
    mc = self.model_config
    self.dtype = resolve_dtype(mc.dtype)
    h, w, c = backbone_output_shape(mc, self.image_size)
    self.backbone = resnet.ResNet(
        depth=backbone_depth(mc), layers_to_crop=tuple(mc.layers_to_crop),
        layers_to_freeze=int(mc.layers_to_freeze), freeze_bn_stats=bool(mc.freeze_bn_stats),
        dtype=self.dtype, bn_axis_name=self.bn_axis_name)
    self.aggregator = aggregators.make_aggregator(mc, (h, w), self.dtype)

  @property
  def descriptor_dim(self) -> int:
    """Length of the descriptors."""
    return model_descriptor_dim(self.model_config, self.image_size)

  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """Embeds images.

    Args:
      images: [B, H, W, 3] uint8 or float in 0..255 (RGB).
      train: BatchNorm batch statistics and running-stat updates ('batch_stats' mutable).

    Returns:
      Dict with 'features' (backbone output [B, h, w, C], compute dtype) and 'descriptors'
      (float32 [B, D], unit L2 norm).
    """
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'Expected images [B, H, W, 3], got shape {images.shape}.')
    # ToTensor + Normalize, in float32 on device.
    x = images.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
    features = self.backbone(x, train=train)['features']
    return {'features': features, 'descriptors': self.aggregator(features)}


def check_config(config: ml_collections.ConfigDict) -> None:
  """Checks config.model and config.image_size (ConfigError naming the field otherwise)."""
  size = tuple(config.image_size)
  if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
    raise ConfigError(f'image_size must be two positive integers (height, width), got {size!r}.')
  build_model(config)


def build_model(config: ml_collections.ConfigDict, bn_axis_name: Optional[str] = None) -> VPRModel:
  """Builds the VPRModel of a full config (uses config.model and config.image_size).

  Args:
    config: the full experiment ConfigDict.
    bn_axis_name: pmap axis name for BatchNorm statistics (None under jit).

  Returns:
    The (unbound) VPRModel.
  """
  mc = config.model
  backbone_depth(mc)
  aggregators.aggregator_name(mc)
  resolve_dtype(mc.dtype)
  frozen = ml_collections.FrozenConfigDict(mc)  # Hashable, as flax module attributes should be.
  return VPRModel(model_config=frozen, image_size=tuple(int(s) for s in config.image_size),
                  bn_axis_name=bn_axis_name)


def init_variables(model: VPRModel, rng: jax.Array,
                   image_size: Optional[Sequence[int]] = None) -> dict[str, Any]:
  """Initialises the model's variables (torchvision / PyTorch initialisation schemes).

  Args:
    model: a VPRModel.
    rng: PRNG key.
    image_size: (H, W); defaults to model.image_size.

  Returns:
    {'params': ..., 'batch_stats': ...} of float32 arrays.
  """
  h, w = image_size if image_size is not None else model.image_size
  dummy = jnp.zeros((1, int(h), int(w), 3), jnp.uint8)
  variables = jax.jit(functools.partial(model.init, train=False))(rng, dummy)
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def frozen_param_mask(params: Any, layers_to_freeze: int) -> Any:
  """Pytree of bools, True for parameters of frozen backbone stages.

  Stage 0 is the stem (backbone conv1 + bn1), stages 1..3 are layer1..layer3; k freezes 0..k.

  Args:
    params: the model's params (top level 'backbone' / 'aggregator'), or a backbone's params.
    layers_to_freeze: -1 (nothing) or 0..3.

  Returns:
    A pytree with the structure of `params` (usable as an optax mask after negation).
  """
  if not -1 <= int(layers_to_freeze) <= 3:
    raise ConfigError(f'model.layers_to_freeze must be in -1..3, got {layers_to_freeze!r}.')
  frozen_names = set()
  for stage in range(int(layers_to_freeze) + 1):
    frozen_names.update(resnet.FREEZABLE_STAGES[stage])
  has_backbone = 'backbone' in params

  def is_frozen(path):
    keys = [getattr(k, 'key', getattr(k, 'name', k)) for k in path]
    if has_backbone:
      if not keys or keys[0] != 'backbone':
        return False
      keys = keys[1:]
    return bool(keys) and keys[0] in frozen_names

  return jax.tree_util.tree_map_with_path(lambda path, _: is_frozen(path), params)


def count_parameters(params: Any, layers_to_freeze: int = -1) -> dict[str, int]:
  """Parameter counts per module (arrays or jax.ShapeDtypeStructs).

  Args:
    params: the model's params.
    layers_to_freeze: frozen stages, as in the config.

  Returns:
    {'backbone', 'aggregator', 'frozen', 'trainable', 'total'} counts.
  """
  flat = traverse_util.flatten_dict(params)
  mask = traverse_util.flatten_dict(frozen_param_mask(params, layers_to_freeze))
  counts = {'backbone': 0, 'aggregator': 0, 'frozen': 0}
  for path, leaf in flat.items():
    size = int(np.prod(leaf.shape))
    if path[0] in ('backbone', 'aggregator'):
      counts[path[0]] += size
    if mask[path]:
      counts['frozen'] += size
  counts['total'] = counts['backbone'] + counts['aggregator']
  counts['trainable'] = counts['total'] - counts['frozen']
  return counts


def human_readable_count(number: int) -> str:
  """Abbreviates a count as the family's model summary: 2782784 -> '2.8 M', 683072 -> '683 K'."""
  labels = ('', 'K', 'M', 'B', 'T')
  number = int(number)
  if number <= 0:
    return '0'
  num_digits = int(np.floor(np.log10(number)) + 1)
  num_groups = min(int(np.ceil(num_digits / 3)), len(labels))
  scaled = number * 10.0 ** (-3 * (num_groups - 1))
  index = num_groups - 1
  if index < 1 or scaled >= 100:
    return f'{int(scaled):,d} {labels[index]}'.rstrip()
  return f'{scaled:,.1f} {labels[index]}'


def format_parameter_table(counts: dict[str, int], model_config=None) -> str:
  """Formats `count_parameters` output as a per-module summary table.

  Args:
    counts: output of `count_parameters`.
    model_config: optional `config.model`, to print module types.

  Returns:
    The table, e.g. backbone ResNet 2.8 M / aggregator MixVPR 454 K, then trainable,
    non-trainable (frozen) and total counts.
  """
  backbone_type = aggregator_type = ''
  if model_config is not None:
    backbone_type = f'ResNet-{backbone_depth(model_config)}'
    aggregator_type = _AGGREGATOR_TYPES.get(str(model_config.aggregator).lower(), '')
  rows = [('0', 'backbone', backbone_type, counts['backbone']),
          ('1', 'aggregator', aggregator_type, counts['aggregator'])]
  type_width = max(4, *(len(r[2]) for r in rows))
  header = f'  | {"Name":<10} | {"Type":<{type_width}} | Params'
  lines = [header, '-' * (len(header) + 4)]
  for index, name, kind, count in rows:
    lines.append(f'{index} | {name:<10} | {kind:<{type_width}} | {human_readable_count(count)}')
  lines.append('-' * (len(header) + 4))
  lines.append(f'{human_readable_count(counts["trainable"]):<9} Trainable params')
  lines.append(f'{human_readable_count(counts["frozen"]):<9} Non-trainable params (frozen)')
  lines.append(f'{human_readable_count(counts["total"]):<9} Total params')
  return '\n'.join(lines)
