"""A run's configuration as JSON: writing, reading, comparing, and whether a run may resume.

A training run saves its whole ConfigDict as `config.json` beside its checkpoints; evaluation and
resumption read it back, so the config is the single source of truth about a checkpoint.

`config.json` also records the version of the names it uses (`CONFIG_VERSION_KEY`), so that a
name whose meaning changed is read back with the meaning it had when the file was written:
  1 (no version recorded): optim.optimizer='adam' was torch.optim.Adam (L2 weight decay); it is
    read as 'adam_l2', that optimiser's name now.
  2: 'adam' is AdamW, as the gsv-cities family's configure_optimizers builds it.
"""

import json
import os
from typing import Sequence

import ml_collections

from vpr_jax import fileio
from vpr_jax.checkpoints import runs
from vpr_jax.errors import CheckpointMismatchError
from vpr_jax.errors import CheckpointNotFoundError

# 2: optim.optimizer='adam' builds AdamW (before: L2 Adam, now 'adam_l2').
# 3: sync_batch_norm (before: always synced, what sync_batch_norm=True does).
CONFIG_VERSION = 3
# Top-level key of config.json beside the config's fields; not a config field itself.
CONFIG_VERSION_KEY = 'vpr_jax_config_version'

# Config fields that may differ between a checkpoint and the run that resumes it: they change how
# the run is driven (length, logging, paths, worker counts), not what is being trained.
RESUMABLE_CONFIG_FIELDS = (
    'max_steps', 'num_epochs', 'parallel', 'eval_every_epochs', 'eval_before_training',
    'keep_best', 'checkpoint_every_steps', 'log_every_steps', 'on_nonfinite',
    'model.backbone_weights', 'model.dtype',
    'data.root', 'data.train_dir', 'data.cache_dir', 'data.rebuild_index', 'data.num_workers',
    'data.prefetch_buffer_size', 'data.max_bad_image_fraction', 'data.val_datasets',
    'data.positive_radius_m', 'data.eval_batch_size', 'data.ground_truth_dir',
    'data.prepared_benchmarks',
)


def config_to_json(config: ml_collections.ConfigDict) -> str:
  """Serialises a ConfigDict to indented JSON with sorted keys.

  Args:
    config: the configuration.

  Returns:
    The JSON text (tuples become lists; `config_from_json` turns them back into tuples).
  """
  return config.to_json(indent=2, sort_keys=True)


def _lists_to_tuples(value):
  if isinstance(value, dict):
    return {k: _lists_to_tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_lists_to_tuples(v) for v in value)
  return value


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """Parses the JSON written by `config_to_json`.

  Args:
    text: JSON text of a configuration.

  Returns:
    The ConfigDict; JSON lists become tuples, as in configs/default.py.
  """
  return ml_collections.ConfigDict(_lists_to_tuples(json.loads(text)))


def flatten_config(config) -> dict:
  if isinstance(config, ml_collections.ConfigDict):
    config = json.loads(config_to_json(config))
  flat = {}

  def visit(prefix, value):
    if isinstance(value, dict):
      for k, v in value.items():
        visit(f'{prefix}.{k}' if prefix else k, v)
    else:
      flat[prefix] = _lists_to_tuples(value)

  visit('', config)
  return flat


def config_differences(saved, current, ignore: Sequence[str] = ()) -> list[str]:
  """Lists the fields that differ between two configurations.

  Args:
    saved: the configuration of a checkpoint (ConfigDict or dict).
    current: the configuration of this run.
    ignore: dotted field names not compared.

  Returns:
    Lines like "optim.learning_rate: checkpoint 0.0005, this run 0.001", sorted by field.
  """
  a, b = flatten_config(saved), flatten_config(current)
  lines = []
  for key in sorted(set(a) | set(b)):
    if key in ignore or any(key.startswith(prefix + '.') for prefix in ignore):
      continue
    if key not in a:
      lines.append(f'{key}: absent from the checkpoint, this run {b[key]!r}')
    elif key not in b:
      lines.append(f'{key}: checkpoint {a[key]!r}, absent from this run')
    elif a[key] != b[key]:
      lines.append(f'{key}: checkpoint {a[key]!r}, this run {b[key]!r}')
  return lines


def _in_current_names(fields: dict, version: int) -> dict:
  """The fields of a config.json of `version`, renamed to today's names of the same choices."""
  optim_fields = fields.get('optim')
  if version < 2 and isinstance(optim_fields, dict) and optim_fields.get('optimizer') == 'adam':
    optim_fields['optimizer'] = 'adam_l2'
  if version < 3:
    # Batch statistics were always synchronised over the devices before the field existed.
    fields.setdefault('sync_batch_norm', True)
  return fields


