"""A run's configuration as JSON: writing, reading, comparing, and whether a run may resume.

A training run saves its whole ConfigDict as `config.json` beside its checkpoints; evaluation and
resumption read it back, so the config is the single source of truth about a checkpoint.
"""

import json
import os
from typing import Sequence

import ml_collections

from vpr_jax import fileio
from vpr_jax.checkpoints import runs
from vpr_jax.errors import CheckpointMismatchError
from vpr_jax.errors import CheckpointNotFoundError

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


def read_config(directory: str) -> ml_collections.ConfigDict:
  """Reads `directory/config.json`, with a clear error when it is missing or unreadable."""
  path = os.path.join(directory, runs.CONFIG_FILENAME)
  if not os.path.isfile(path):
    raise CheckpointNotFoundError(
        f'{path} not found: a checkpoint directory holds {runs.CONFIG_FILENAME}.')
  try:
    with open(path) as f:
      return config_from_json(f.read())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointMismatchError(
        f'{path} is not valid JSON ({e}); the checkpoint may be truncated.') from e


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
    saved = read_config(directory)
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
  """Writes `directory/config.json` atomically (the folder is created if missing)."""
  fileio.atomic_write(os.path.join(directory, runs.CONFIG_FILENAME), config_to_json(config))
