"""PyTorch names and layouts of every model's weights <-> Flax variables, in both directions.

The one name table of vpr_jax: the converter (`mapping` for the gsv-cities family, this module
for the released DINOv2 / SALAD / BoQ / NetVLAD files) reads state dicts with it, and the exporter
(`exporter`) writes them with it. Pure functions (numpy in, numpy out; torch is not imported).
The Flax module trees of `vpr_jax.models` follow the PyTorch names, so a Flax path maps to a
torch key by joining its parts with '.', with these renames:

* leaves: `kernel` -> `weight` (Linear: transposed; Conv: OIHW -> HWIO), LayerNorm / BatchNorm
  `scale` -> `weight`, BatchNorm statistics `mean` / `var` -> `running_mean` / `running_var`,
  MultiheadAttention `in_proj_kernel` -> `in_proj_weight` (transposed);
* modules: `blocks_<i>` -> `blocks.<i>`, `boqs_<i>` -> `boqs.<i>`, the ViT's `patch_embed` ->
  `patch_embed.proj`, the ResNet's `downsample_conv` / `downsample_bn` -> `downsample.0` / `.1`,
  MixVPR's `mix_<i>` -> `mix.<i>` and its mixer's `norm` / `fc1` / `fc2` -> `mix.0` / `mix.1` /
  `mix.3` (torch's nn.Sequential(LayerNorm, Linear, ReLU, Linear)).

Whole-model files (`CHECKPOINT_LAYOUTS`) prefix the backbone and the aggregator:

* `salad` (`dino_salad.ckpt`): `backbone.model.<hub ViT names>`,
  `aggregator.{token_features, cluster_features, score}.*` and a 0-d `aggregator.dust_bin`;
* `boq_dinov2` (`dinov2_12288.pth`): `backbone.dino.<hub ViT names>` (its `norm.*` unused when the
  model skips the final norm), `aggregator.{proj_c, norm_input, boqs.<i>.*, fc}.*`;
* `boq_resnet` (`resnet50_16384.pth`): `backbone.net.{0,1,4,5,6}.*` (conv1, bn1, layer1-3; `7`
  is layer4 when BoQ keeps it, crop_last_block=False), the aggregator as boq_dinov2;
* `family` (gsv-cities / MixVPR Lightning): `backbone.model.<torchvision names>`, `aggregator.*`
  (GeM: `p`; ConvAP: `channel_pool.*`; MixVPR: `mix.<i>.mix.{0,1,3}.*`, `channel_proj.*`,
  `row_proj.*`; NetVLAD: `conv.weight`, `centroids`).

The hub's `mask_token` (DINOv2 pre-training only) and BatchNorm `num_batches_tracked` counters are
ignored; every other key must match, or `StateDictMismatchError` lists all the differences.
"""

import re
from typing import Any, Callable, Mapping, Sequence

from flax import traverse_util
import numpy as np

from vpr_jax.errors import StateDictMismatchError

LAYOUT_CONV = 'conv'  # torch OIHW <-> flax HWIO.
LAYOUT_DENSE = 'dense'  # torch [out, in] <-> flax [in, out].
LAYOUT_AS_IS = 'as_is'

_LEAF_NAMES = {'kernel': 'weight', 'scale': 'weight', 'mean': 'running_mean',
               'var': 'running_var', 'in_proj_kernel': 'in_proj_weight'}
_MODULE_NAMES = {'downsample_conv': 'downsample.0', 'downsample_bn': 'downsample.1'}
_INDEXED_MODULE = re.compile(r'^(blocks|boqs|mix)_(\d+)$')
# MixVPR mixer sublayers -> index in torch's nn.Sequential(LayerNorm, Linear, ReLU, Linear).
_MIXER_LAYERS = {'norm': '0', 'fc1': '1', 'fc2': '3'}
# torchvision ResNet module -> index in BoQ's nn.Sequential(conv1, bn1, relu, maxpool, layer1..4).
BOQ_RESNET_INDICES = {'conv1': '0', 'bn1': '1', 'layer1': '4', 'layer2': '5', 'layer3': '6',
                      'layer4': '7'}
# Keys of the released files that no Flax module holds: BatchNorm's counter of batches seen, and
# the hub ViT's mask_token (DINOv2 pre-training only); the exporter writes them back.
BATCH_COUNTER = 'num_batches_tracked'
_IGNORED_SUFFIXES = (BATCH_COUNTER,)
VIT_MASK_TOKEN = 'mask_token'
_IGNORED_VIT_KEYS = (VIT_MASK_TOKEN,)

CHECKPOINT_LAYOUTS = {
    # layout: (backbone prefix, backbone kind)
    'salad': ('backbone.model.', 'vit'),
    'boq_dinov2': ('backbone.dino.', 'vit'),
    'boq_resnet': ('backbone.net.', 'boq_resnet'),
    'family': ('backbone.model.', 'resnet'),
}
AGGREGATOR_PREFIX = 'aggregator.'