def _read_saved_config(directory: str) -> tuple[ml_collections.ConfigDict, int]:
  """(config in today's names, the version of the names the file was written with)."""
  path = os.path.join(directory, runs.CONFIG_FILENAME)
  if not os.path.isfile(path):
    raise CheckpointNotFoundError(
        f'{path} not found: a checkpoint directory holds {runs.CONFIG_FILENAME}.')
  try:
    with open(path) as f:
      fields = json.loads(f.read())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointMismatchError(
        f'{path} is not valid JSON ({e}); the checkpoint may be truncated.') from e
  if not isinstance(fields, dict):
    raise CheckpointMismatchError(f'{path} holds a JSON {type(fields).__name__}, expected an '
                                  'object of config fields.')
  version = fields.pop(CONFIG_VERSION_KEY, 1)
  if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= (
      CONFIG_VERSION):
    raise CheckpointMismatchError(
        f'{path}: {CONFIG_VERSION_KEY} is {version!r}; this vpr_jax reads versions 1 to '
        f'{CONFIG_VERSION} (a newer vpr_jax wrote it?).')
  return ml_collections.ConfigDict(_lists_to_tuples(_in_current_names(fields, version))), version


def read_config(directory: str) -> ml_collections.ConfigDict:
  """Reads `directory/config.json` in today's names, with a clear error when it is missing or
  unreadable (an older file's renamed choices are read under their new names)."""
  return _read_saved_config(directory)[0]


def _check_renamed_choices(directory: str, saved: ml_collections.ConfigDict, version: int,
                           config: ml_collections.ConfigDict) -> None:
  """Refuses a resume where a name of the checkpoint's config.json now means another choice."""
  if (version < 2 and flatten_config(saved).get('optim.optimizer') == 'adam_l2'
      and flatten_config(config).get('optim.optimizer') == 'adam'):
    raise CheckpointMismatchError(
        f"{os.path.join(directory, runs.CONFIG_FILENAME)} says optim.optimizer='adam', written "
        "when 'adam' was torch.optim.Adam (L2 weight decay); 'adam' now builds AdamW as the "
        "gsv-cities family does. Resume with --config.optim.optimizer=adam_l2 to keep the "
        "checkpoint's optimiser, or train 'adam' in another workdir.")


def check_resumable(directory: str, config: ml_collections.ConfigDict) -> list[str]:
  """Checks, without writing anything, that a run of `config` may resume from `directory`.

  Args:
    directory: a checkpoint directory (it need not exist).
    config: the configuration of this run.

  Returns:
    The run settings (`RESUMABLE_CONFIG_FIELDS`) that differ from the checkpoint's, as lines.

  Raises:
    CheckpointMismatchError: the checkpoint was written with another configuration (the
      differing fields are listed), or it holds steps but no config.json. A folder without any
      completed step is never refused.
  """
  directory = os.path.abspath(os.fspath(directory))
  has_steps = bool(runs.finalized_steps(os.path.join(directory, runs.LATEST_SUBDIR)) or
                   runs.finalized_steps(os.path.join(directory, runs.BEST_SUBDIR)))
  if not has_steps:
    # A run that failed before its first checkpoint left at most its config.json: nothing to
    # resume, so nothing blocks a corrected rerun (which writes its own config.json).
    return []
  if os.path.exists(os.path.join(directory, runs.CONFIG_FILENAME)):
    saved, version = _read_saved_config(directory)
    _check_renamed_choices(directory, saved, version, config)
    differences = config_differences(saved, config, ignore=RESUMABLE_CONFIG_FIELDS)
    if differences:
      raise CheckpointMismatchError(
          f'The checkpoint in {directory} was written with a different configuration; '
          'use another workdir or the same configuration. Differences:\n  ' +
          '\n  '.join(differences))
    return config_differences(saved, config)
  raise CheckpointMismatchError(
      f'{directory} holds checkpoint steps but no {runs.CONFIG_FILENAME}; refusing to resume '
      'from or write over a checkpoint whose configuration is unknown.')


def write_config(directory: str, config: ml_collections.ConfigDict) -> None:
  """Writes `directory/config.json` atomically (the folder is created if missing), with the
  version of the names it uses."""
  fields = json.loads(config_to_json(config))
  if CONFIG_VERSION_KEY in fields:
    raise ValueError(f'{CONFIG_VERSION_KEY} is reserved in config.json; it is not a config field.')
  fields[CONFIG_VERSION_KEY] = CONFIG_VERSION
  fileio.atomic_write(os.path.join(directory, runs.CONFIG_FILENAME),
                      json.dumps(fields, indent=2, sort_keys=True))
