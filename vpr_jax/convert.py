r"""PyTorch weights -> vpr_jax variables, and a CLI that writes an inference checkpoint.

Two kinds of PyTorch files are understood:

* torchvision ImageNet state dicts of ResNet-18/34/50/101 (e.g. `resnet18-f37072fd.pth`), for the
  backbone. Keys of cropped stages (e.g. `layer4.*`) and of the classifier (`fc.*`) are ignored;
  every other key must match.
* whole-model checkpoints of the gsv-cities / MixVPR / mldl24-vpr family: a Lightning `.ckpt`
  (`{'state_dict': ...}`) or a bare state dict with names `backbone.model.<torchvision names>` and
  `aggregator.*` (`p` for GeM; `channel_pool.*` for ConvAP; `mix.<i>.mix.{0,1,3}.*`,
  `channel_proj.*`, `row_proj.*` for MixVPR). Every key must match.

In both, a `module.` prefix (DataParallel) is stripped and BatchNorm `num_batches_tracked` counters
are ignored. Mismatches are reported together (missing, unexpected and mis-shaped keys) in one
`CheckpointMismatchError`.

Usage:
  python -m vpr_jax.convert --config configs/mixvpr.py --torch-checkpoint model.ckpt --out DIR
  python -m vpr_jax.eval --checkpoint DIR ...

Files are read without torch and without running code stored in them
(`vpr_jax.conversion.torch_reader`); the conversion functions also accept torch or numpy state
dicts.
"""

import copy
import functools
import os
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

from absl import flags
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vpr_jax import checkpointing
from vpr_jax.conversion import torch_reader
from vpr_jax.models import aggregators
from vpr_jax.models import resnet
from vpr_jax.models import vpr_model

FLAGS = flags.FLAGS
KINDS = ('auto', 'torchvision', 'family')
BACKBONE_PREFIX = 'backbone.model.'
AGGREGATOR_PREFIX = 'aggregator.'
_IGNORED_SUFFIXES = ('num_batches_tracked',)
# flax BatchNorm / LayerNorm leaf names -> torch names.
_NORM_LEAVES = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}
# MixVPR mixer sublayers -> index in torch's nn.Sequential(LayerNorm, Linear, ReLU, Linear).
_MIXER_LAYERS = {'norm': '0', 'fc1': '1', 'fc2': '3'}


class CheckpointMismatchError(checkpointing.CheckpointMismatchError):
  """A PyTorch state dict does not match the model: lists every missing/unexpected/mis-shaped key.

  Attributes:
    missing: expected keys not in the state dict.
    unexpected: state-dict keys the model has no place for.
    mismatched: (key, expected torch shape, found shape) triples.
  """

  def __init__(self, source: str, missing: Sequence[str], unexpected: Sequence[str],
               mismatched: Sequence[tuple[str, tuple, tuple]]):
    self.missing = list(missing)
    self.unexpected = list(unexpected)
    self.mismatched = list(mismatched)
    lines = [f'{source} does not match the model '
             f'({len(self.missing)} missing, {len(self.unexpected)} unexpected, '
             f'{len(self.mismatched)} mis-shaped keys):']
    if self.missing:
      lines.append('  missing keys: ' + ', '.join(self.missing))
    if self.unexpected:
      lines.append('  unexpected keys: ' + ', '.join(self.unexpected))
    for key, expected, found in self.mismatched:
      lines.append(f'  mis-shaped key {key}: expected {tuple(expected)}, found {tuple(found)}')
    super().__init__('\n'.join(lines))