def torch_key(path: Sequence[str]) -> str:
  """The PyTorch key of a Flax parameter path inside one module (backbone or aggregator).

  Args:
    path: e.g. ('blocks_3', 'attn', 'qkv', 'kernel').

  Returns:
    e.g. 'blocks.3.attn.qkv.weight'.
  """
  *modules, leaf = (str(p) for p in path)
  parts = []
  for i, name in enumerate(modules):
    match = _INDEXED_MODULE.match(name)
    if match:
      parts += [match.group(1), match.group(2)]
    elif name in _MIXER_LAYERS and i > 0 and modules[i - 1].startswith('mix_'):
      parts += ['mix', _MIXER_LAYERS[name]]
    elif name == 'patch_embed' and i == 0:
      parts += ['patch_embed', 'proj']
    else:
      parts.append(_MODULE_NAMES.get(name, name))
  parts.append(_LEAF_NAMES.get(leaf, leaf))
  return '.'.join(parts)


def boq_resnet_key(path: Sequence[str]) -> str:
  """Key of a `resnet.ResNet` path in BoQ's `net` Sequential: ('layer1', '0', ...) -> '4.0....'."""
  key = torch_key(path)
  head, _, rest = key.partition('.')
  return '.'.join([BOQ_RESNET_INDICES.get(head, head)] + ([rest] if rest else []))


def leaf_layout(path: Sequence[str], shape: Sequence[int]) -> str:
  """How a Flax leaf is laid out relative to its torch tensor: conv, dense or as is."""
  leaf = str(path[-1])
  if leaf == 'kernel':
    return LAYOUT_CONV if len(shape) == 4 else LAYOUT_DENSE
  if leaf == 'in_proj_kernel':
    return LAYOUT_DENSE
  return LAYOUT_AS_IS


def torch_shape(shape: Sequence[int], layout: str) -> tuple[int, ...]:
  """Shape of the torch tensor holding a Flax leaf of `shape`."""
  if layout == LAYOUT_CONV:
    h, w, i, o = shape
    return (o, i, h, w)
  if layout == LAYOUT_DENSE:
    return tuple(reversed(tuple(shape)))
  return tuple(shape)


def to_flax_layout(array: np.ndarray, layout: str) -> np.ndarray:
  """A torch tensor (as numpy) rearranged into its Flax leaf."""
  if layout == LAYOUT_CONV:
    return np.transpose(array, (2, 3, 1, 0))
  if layout == LAYOUT_DENSE:
    return np.transpose(array)
  return array


def to_torch_layout(array: np.ndarray, layout: str) -> np.ndarray:
  """A Flax leaf rearranged into its torch tensor (the inverse of `to_flax_layout`)."""
  if layout == LAYOUT_CONV:
    return np.transpose(array, (3, 2, 0, 1))
  if layout == LAYOUT_DENSE:
    return np.transpose(array)
  return array


def fill_variables(state_dict: Mapping[str, Any], expected: Mapping[str, Any],
                   key_fn: Callable[[str, tuple], str],
                   ignore_fn: Callable[[str], bool] = lambda key: False,
                   source: str = 'state dict', dtype: Any = np.float32) -> dict[str, Any]:
  """Fills the tree `expected` from `state_dict`, or raises with every difference.

  Args:
    state_dict: {torch key: numpy array (or anything np.asarray takes)}.
    expected: {collection: tree of arrays or ShapeDtypeStructs}, e.g. {'params': ...}.
    key_fn: (collection, flax path) -> torch key.
    ignore_fn: state-dict keys to skip silently.
    source: the state dict's name in error messages (e.g. the file).
    dtype: numpy dtype of the result.

  Returns:
    {collection: tree} with the structure of `expected`, as numpy arrays.
  """
  given = {k: v for k, v in state_dict.items()
           if not k.endswith(_IGNORED_SUFFIXES) and not ignore_fn(k)}
  targets = {}
  for collection, tree in expected.items():
    for path, leaf in traverse_util.flatten_dict(tree).items():
      targets[key_fn(collection, path)] = (collection, path, tuple(leaf.shape),
                                           leaf_layout(path, leaf.shape))
  missing = sorted(k for k in targets if k not in given)
  unexpected = sorted(k for k in given if k not in targets)
  mismatched = []
  filled = {collection: {} for collection in expected}
  for key, (collection, path, shape, layout) in targets.items():
    if key not in given:
      continue
    array = np.asarray(given[key])
    want = torch_shape(shape, layout)
    if tuple(array.shape) != want:
      mismatched.append((key, want, tuple(array.shape)))
      continue
    # np.array, not np.ascontiguousarray, which turns 0-d values (SALAD's dust_bin) into 1-d.
    filled[collection][path] = np.array(to_flax_layout(array, layout), dtype=dtype, order='C')
  if missing or unexpected or mismatched:
    raise StateDictMismatchError(source, missing, unexpected, sorted(mismatched))
  return {collection: traverse_util.unflatten_dict(flat) for collection, flat in filled.items()}


