"""A vpr_jax checkpoint -> the PyTorch files that the family's own code loads (no torch needed).

The inverse of `converter`: the variables of a training run or converted checkpoint are renamed
and transposed by the same table (`transformer_mapping.CheckpointKeys`) into one of the authors'
state-dict layouts, and written as

* `lightning`: `{'state_dict': {...}}` with gsv-cities / MixVPR names (`backbone.model.<torchvision
  ResNet names>`, `aggregator.*` of AVG / GeM / ConvAP / MixVPR / NetVLAD), which the authors'
  `VPRModel` loads with `model.load_state_dict(torch.load(FILE)['state_dict'])`;
* `pth`: the same state dict bare (`model.load_state_dict(torch.load(FILE))`);
* `salad`: the layout of SALAD's `dino_salad.ckpt` (bare; `backbone.model.<hub ViT names>`,
  `aggregator.*`), which serizba/salad's `VPRModel` loads;
* `boq`: the layout of BoQ's released files (bare; `backbone.dino.*` or `backbone.net.*`,
  `aggregator.*`), which amaralibey/Bag-of-Queries' `VPRModel` loads;
* `safetensors`: the model's own one of these layouts as a safetensors file (`safetensors.numpy`).

The torch files are written by `torch_writer` (torch's zip format, read by
`torch.load(FILE, weights_only=True)`). Every parameter (frozen or trained) and every BatchNorm
running statistic is written in float32, with the `num_batches_tracked` counters torch keeps;
keys that the torch modules have but vpr_jax does not (the hub ViT's `mask_token`, BoQ's unused
final ViT norm) are written with the values torch initialises them to, and listed in the JSON.
`FILE.json` beside the file says how to feed the model: the input size and resize, the
normalisation, the descriptor size and the authors' constructor call.
"""

import collections
import contextlib
import importlib.resources
import json
import os
import runpy
from typing import Any, Mapping, Optional

from flax import traverse_util
import ml_collections
import numpy as np
import safetensors.numpy

from vpr_jax import fileio
from vpr_jax.checkpoints import orbax_states
from vpr_jax.checkpoints import run_config
from vpr_jax.checkpoints import runs
from vpr_jax.conversion import torch_writer
from vpr_jax.conversion import transformer_mapping
from vpr_jax.errors import ConfigError
from vpr_jax.errors import ExportFormatError
from vpr_jax.errors import OutputPathError
from vpr_jax.models import resnet
from vpr_jax.models import vpr_model

FORMATS = ('lightning', 'pth', 'salad', 'boq', 'safetensors')
# The aggregators the gsv-cities / MixVPR layout names (on a torchvision ResNet).
FAMILY_AGGREGATORS = ('avg', 'gem', 'convap', 'mixvpr', 'netvlad')
# What each format holds, for the messages.
FORMAT_MODELS = {
    'lightning': 'a ResNet backbone with AVG, GeM, ConvAP, MixVPR or NetVLAD (gsv-cities / MixVPR)',
    'pth': 'a ResNet backbone with AVG, GeM, ConvAP, MixVPR or NetVLAD (gsv-cities / MixVPR)',
    'salad': 'a DINOv2 backbone with SALAD (serizba/salad)',
    'boq': 'BoQ on a DINOv2 or ResNet backbone (amaralibey/Bag-of-Queries)',
}
_FORMAT_LAYOUTS = {'lightning': ('family',), 'pth': ('family',), 'salad': ('salad',),
                   'boq': ('boq_dinov2', 'boq_resnet')}
_DEFAULT_FORMATS = {'family': 'lightning', 'salad': 'salad', 'boq_dinov2': 'boq',
                    'boq_resnet': 'boq'}
SIDECAR_SUFFIX = '.json'
WRITTEN_BY = 'vpr_jax.export'
_AGGREGATOR_FIELD_PREFIXES = {'gem': ('gem_',), 'convap': ('convap_',), 'mixvpr': ('mixvpr_',),
                              'salad': ('salad_num', 'salad_cluster', 'salad_token'),
                              'boq': ('boq_',), 'netvlad': ('netvlad_num_clusters',)}


def describe_model(config: ml_collections.ConfigDict) -> str:
  """e.g. 'resnet18 (crop (4,)) + mixvpr' or 'dinov2_vitb14 + salad'."""
  mc = config.model
  backbone = str(mc.backbone)
  if not vpr_model.is_vit(mc):
    backbone += f' (crop {tuple(mc.layers_to_crop)})'
  return f'{backbone} + {vpr_model.aggregator_name(mc)}'


