"""The VPR model: ImageNet normalisation, backbone and aggregator, built from a config.

Backbones: torchvision ResNets (`resnet18` ... `resnet101`) and DINOv2 ViTs (`dinov2_vits14` ...
`dinov2_vitg14`). Aggregators: the family's AVG, GeM, ConvAP, MixVPR (`models/aggregators.py`) and
SALAD, BoQ, NetVLAD (`models/salad.py`, `boq.py`, `netvlad.py`); SALAD also reads the ViT's class
token.
"""

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
from vpr_jax.models import freezing
from vpr_jax.models import boq
from vpr_jax.models import dinov2
from vpr_jax.models import netvlad
from vpr_jax.models import resnet
from vpr_jax.models import salad

BACKBONES = {'resnet18': 18, 'resnet34': 34, 'resnet50': 50, 'resnet101': 101}
VIT_BACKBONES = tuple(dinov2.DINOV2_ARCHS)
# Aggregators defined outside `aggregators.py`; SALAD needs the ViT's class token.
NEW_AGGREGATORS = ('salad', 'boq', 'netvlad')
ALL_AGGREGATORS = aggregators.AGGREGATORS + NEW_AGGREGATORS
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
_AGGREGATOR_TYPES = {'avg': 'AVG', 'gem': 'GeM', 'convap': 'ConvAP', 'mixvpr': 'MixVPR',
                     'salad': 'SALAD', 'boq': 'BoQ', 'netvlad': 'NetVLAD'}


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


def is_vit(model_config) -> bool:
  """True when `model_config.backbone` names a DINOv2 ViT."""
  return str(model_config.backbone).lower() in VIT_BACKBONES


def check_backbone(model_config) -> None:
  """ConfigError naming model.backbone unless it is a known ResNet or DINOv2 ViT."""
  name = str(model_config.backbone).lower()
  if name not in BACKBONES and name not in VIT_BACKBONES:
    raise ConfigError(f'Unknown model.backbone {model_config.backbone!r}; valid choices: '
                      f'{", ".join(BACKBONES)}, {", ".join(VIT_BACKBONES)}.')


def backbone_depth(model_config) -> int:
  """ResNet depth of `model_config.backbone` ('resnet18' -> 18); ConfigError if not a ResNet."""
  name = str(model_config.backbone).lower()
  if name not in BACKBONES:
    raise ConfigError(f'model.backbone {model_config.backbone!r} is not a ResNet; valid choices: '
                      f'{", ".join(BACKBONES)}.')
  return BACKBONES[name]


def vit_spec(model_config) -> tuple[int, int, int, str]:
  """(embed_dim, depth, num_heads, ffn) of the configured ViT, with the small-size overrides.

  `model.vit_embed_dim`, `model.vit_depth`, `model.vit_num_heads` and `model.vit_pretrained_grid`
  (0: the hub model's) shrink the transformer for tests and demos; the released models use 0.
  """
  embed_dim, depth, num_heads, ffn = dinov2.arch_spec(str(model_config.backbone).lower())
  embed_dim = int(model_config.get('vit_embed_dim', 0)) or embed_dim
  depth = int(model_config.get('vit_depth', 0)) or depth
  num_heads = int(model_config.get('vit_num_heads', 0)) or num_heads
  return embed_dim, depth, num_heads, ffn


def aggregator_name(model_config) -> str:
  """The configured aggregator's name in lower case; ConfigError for an unknown one."""
  name = str(model_config.aggregator).lower()
  if name not in ALL_AGGREGATORS:
    raise ConfigError(f'Unknown model.aggregator {model_config.aggregator!r}; valid choices: '
                      f'{", ".join(ALL_AGGREGATORS)}.')
  return name