def dinov2_hub_to_flax(state_dict: Mapping[str, Any], expected_params: Mapping[str, Any],
                       source: str = 'DINOv2 state dict') -> dict[str, Any]:
  """Converts a torch-hub `dinov2_vit*14` state dict into `dinov2.DinoV2` params.

  Args:
    state_dict: hub names (`patch_embed.proj.weight`, `blocks.0.attn.qkv.weight`, ...) to arrays.
    expected_params: the DinoV2 module's params (or their shapes). A module built without the
      final norm leaves the file's `norm.*` unused.
    source: the state dict's name in error messages.

  Returns:
    The params tree as float32 numpy arrays.
  """
  has_norm = 'norm' in expected_params
  ignored = _IGNORED_VIT_KEYS + (() if has_norm else ('norm.weight', 'norm.bias'))
  filled = fill_variables(state_dict, {'params': expected_params},
                          lambda collection, path: torch_key(path),
                          lambda key: key in ignored, source)
  return filled['params']


def _backbone_key_fn(kind: str) -> Callable[[tuple], str]:
  if kind == 'boq_resnet':
    return boq_resnet_key
  return torch_key


class CheckpointKeys:
  """(collection, Flax path) -> the whole-model file's key, for one of CHECKPOINT_LAYOUTS.

  Used by the converter to read a file and by the exporter to write one, so both directions
  share one naming.
  """

  def __init__(self, layout: str):
    if layout not in CHECKPOINT_LAYOUTS:
      raise ValueError(f'Unknown checkpoint layout {layout!r}; valid choices: '
                       f'{", ".join(CHECKPOINT_LAYOUTS)}.')
    self.layout = layout
    self.backbone_prefix, self.backbone_kind = CHECKPOINT_LAYOUTS[layout]
    self._backbone_key = _backbone_key_fn(self.backbone_kind)

  def __call__(self, collection: str, path: Sequence[str]) -> str:
    del collection  # params and batch_stats share one namespace in torch.
    module, rest = path[0], tuple(path[1:])
    if module == 'backbone':
      return self.backbone_prefix + self._backbone_key(rest)
    if module == 'aggregator':
      return AGGREGATOR_PREFIX + torch_key(rest)
    raise ValueError(f'Unexpected top-level module {module!r} in the model variables.')


def checkpoint_to_flax(state_dict: Mapping[str, Any], expected: Mapping[str, Any], layout: str,
                       source: str = 'checkpoint') -> dict[str, Any]:
  """Converts a released whole-model state dict into VPR model variables.

  Args:
    state_dict: the file's state dict (already unwrapped from Lightning's 'state_dict' and
      stripped of `module.`), torch key -> numpy array.
    expected: {'params': {'backbone': ..., 'aggregator': ...}, 'batch_stats': {'backbone': ...}}
      (arrays or ShapeDtypeStructs); batch_stats may be absent or empty for a ViT.
    layout: one of CHECKPOINT_LAYOUTS ('salad', 'boq_dinov2', 'boq_resnet', 'family').
    source: the state dict's name in error messages.

  Returns:
    Variables with the structure of `expected`, as float32 numpy arrays.
  """
  key_fn = CheckpointKeys(layout)
  prefix = key_fn.backbone_prefix
  expected = {c: t for c, t in expected.items() if t}
  ignored = set()
  if key_fn.backbone_kind == 'vit':
    ignored.update(prefix + k for k in _IGNORED_VIT_KEYS)
    if 'norm' not in expected['params'].get('backbone', {}):
      ignored.update((prefix + 'norm.weight', prefix + 'norm.bias'))
  return fill_variables(state_dict, expected, key_fn, lambda key: key in ignored, source)


def flax_to_state_dict(variables: Mapping[str, Any], key_fn: Callable[[str, tuple], str]
                       ) -> dict[str, np.ndarray]:
  """The inverse mapping: Flax variables -> {torch key: numpy array} (to export weights).

  Args:
    variables: {collection: tree of arrays}.
    key_fn: (collection, flax path) -> torch key, as given to `fill_variables`.

  Returns:
    The state dict as numpy arrays in torch layout: transposed views of the leaves (not copies,
    so that a large model is not held twice; a writer makes each contiguous in turn).
  """
  state_dict = {}
  for collection, tree in variables.items():
    for path, leaf in traverse_util.flatten_dict(tree).items():
      array = np.asarray(leaf)
      key = key_fn(collection, path)
      if key in state_dict:
        raise ValueError(f'Two Flax variables map to the torch key {key!r}.')
      state_dict[key] = to_torch_layout(array, leaf_layout(path, array.shape))
  return state_dict