def model_layout(config: ml_collections.ConfigDict) -> str:
  """The authors' layout that holds the configured model (`CHECKPOINT_LAYOUTS` name).

  Raises:
    ExportFormatError: no layout of the family holds it (e.g. a DINOv2 backbone with GeM).
  """
  mc = config.model
  name = vpr_model.aggregator_name(mc)
  vit = vpr_model.is_vit(mc)
  if name == 'salad':
    return 'salad'
  if name == 'boq':
    if not vit and 3 in tuple(mc.layers_to_crop):
      raise ExportFormatError(
          f'{describe_model(config)}: BoQ\'s ResNet keeps layer1-3 (crop_last_block drops layer4 '
          'only), so no BoQ file holds a backbone cropped before layer3.')
    return 'boq_dinov2' if vit else 'boq_resnet'
  if not vit and name in FAMILY_AGGREGATORS:
    return 'family'
  raise ExportFormatError(f'{describe_model(config)}: none of the PyTorch layouts written '
                          f'({"; ".join(sorted(set(FORMAT_MODELS.values())))}) holds this model.')


def default_format(config: ml_collections.ConfigDict) -> str:
  """lightning for the ResNet family, salad for SALAD, boq for BoQ."""
  return _DEFAULT_FORMATS[model_layout(config)]


def format_layout(config: ml_collections.ConfigDict, export_format: str) -> str:
  """The layout a format writes the model in, or ExportFormatError when it cannot hold it."""
  if export_format not in FORMATS:
    raise ConfigError(f'Unknown export format {export_format!r}; valid choices: '
                      f'{", ".join(FORMATS)}.')
  layout = model_layout(config)
  if export_format != 'safetensors' and layout not in _FORMAT_LAYOUTS[export_format]:
    raise ExportFormatError(
        f'--format {export_format} holds {FORMAT_MODELS[export_format]}, but the checkpoint is '
        f'{describe_model(config)}; use --format {default_format(config)} (or safetensors).')
  return layout


def _batch_norm_modules(batch_stats: Mapping[str, Any]) -> list[tuple]:
  """Flax paths of the BatchNorm modules (those holding running statistics)."""
  return sorted({path[:-1] for path in traverse_util.flatten_dict(dict(batch_stats))
                 if path[-1] == 'mean'})


def _frozen_bn_stages(config) -> tuple[str, ...]:
  """Backbone stages whose BatchNorms keep their running statistics in training."""
  backbone = vpr_model.make_backbone(config.model, np.float32)
  return backbone.frozen_bn_stages() if isinstance(backbone, resnet.ResNet) else ()


def _filled_in_vit_keys(variables, keys: transformer_mapping.CheckpointKeys) -> dict:
  """Keys of the hub ViT that vpr_jax does not hold, at torch's initial values."""
  backbone = variables['params']['backbone']
  dim = int(np.shape(backbone['cls_token'])[-1])
  filled = {keys.backbone_prefix + transformer_mapping.VIT_MASK_TOKEN: np.zeros((1, dim),
                                                                              np.float32)}
  if 'norm' not in backbone:  # BoQ skips the final norm; the hub module still has one.
    filled[keys.backbone_prefix + 'norm.weight'] = np.ones((dim,), np.float32)
    filled[keys.backbone_prefix + 'norm.bias'] = np.zeros((dim,), np.float32)
  return filled


def export_state_dict(config: ml_collections.ConfigDict, variables: Mapping[str, Any],
                      layout: str, step: int = 0) -> tuple[dict[str, np.ndarray], list[str]]:
  """The model's variables as a PyTorch state dict of the authors' layout.

  Args:
    config: the checkpoint's config.
    variables: {'params': ..., 'batch_stats': ...} (numpy arrays, or any array-likes with shapes).
    layout: a `transformer_mapping.CHECKPOINT_LAYOUTS` name (see `format_layout`).
    step: training steps of the checkpoint: each BatchNorm's `num_batches_tracked` (0 for the
      frozen-statistics stages, `model.freeze_bn_stats`; a converted checkpoint has step 0).

  Returns:
    ({torch key: numpy array in torch layout, float32 or int64 counters}, the keys filled in at
    torch's initial values because vpr_jax holds no such weight).
  """
  keys = transformer_mapping.CheckpointKeys(layout)
  trees = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  state_dict = {}
  for key, array in transformer_mapping.flax_to_state_dict(trees, keys).items():
    state_dict[key] = array.astype(np.float32, copy=False) if array.dtype.kind == 'f' else array
  frozen = _frozen_bn_stages(config)
  for path in _batch_norm_modules(trees['batch_stats']):
    # The batches that updated this BatchNorm's statistics: none in a frozen-statistics stage.
    counter = 0 if len(path) > 1 and path[1] in frozen else int(step)
    key = keys('batch_stats', path + (transformer_mapping.BATCH_COUNTER,))
    state_dict[key] = np.array(counter, np.int64)
  filled = {}
  if keys.backbone_kind == 'vit':
    filled = _filled_in_vit_keys(trees, keys)
    state_dict.update(filled)
  return state_dict, sorted(filled)