def backbone_output_shape(model_config, image_size: Sequence[int]) -> tuple[int, int, int]:
  """(H, W, C) of the backbone features for images of `image_size` (H, W)."""
  if is_vit(model_config):
    h, w = dinov2.patch_grid(tuple(int(s) for s in image_size))
    return h, w, vit_spec(model_config)[0]
  depth = backbone_depth(model_config)
  crop = tuple(model_config.layers_to_crop)
  h, w = resnet.resnet_out_hw(image_size, crop)
  return h, w, resnet.resnet_out_channels(depth, crop)


def model_descriptor_dim(model_config, image_size: Sequence[int]) -> int:
  """Descriptor length D of the configured model for images of `image_size`."""
  h, w, c = backbone_output_shape(model_config, image_size)
  name = aggregator_name(model_config)
  if name == 'salad':
    return salad.descriptor_dim(model_config.salad_num_clusters, model_config.salad_cluster_dim,
                                model_config.salad_token_dim)
  if name == 'boq':
    return boq.descriptor_dim(model_config.boq_proj_channels, model_config.boq_row_dim)
  if name == 'netvlad':
    return netvlad.descriptor_dim(model_config.netvlad_num_clusters, c)
  return aggregators.descriptor_dim(model_config, c, (h, w))


def make_backbone(model_config, dtype: Any, bn_axis_name: Optional[str] = None,
                  bn_sync: bool = True, bn_groups: int = 1) -> nn.Module:
  """The configured backbone module (ResNet or DINOv2 ViT; BatchNorm options: `resnet.ResNet`)."""
  mc = model_config
  if is_vit(mc):
    embed_dim, depth, num_heads, ffn = vit_spec(mc)
    return dinov2.DinoV2(
        embed_dim=embed_dim, depth=depth, num_heads=num_heads, ffn=ffn,
        pretrained_grid=int(mc.get('vit_pretrained_grid', 0)) or dinov2.PRETRAINED_GRID,
        num_register_tokens=int(mc.get('num_register_tokens', 0)),
        # The hub's register models interpolate position embeddings by size, antialiased.
        interpolate_offset=0.0 if int(mc.get('num_register_tokens', 0)) else 0.1,
        interpolate_antialias=bool(int(mc.get('num_register_tokens', 0))),
        apply_final_norm=bool(mc.get('apply_final_norm', True)),
        num_trainable_blocks=int(mc.get('num_trainable_blocks', -1)), dtype=dtype)
  return resnet.ResNet(
      depth=backbone_depth(mc), layers_to_crop=tuple(mc.layers_to_crop),
      layers_to_freeze=int(mc.layers_to_freeze), freeze_bn_stats=bool(mc.freeze_bn_stats),
      dtype=dtype, bn_axis_name=bn_axis_name, bn_sync=bn_sync, bn_groups=bn_groups)


def make_any_aggregator(model_config, in_hw: Sequence[int], dtype: Any = jnp.float32
                        ) -> nn.Module:
  """The configured aggregator: the family's (`aggregators.make_aggregator`), SALAD, BoQ, NetVLAD."""
  mc = model_config
  name = aggregator_name(mc)
  if name == 'salad':
    return salad.SALAD(num_clusters=int(mc.salad_num_clusters),
                       cluster_dim=int(mc.salad_cluster_dim), token_dim=int(mc.salad_token_dim),
                       dropout_rate=float(mc.salad_dropout), dtype=dtype)
  if name == 'boq':
    return boq.BoQ(proj_channels=int(mc.boq_proj_channels), num_queries=int(mc.boq_num_queries),
                   num_layers=int(mc.boq_num_layers), row_dim=int(mc.boq_row_dim), dtype=dtype)
  if name == 'netvlad':
    return netvlad.NetVLAD(num_clusters=int(mc.netvlad_num_clusters), dtype=dtype)
  return aggregators.make_aggregator(mc, in_hw, dtype)