# ----------------------------------------------------------------------------------------------
# Reading PyTorch files.


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, 'detach'):  # A torch tensor.
    value = value.detach().cpu()
    if value.is_floating_point() and value.element_size() < 4:
      value = value.float()  # numpy has no bfloat16; float16 is widened alike.
    return value.numpy()
  return np.asarray(value)


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
  """The state dict inside a Lightning checkpoint (or the dict itself), `module.` prefixes removed.

  Args:
    checkpoint: a state dict, or a dict with a 'state_dict' entry (Lightning `.ckpt`).

  Returns:
    {name: tensor or array}.
  """
  if not isinstance(checkpoint, Mapping):
    raise ValueError(f'Expected a state dict (a mapping of names to tensors), got '
                     f'{type(checkpoint).__name__}.')
  if 'state_dict' in checkpoint and isinstance(checkpoint['state_dict'], Mapping):
    checkpoint = checkpoint['state_dict']
  state_dict = {}
  for key, value in checkpoint.items():
    key = str(key)
    if key.startswith('module.'):
      key = key[len('module.'):]
    state_dict[key] = value
  return state_dict


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a PyTorch `.pth` / `.ckpt` file into a numpy state dict (torch is not needed).

  Args:
    path: the file.

  Returns:
    {name: np.ndarray} (the Lightning 'state_dict' entry if present, `module.` removed; half
    precision stays as stored).

  Raises:
    torch_reader.CheckpointNotFoundError: no such file.
    torch_reader.TorchCheckpointError: the file cannot be read, or is refused as unsafe.
  """
  return unwrap_state_dict(torch_reader.load_state_dict(path))


def detect_kind(state_dict: Mapping[str, Any]) -> str:
  """'family' (backbone.model.* / aggregator.* names) or 'torchvision' (conv1.weight, layer1.*)."""
  keys = list(unwrap_state_dict(state_dict))
  if any(k.startswith(BACKBONE_PREFIX) for k in keys):
    return 'family'
  if 'conv1.weight' in keys:
    return 'torchvision'
  raise ValueError('Cannot tell the checkpoint kind: expected torchvision ResNet names '
                   f'(conv1.weight, layer1.0.conv1.weight, ...) or {BACKBONE_PREFIX}* / '
                   f'{AGGREGATOR_PREFIX}* names; the first keys are {keys[:8]}.')


# ----------------------------------------------------------------------------------------------
# Name and layout mapping.


def _torch_leaf_name(path: Sequence[str]) -> tuple[str, str]:
  """(torch key relative to its module, layout) for a flax path inside a backbone or aggregator.

  Layout is 'conv' (HWIO <- OIHW), 'dense' ([in, out] <- [out, in]) or 'vector'.
  """
  *modules, leaf = path
  parts = []
  for i, name in enumerate(modules):
    if name == 'downsample_conv':
      parts += ['downsample', '0']
    elif name == 'downsample_bn':
      parts += ['downsample', '1']
    elif name.startswith('mix_') and name[4:].isdigit():
      parts += ['mix', name[4:]]
    elif name in _MIXER_LAYERS and i > 0 and modules[i - 1].startswith('mix_'):
      parts += ['mix', _MIXER_LAYERS[name]]
    else:
      parts.append(name)
  if leaf == 'kernel':
    return '.'.join(parts + ['weight']), None
  if leaf in _NORM_LEAVES:
    return '.'.join(parts + [_NORM_LEAVES[leaf]]), 'vector'
  return '.'.join(parts + [leaf]), 'vector'


def _layout(flax_shape: tuple, layout: Optional[str]) -> str:
  if layout is not None:
    return layout
  return {4: 'conv', 2: 'dense'}.get(len(flax_shape), 'vector')


def _torch_shape(flax_shape: tuple, layout: str) -> tuple:
  if layout == 'conv':
    h, w, i, o = flax_shape
    return (o, i, h, w)
  if layout == 'dense':
    return tuple(reversed(flax_shape))
  return tuple(flax_shape)


def _to_flax_layout(array: np.ndarray, layout: str) -> np.ndarray:
  if layout == 'conv':
    return np.transpose(array, (2, 3, 1, 0))
  if layout == 'dense':
    return np.transpose(array)
  return array


def _convert(state_dict: Mapping[str, Any], expected: Mapping[str, Any],
             name_fn: Callable[[str, tuple, str], str], ignore_fn: Callable[[str], bool],
             source: str, dtype: Any = np.float32) -> dict[str, Any]:
  """Fills the tree `expected` (of ShapeDtypeStructs) from `state_dict` or raises with every issue.

  Args:
    state_dict: {torch name: tensor or array}.
    expected: {'params': ..., 'batch_stats': ...} abstract variables.
    name_fn: (collection, flax path, torch-style name of that path) -> the state-dict key.
    ignore_fn: state-dict keys to skip silently.
    source: description of the state dict for error messages.
    dtype: numpy dtype of the result.

  Returns:
    Variables with the structure of `expected`, as numpy arrays of `dtype`.
  """
  state_dict = unwrap_state_dict(state_dict)
  given = {k: v for k, v in state_dict.items()
           if not k.endswith(_IGNORED_SUFFIXES) and not ignore_fn(k)}
  targets = {}
  for collection, tree in expected.items():
    for path, leaf in traverse_util.flatten_dict(tree).items():
      relative, layout = _torch_leaf_name(path)
      layout = _layout(leaf.shape, layout)
      targets[name_fn(collection, path, relative)] = (collection, path, leaf.shape, layout)

  missing = sorted(k for k in targets if k not in given)
  unexpected = sorted(k for k in given if k not in targets)
  mismatched = []
  converted = {collection: {} for collection in expected}
  for key, (collection, path, flax_shape, layout) in targets.items():
    if key not in given:
      continue
    array = _to_numpy(given[key])
    torch_shape = _torch_shape(flax_shape, layout)
    if tuple(array.shape) != torch_shape:
      mismatched.append((key, torch_shape, tuple(array.shape)))
      continue
    converted[collection][path] = np.ascontiguousarray(
        _to_flax_layout(array, layout).astype(dtype))
  if missing or unexpected or mismatched:
    raise CheckpointMismatchError(source, missing, unexpected, sorted(mismatched))
  return {collection: traverse_util.unflatten_dict(flat) for collection, flat in converted.items()}


def _abstract_variables(module, *args, **kwargs) -> dict[str, Any]:
  shapes = jax.eval_shape(lambda rng, *a: module.init(rng, *a, **kwargs), jax.random.key(0), *args)
  return {'params': shapes.get('params', {}), 'batch_stats': shapes.get('batch_stats', {})}


@functools.lru_cache(maxsize=16)
def _abstract_resnet_variables(depth: int, layers_to_crop: tuple[int, ...]) -> dict[str, Any]:
  return _abstract_variables(resnet.ResNet(depth=depth, layers_to_crop=layers_to_crop),
                             jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))


# ----------------------------------------------------------------------------------------------
# Conversions.


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
  module = aggregators.make_aggregator(model_config, in_channels, in_hw)
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
  prefixes = {'backbone': BACKBONE_PREFIX, 'aggregator': AGGREGATOR_PREFIX}
  return _convert(state_dict, expected,
                  lambda collection, path, name: prefixes[path[0]] + name.split('.', 1)[1],
                  lambda key: False, source)


def load_torchvision_backbone(path: str, model_config) -> dict[str, Any]:
  """Reads torchvision ImageNet weights (e.g. resnet18-f37072fd.pth) for the configured backbone.

  Args:
    path: the `.pth` file (never downloaded).
    model_config: `config.model` (backbone and layers_to_crop).

  Returns:
    Backbone {'params': ..., 'batch_stats': ...}, to place under the model's 'backbone' entries
    (see `with_backbone`).
  """
  state_dict = load_torch_state_dict(path)
  return torchvision_resnet_to_flax(state_dict, vpr_model.backbone_depth(model_config),
                                    tuple(model_config.layers_to_crop), source=os.fspath(path))


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
      raise CheckpointMismatchError(f'backbone {collection}', missing, unexpected, mismatched)
    current['backbone'] = backbone_variables[collection]
    result[collection] = current
  return result


def _adapt_config_to_checkpoint(config: ml_collections.ConfigDict,
                                state_dict: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Copies `config`, setting choices that the checkpoint itself settles (MixVPR row_proj bias)."""
  config = copy.deepcopy(config)
  keys = set(state_dict)
  if (str(config.model.aggregator).lower() == 'mixvpr'
      and AGGREGATOR_PREFIX + 'row_proj.weight' in keys):
    with config.unlocked():
      config.model.mixvpr_row_proj_bias = AGGREGATOR_PREFIX + 'row_proj.bias' in keys
  return config