def _eval_transform(config: ml_collections.ConfigDict) -> dict[str, Any]:
  h, w = vpr_model.eval_image_size(config)
  mean, std = list(vpr_model.IMAGENET_MEAN), list(vpr_model.IMAGENET_STD)
  normalize = f'T.Normalize(mean={mean}, std={std})'
  interpolation = str(config.data.get('eval_interpolation', 'bilinear'))
  if interpolation == 'bicubic':
    code = (f'T.Compose([T.ToTensor(), T.Resize(({h}, {w}), '
            f'interpolation=T.InterpolationMode.BICUBIC, antialias=True), {normalize}])')
    note = ('Resize on the float tensor, as BoQ does; vpr_jax rounds the resized image to uint8, '
            'at most 0.5/255 per pixel from this transform.')
  else:
    code = (f'T.Compose([T.Resize(({h}, {w}), interpolation=T.InterpolationMode.BILINEAR), '
            f'T.ToTensor(), {normalize}])')
    note = 'Resize on the PIL image (torchvision\'s Resize of a PIL image), as the family does.'
  return {'image_size': [h, w], 'interpolation': interpolation, 'mean': mean, 'std': std,
          'input': 'RGB image as decoded (PIL .convert("RGB"); EXIF orientation not applied), '
                   'NCHW float tensor', 'torchvision': code, 'note': note}