class VPRModel(nn.Module):
  """Backbone + aggregator; takes uint8 (or float 0..255) NHWC images.

  Attributes:
    model_config: the `config.model` ConfigDict (frozen by `build_model`).
    image_size: input (H, W); fixes the aggregator's input size.
    bn_axis_name: pmap axis name for cross-device BatchNorm statistics (None under jit).
    bn_sync: BatchNorm statistics of the global batch (True) or of each device's images.
    bn_groups: with bn_sync=False under jit, the number of devices (`resnet.BatchNorm.groups`).
  """
  model_config: Any
  image_size: Sequence[int]
  bn_axis_name: Optional[str] = None
  bn_sync: bool = True
  bn_groups: int = 1

  def setup(self):
    mc = self.model_config
    self.dtype = resolve_dtype(mc.dtype)
    h, w, _ = backbone_output_shape(mc, self.image_size)
    self.backbone = make_backbone(mc, self.dtype, self.bn_axis_name, self.bn_sync,
                                  self.bn_groups)
    self.aggregator = make_any_aggregator(mc, (h, w), self.dtype)

  @property
  def descriptor_dim(self) -> int:
    """Length of the descriptors."""
    return model_descriptor_dim(self.model_config, self.image_size)

  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """Embeds images.

    Args:
      images: [B, H, W, 3] uint8 or float in 0..255 (RGB).
      train: BatchNorm batch statistics and running-stat updates ('batch_stats' mutable);
        SALAD's dropout (a 'dropout' rng).

    Returns:
      Dict with 'features' (backbone output [B, h, w, C], compute dtype) and 'descriptors'
      (float32 [B, D], unit L2 norm).
    """
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'Expected images [B, H, W, 3], got shape {images.shape}.')
    # ToTensor + Normalize, in float32 on device.
    x = images.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
    outputs = self.backbone(x, train=train)
    features = outputs['features']
    if isinstance(self.aggregator, salad.SALAD):
      descriptors = self.aggregator(features, outputs['class_token'], train=train)
    else:
      descriptors = self.aggregator(features)
    return {'features': features, 'descriptors': descriptors}


def configured_eval_size(config: ml_collections.ConfigDict) -> Optional[tuple]:
  """config.eval_image_size, or None when unset (None; `--config.eval_image_size=None` gives
  (None,) on the command line)."""
  size = config.get('eval_image_size', None)
  if size is None or (isinstance(size, (tuple, list)) and all(s is None for s in size)):
    return None
  return tuple(size)