def _with_new_aggregator(config: ml_collections.ConfigDict,
                         backbone: Mapping[str, Any]) -> dict[str, Any]:
  """Whole-model variables: `backbone` plus a freshly initialised aggregator (config.seed)."""
  model = vpr_model.build_model(config)
  abstract = jax.eval_shape(lambda: vpr_model.init_variables(model, jax.random.key(0)))
  h, w, c = vpr_model.backbone_output_shape(config.model, config.image_size)
  aggregator = aggregators.make_aggregator(config.model, c, (h, w))
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
                       kind: str = 'auto',
                       overwrite: bool = False) -> tuple[ml_collections.ConfigDict, dict]:
  """Converts a PyTorch file and writes an inference checkpoint that `vpr_jax.eval` loads.

  Nothing is written unless the whole conversion succeeds.

  Args:
    config: the full config of the model the weights belong to.
    torch_checkpoint: `.pth` / `.ckpt` path.
    out: output checkpoint directory (must not exist or be empty, unless `overwrite`).
    kind: 'auto', 'torchvision' (backbone only: the aggregator is initialised from config.seed)
      or 'family' (whole model).
    overwrite: replace a non-empty `out`.

  Returns:
    (the config saved with the checkpoint, the variables written).
  """
  if kind not in KINDS:
    raise ValueError(f'Unknown kind {kind!r}; valid choices: {", ".join(KINDS)}.')
  if os.path.isdir(out) and os.listdir(out) and not overwrite:  # Fail before the slow part.
    raise FileExistsError(f'{out} already exists and is not empty; choose another output '
                          'directory or pass overwrite=True (CLI: --overwrite).')
  state_dict = load_torch_state_dict(torch_checkpoint)
  if kind == 'auto':
    kind = detect_kind(state_dict)
  source = os.fspath(torch_checkpoint)
  if kind == 'family':
    config = _adapt_config_to_checkpoint(config, state_dict)
    variables = family_checkpoint_to_flax(state_dict, config, source=source)
  else:
    backbone = torchvision_resnet_to_flax(
        state_dict, vpr_model.backbone_depth(config.model), tuple(config.model.layers_to_crop),
        source=source)
    variables = jax.tree.map(np.asarray, _with_new_aggregator(config, backbone))
    print(f'{source}: backbone only; the {config.model.aggregator} aggregator is randomly '
          f'initialised (seed {config.seed}).', file=sys.stderr)
  checkpointing.save_inference_checkpoint(out, config, variables, overwrite=overwrite)
  return config, variables