def _architecture(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The fields that fix the exported weights and the input (to recognise a packaged config)."""
  mc = config.model
  name = vpr_model.aggregator_name(mc)
  fields = {'backbone': str(mc.backbone), 'aggregator': name,
            'image_size': tuple(config.image_size),
            'eval_image_size': vpr_model.eval_image_size(config),
            'eval_interpolation': str(config.data.get('eval_interpolation', 'bilinear'))}
  if vpr_model.is_vit(mc):
    fields.update({k: mc.get(k) for k in ('vit_embed_dim', 'vit_depth', 'vit_num_heads',
                                          'vit_pretrained_grid', 'num_register_tokens',
                                          'apply_final_norm')})
  else:
    fields['layers_to_crop'] = tuple(mc.layers_to_crop)
  for key in mc.keys():
    if key.startswith(_AGGREGATOR_FIELD_PREFIXES.get(name, ())):
      value = mc[key]
      fields[key] = tuple(value) if isinstance(value, (list, tuple)) else value
  return fields


def packaged_config_names(config: ml_collections.ConfigDict) -> list[str]:
  """The packaged configs (`--config NAME`) whose model and input sizes are this config's."""
  wanted = _architecture(config)
  names = []
  folder = importlib.resources.files('vpr_jax.configs')
  for entry in sorted(folder.iterdir(), key=lambda e: e.name):
    if not entry.name.endswith('.py') or entry.name.startswith('_'):
      continue
    with importlib.resources.as_file(entry) as path:
      candidate = runpy.run_path(str(path))['get_config']()
    if _architecture(candidate) == wanted:
      names.append(entry.name[:-3])
  return names


def _family_constructor(config) -> str:
  mc = config.model
  name = vpr_model.aggregator_name(mc)
  h, w, c = vpr_model.backbone_output_shape(mc, config.image_size)
  agg = {'avg': ('AVG', {}),
         'gem': ('GeM', {'p': float(mc.gem_p)}),
         'convap': ('ConvAP', {'in_channels': c, 'out_channels': int(mc.convap_out_channels),
                               's1': int(mc.convap_pool_size[0]),
                               's2': int(mc.convap_pool_size[1])}),
         'mixvpr': ('MixVPR', {'in_channels': c, 'in_h': h, 'in_w': w,
                               'out_channels': int(mc.mixvpr_out_channels),
                               'mix_depth': int(mc.mixvpr_mix_depth),
                               'mlp_ratio': mc.mixvpr_mlp_ratio,
                               'out_rows': int(mc.mixvpr_out_rows)}),
         'netvlad': ('NetVLAD', {'clusters_num': int(mc.netvlad_num_clusters), 'dim': c})}[name]
  return (f"VPRModel(backbone_arch='{mc.backbone}', pretrained=False, "
          f"layers_to_crop={list(mc.layers_to_crop)}, agg_arch='{agg[0]}', agg_config={agg[1]})")


def _vit_name(mc) -> str:
  if int(mc.get('vit_embed_dim', 0)):
    return (f'{mc.backbone} resized (width {mc.vit_embed_dim}, {mc.vit_depth} blocks, '
            f'{mc.vit_num_heads} heads: not a hub model)')
  return str(mc.backbone) + ('_reg' if int(mc.get('num_register_tokens', 0)) else '')


def pytorch_constructor(config: ml_collections.ConfigDict, layout: str) -> dict[str, str]:
  """The authors' repository and the call that builds the model a file of `layout` loads into."""
  mc = config.model
  if layout == 'family':
    return {'repository': 'amaralibey/gsv-cities or amaralibey/MixVPR (main.py)',
            'code': _family_constructor(config)}
  _, _, c = vpr_model.backbone_output_shape(mc, config.image_size)
  if layout == 'salad':
    backbone = {'num_trainable_blocks': int(mc.num_trainable_blocks), 'return_token': True,
                'norm_layer': bool(mc.apply_final_norm)}
    aggregator = {'num_channels': c, 'num_clusters': int(mc.salad_num_clusters),
                  'cluster_dim': int(mc.salad_cluster_dim), 'token_dim': int(mc.salad_token_dim)}
    return {'repository': 'serizba/salad (vpr_model.py, hubconf.py)',
            'code': (f"VPRModel(backbone_arch='{_vit_name(mc)}', backbone_config={backbone}, "
                     f"agg_arch='SALAD', agg_config={aggregator})")}
  boq = (f'BoQ(in_channels={c}, proj_channels={int(mc.boq_proj_channels)}, '
         f'num_queries={int(mc.boq_num_queries)}, num_layers={int(mc.boq_num_layers)}, '
         f'row_dim={int(mc.boq_row_dim)})')
  if layout == 'boq_dinov2':
    backbone = (f"DinoV2(backbone_name='{_vit_name(mc)}', "
                f'unfreeze_n_blocks={int(mc.num_trainable_blocks)})')
  else:
    backbone = (f"ResNet(backbone_name='{mc.backbone}', pretrained=False, "
                f'crop_last_block={4 in tuple(mc.layers_to_crop)})')
  return {'repository': 'amaralibey/Bag-of-Queries (hubconf.py, src/backbones.py, src/boq.py)',
          'code': f'VPRModel(backbone={backbone}, aggregator={boq})'}


def _load_call(export_format: str) -> str:
  if export_format == 'lightning':
    return "model.load_state_dict(torch.load(FILE, weights_only=True)['state_dict'])"
  if export_format == 'safetensors':
    return 'model.load_state_dict(safetensors.torch.load_file(FILE))'
  return 'model.load_state_dict(torch.load(FILE, weights_only=True))'


def sidecar(config: ml_collections.ConfigDict, out: str, export_format: str, layout: str,
            checkpoint: str, step: int, num_tensors: int, filled_in: list[str]) -> dict[str, Any]:
  """The JSON written beside the exported file: what it holds and how to feed the model."""
  mc = config.model
  size = vpr_model.eval_image_size(config)
  return {
      'written_by': WRITTEN_BY,
      'file': os.path.basename(out),
      'format': export_format,
      'layout': layout,
      'config_names': packaged_config_names(config),
      'model': describe_model(config),
      'image_size': list(size),
      'train_image_size': [int(s) for s in config.image_size],
      'descriptor_size': int(vpr_model.model_descriptor_dim(mc, size)),
      'descriptor': 'float32, unit L2 norm; compare by inner product (or L2 distance)',
      'eval_transform': _eval_transform(config),
      'pytorch_model': pytorch_constructor(config, layout),
      'load': _load_call(export_format).replace('FILE', repr(os.path.basename(out))),
      'tensors': int(num_tensors),
      'dtype': 'float32 (num_batches_tracked: int64)',
      'source_checkpoint': os.fspath(checkpoint),  # As given: no local absolute path.
      'step': int(step),
      'num_batches_tracked': 'training steps of the checkpoint (0 for a converted checkpoint '
                             'and for BatchNorms with frozen statistics); torch reads it only '
                             'when a BatchNorm has momentum=None',
      'filled_in': {key: 'not held by vpr_jax; written at torch\'s initial value' for key in
                    filled_in},
  }


def _is_own_export(out: str, sidecar_path: str) -> bool:
  """Whether `sidecar_path` is a JSON that vpr_jax.export wrote for the file `out`."""
  try:
    with open(sidecar_path, encoding='utf-8') as f:
      info = json.load(f)
  except (OSError, ValueError):
    return False
  return (isinstance(info, dict) and info.get('written_by') == WRITTEN_BY
          and info.get('file') == os.path.basename(out))


def check_outputs(out: str, overwrite: bool) -> tuple[str, str]:
  """Checks before any work that `out` and `out.json` can be written; returns both paths.

  An existing file is replaced only with `overwrite`, and only when it is an earlier export
  (its JSON beside it says so): a command never replaces a file it did not write.
  """
  out = fileio.check_output_path(out, '--out')
  sidecar_path = fileio.check_output_path(out + SIDECAR_SUFFIX, '--out\'s JSON')
  existing = [p for p in (out, sidecar_path) if os.path.lexists(p)]
  if existing and not overwrite:
    raise OutputPathError(f'{existing[0]} already exists; choose another --out, or pass '
                          '--overwrite to replace an earlier export.')
  if existing and not _is_own_export(out, sidecar_path):
    raise OutputPathError(
        f'{existing[0]} was not written by vpr_jax.export (no {os.path.basename(sidecar_path)} '
        'of an export beside it); --overwrite only replaces an earlier export. Choose another '
        '--out.')
  return out, sidecar_path


def _writer(export_format: str, state_dict: dict[str, np.ndarray], layout: str):
  """A function that writes the file's bytes into an open binary file."""
  if export_format == 'safetensors':
    # np.array, not np.ascontiguousarray, which turns 0-d values (SALAD's dust_bin) into 1-d.
    tensors = {k: np.array(v, order='C') for k, v in state_dict.items()}
    data = safetensors.numpy.save(tensors, metadata={'format': 'pt', 'layout': layout,
                                                     'written_by': WRITTEN_BY})
    return lambda f: f.write(data)
  # torch's state dicts are OrderedDicts; torch.load gives one back as such.
  obj = collections.OrderedDict(state_dict)
  if export_format == 'lightning':
    obj = {'state_dict': obj}
  return lambda f: torch_writer.save(obj, f)


def write_export(out: str, sidecar_path: str, export_format: str, layout: str,
                 state_dict: dict[str, np.ndarray], info: Mapping[str, Any]) -> None:
  """Writes the file and its JSON, each whole (temporary file + rename), the JSON last."""
  existed = os.path.lexists(out)
  write = _writer(export_format, state_dict, layout)
  text = json.dumps(info, indent=2) + '\n'
  try:
    with fileio.atomic_open(sidecar_path) as sidecar_file:
      sidecar_file.write(text)
      with fileio.atomic_open(out, binary=True) as model_file:
        write(model_file)
  except BaseException:
    # The JSON failed after the new file was in place: a new file without its JSON is removed.
    if not existed and not os.path.lexists(sidecar_path):
      with contextlib.suppress(FileNotFoundError):
        os.remove(out)
    raise


def export_checkpoint(checkpoint: str, out: str, export_format: Optional[str] = None,
                      overwrite: bool = False, step: Optional[int] = None) -> dict[str, Any]:
  """Writes a vpr_jax checkpoint as a PyTorch file of the authors' layout, and `out.json`.

  Args:
    checkpoint: a training workdir, its checkpoints/ folder, or a converted checkpoint (the best
      step by validation R@1, else the latest; or `step`).
    out: the file to write (`.ckpt`, `.pth`, `.safetensors`); `out.json` is written beside it.
    export_format: one of FORMATS; None: the model's own (`default_format`).
    overwrite: replace an earlier export at `out` (another file there is refused).
    step: a particular step of a training run.

  Returns:
    The JSON written beside the file (as a dict).

  Raises:
    ExportFormatError: the format cannot hold the checkpoint's model.
    OutputPathError: `out` exists (without `overwrite`, or not an export), or cannot be written.
    CheckpointNotFoundError, CheckpointMismatchError: as `orbax_states.load_for_eval`.
  """
  out, sidecar_path = check_outputs(out, overwrite)
  config = run_config.read_config(runs.resolve_checkpoint_dir(checkpoint))
  export_format = export_format or default_format(config)
  layout = format_layout(config, export_format)  # Refused before the variables are read.
  config, variables, step = orbax_states.load_for_eval(checkpoint, step)
  state_dict, filled_in = export_state_dict(config, variables, layout, step)
  info = sidecar(config, out, export_format, layout, checkpoint, step, len(state_dict), filled_in)
  write_export(out, sidecar_path, export_format, layout, state_dict, info)
  return info