def eval_image_size(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(H, W) of evaluation images: config.eval_image_size, or image_size when that is unset."""
  size = configured_eval_size(config)
  return tuple(int(s) for s in (size if size is not None else config.image_size))


def _check_size(config, field: str, size) -> None:
  size = tuple(size)
  if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
    raise ConfigError(f'{field} must be two positive integers (height, width), got {size!r}.')
  if is_vit(config.model) and any(s % dinov2.PATCH_SIZE for s in size):
    raise ConfigError(f'{field}={size!r}: model.backbone {config.model.backbone!r} needs sizes '
                      f'that are multiples of the patch size {dinov2.PATCH_SIZE} (e.g. 224, 322).')


def check_config(config: ml_collections.ConfigDict) -> None:
  """Checks config.model, image_size and eval_image_size (ConfigError naming the field)."""
  check_backbone(config.model)
  _check_size(config, 'image_size', config.image_size)
  if configured_eval_size(config) is not None:
    _check_size(config, 'eval_image_size', configured_eval_size(config))
    if (aggregator_name(config.model) == 'mixvpr'
        and eval_image_size(config) != tuple(config.image_size)):
      raise ConfigError(f'eval_image_size={configured_eval_size(config)!r} differs from '
                        f'image_size={tuple(config.image_size)!r}, but MixVPR\'s weights fix its '
                        'input size; leave eval_image_size unset (None).')
  mc = config.model
  if is_vit(mc):
    depth = vit_spec(mc)[1]
    n = int(mc.get('num_trainable_blocks', -1))
    if not -1 <= n <= depth:
      raise ConfigError(f'model.num_trainable_blocks must be in -1..{depth} for '
                        f'{mc.backbone}, got {n!r}.')
    if int(mc.get('num_register_tokens', 0)) < 0:
      raise ConfigError(f'model.num_register_tokens must be >= 0, got {mc.num_register_tokens!r}.')
  elif aggregator_name(mc) == 'salad':
    raise ConfigError(f'model.aggregator=salad needs a DINOv2 backbone (it reads the class '
                      f'token), got model.backbone={mc.backbone!r}.')
  if aggregator_name(mc) == 'boq' and int(mc.boq_proj_channels) < 64:
    raise ConfigError(f'model.boq_proj_channels must be at least 64 (heads = channels // 64), '
                      f'got {mc.boq_proj_channels!r}.')
  build_model(config)


def build_model(config: ml_collections.ConfigDict, bn_axis_name: Optional[str] = None,
                image_size: Optional[Sequence[int]] = None, bn_sync: bool = True,
                bn_groups: int = 1) -> VPRModel:
  """Builds the VPRModel of a full config (uses config.model and config.image_size).

  Args:
    config: the full experiment ConfigDict.
    bn_axis_name: pmap axis name for BatchNorm statistics (None under jit).
    image_size: (H, W) input size; default config.image_size (evaluation passes
      `eval_image_size(config)`).
    bn_sync: BatchNorm statistics of the global batch (True) or of each device's images.
    bn_groups: with bn_sync=False under jit, the number of devices.

  Returns:
    The (unbound) VPRModel.
  """
  mc = config.model
  check_backbone(mc)
  aggregator_name(mc)
  resolve_dtype(mc.dtype)
  frozen = ml_collections.FrozenConfigDict(mc)  # Hashable, as flax module attributes should be.
  size = image_size if image_size is not None else config.image_size
  return VPRModel(model_config=frozen, image_size=tuple(int(s) for s in size),
                  bn_axis_name=bn_axis_name, bn_sync=bn_sync, bn_groups=bn_groups)


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
  return freezing.frozen_mask(params, frozen_names)


def model_frozen_param_mask(params: Any, model_config) -> Any:
  """Pytree of bools, True for the parameters that do not train under `model_config`.

  ResNets: `frozen_param_mask` of model.layers_to_freeze; DINOv2: all but the last
  model.num_trainable_blocks blocks (and the final norm), `dinov2.frozen_param_mask`.
  """
  if is_vit(model_config):
    return dinov2.frozen_param_mask(params, int(model_config.get('num_trainable_blocks', -1)),
                                    vit_spec(model_config)[1])
  return frozen_param_mask(params, int(model_config.layers_to_freeze))


def count_parameters(params: Any, layers_to_freeze: int = -1,
                     model_config=None) -> dict[str, int]:
  """Parameter counts per module (arrays or jax.ShapeDtypeStructs).

  Args:
    params: the model's params.
    layers_to_freeze: frozen ResNet stages, as in the config (ignored with `model_config`).
    model_config: `config.model`; when given, its backbone's freezing decides what is frozen.

  Returns:
    {'backbone', 'aggregator', 'frozen', 'trainable', 'total'} counts.
  """
  flat = traverse_util.flatten_dict(params)
  if model_config is not None:
    mask = traverse_util.flatten_dict(model_frozen_param_mask(params, model_config))
  else:
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
    if is_vit(model_config):
      embed_dim, depth = vit_spec(model_config)[:2]
      size = str(model_config.backbone).lower()[len('dinov2_vit'):]  # 'b14'
      backbone_type = f'DINOv2 ViT-{size[0].upper()}/{size[1:]}'
      if (embed_dim, depth) != dinov2.arch_spec(str(model_config.backbone).lower())[:2]:
        backbone_type += f' ({depth}x{embed_dim})'
    else:
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