# ----------------------------------------------------------------------------------------------
# Command line.

# Hyphenated spellings accepted for the CLI's own flags (absl itself only knows underscores).
_HYPHENATED_FLAGS = ('torch-checkpoint',)


def _normalise_argv(argv: Sequence[str]) -> list[str]:
  result = []
  for arg in argv:
    for name in _HYPHENATED_FLAGS:
      for dashes in ('--', '--no'):
        spelled = dashes + name
        if arg == spelled or arg.startswith(spelled + '='):
          arg = dashes + name.replace('-', '_') + arg[len(spelled):]
    result.append(arg)
  return result


def _define_flags():
  """Defines the CLI flags; only when run as a program, as other entry points define --config."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Config file describing the model.',
                                  lock_config=True)
  flags.DEFINE_string('torch_checkpoint', None, 'PyTorch .pth / .ckpt file to convert.')
  flags.DEFINE_string('out', None, 'Output checkpoint directory (for vpr_jax.eval --checkpoint).')
  flags.DEFINE_enum('kind', 'auto', KINDS, 'torchvision: ImageNet ResNet state dict (backbone '
                    'only); family: gsv-cities / MixVPR / mldl24-vpr model; auto: detect.')
  flags.DEFINE_bool('overwrite', False, 'Replace a non-empty --out directory.')
  flags.mark_flags_as_required(['config', 'torch_checkpoint', 'out'])


def main(argv):
  if len(argv) > 1:
    raise ValueError(f'Unexpected arguments: {argv[1:]}')
  from vpr_jax import cli  # pylint: disable=g-import-not-at-top
  config, variables = cli.report_user_errors(
      convert_checkpoint, FLAGS.config, FLAGS.torch_checkpoint, FLAGS.out, kind=FLAGS.kind,
      overwrite=FLAGS.overwrite)
  counts = vpr_model.count_parameters(variables['params'], config.model.layers_to_freeze)
  print(vpr_model.format_parameter_table(counts, config.model))
  print(f'Wrote {os.path.abspath(FLAGS.out)}')


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main, argv=_normalise_argv(sys.argv))
