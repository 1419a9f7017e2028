"""orbax checkpoints: training states (best-N by R@1 + latest), inference checkpoints.

Each step folder (see `runs` for the folder layout) holds the items 'variables' ({'params',
'batch_stats'}) and, for training runs, 'train' (optimiser state, step, RNG, counters),
'data_iterator' (the grain iterator state, JSON) and 'info' (JSON: epoch, validation recalls). A
converted checkpoint holds only `latest/0/variables`.

orbax writes each step into a temporary folder and renames it when complete, and saves here are
synchronous, so a save that fails leaves the previous checkpoints untouched: older steps are
removed only after the new one is committed.
"""

import base64
import contextlib
import datetime
import errno
import functools
import json
import os
import shutil
import time
from typing import Any, Mapping, Optional, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from vpr_jax import fileio
from vpr_jax.checkpoints import run_config
from vpr_jax.checkpoints import runs
from vpr_jax.errors import CheckpointMismatchError
from vpr_jax.errors import CheckpointNotFoundError
from vpr_jax.errors import CheckpointWriteError
from vpr_jax.errors import OutputPathError

_ITEM_HANDLERS = {
    'variables': ocp.StandardCheckpointHandler,
    'train': ocp.StandardCheckpointHandler,
    'data_iterator': ocp.JsonCheckpointHandler,
    'info': ocp.JsonCheckpointHandler,
}


def _r1_of(metrics: Mapping[str, Any]) -> float:
  return float(metrics['r1'])


def _make_manager(directory: str, *, max_to_keep: Optional[int], best: bool,
                  read_only: bool = False) -> ocp.CheckpointManager:
  # A read-only manager needs no save interval; giving none keeps orbax from warning about it.
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=0 if read_only else 1,
      max_to_keep=max_to_keep,
      best_fn=_r1_of if best else None,
      best_mode='max',
      keep_checkpoints_without_metrics=False,
      # Synchronous saves: save() returns once the step folder is committed, and a failed save
      # raises before older steps are removed.
      enable_async_checkpointing=False,
      # Leftovers of interrupted saves are removed by `_remove_unfinished_saves` instead, which
      # runs synchronously (orbax's background cleanup can race a writer that is still closing).
      cleanup_tmp_directories=False,
      create=not read_only,
      read_only=read_only,
  )
  handlers = {name: cls() for name, cls in _ITEM_HANDLERS.items()}
  # orbax warns that a read-only manager is read-only; that is the point here.
  with _absl_verbosity(logging.ERROR) if read_only else contextlib.nullcontext():
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


@contextlib.contextmanager
def _absl_verbosity(level):
  previous = logging.get_verbosity()
  logging.set_verbosity(level)
  try:
    yield
  finally:
    logging.set_verbosity(previous)


def _quiet():
  """orbax logs tens of INFO lines per save; shown only with debug logging (-v 1)."""
  if logging.get_verbosity() > logging.INFO:
    return contextlib.nullcontext()
  return _absl_verbosity(logging.WARNING)


def _quietly(fn):
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    with _quiet():
      return fn(*args, **kwargs)
  return wrapper


def _unfinished_saves(manager_dir: str) -> list[str]:
  if not os.path.isdir(manager_dir):
    return []
  return [os.path.join(manager_dir, name) for name in os.listdir(manager_dir)
          if '.orbax-checkpoint-tmp' in name]


def _remove_unfinished_saves(manager_dir: str, attempts: int = 20) -> None:
  """Deletes the temporary folders of saves that never completed (crash, failed write).

  After a failed save, writer threads of the step's other items can still create files for a
  moment, so a folder removed once may come back: it is removed again until none has come back
  for 0.1 s after a removal (or `attempts` tries, 0.1 s apart, have been made).
  """
  removed = False
  for _ in range(attempts):
    leftovers = _unfinished_saves(manager_dir)
    if not leftovers and not removed:
      return
    if removed:
      time.sleep(0.1)  # let a late writer recreate what it still holds
      leftovers = _unfinished_saves(manager_dir)
      if not leftovers:
        return
    removed = True
    for path in leftovers:
      logging.info('Removing unfinished checkpoint %s', path)
      shutil.rmtree(path, ignore_errors=True)


def _tree_signature(tree) -> dict[str, tuple]:
  """{path: (shape, dtype)} of the array leaves of a pytree (or of orbax metadata)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  signature = {}
  for path, leaf in leaves:
    key = jax.tree_util.keystr(path, simple=True, separator='/')
    shape = tuple(getattr(leaf, 'shape', ()) or ())
    dtype = getattr(leaf, 'dtype', None)
    signature[key] = (shape, np.dtype(dtype).name if dtype is not None else type(leaf).__name__)
  return signature


def tree_differences(expected, found, max_lines: int = 30) -> list[str]:
  """Lists missing, unexpected and mis-shaped leaves between two pytrees.

  Args:
    expected: the pytree (arrays or ShapeDtypeStructs) a checkpoint should hold.
    found: the pytree (arrays or orbax metadata) it holds.
    max_lines: at most this many lines, then a count of the rest.

  Returns:
    Lines describing the differences; empty when shapes and dtypes agree everywhere.
  """
  a, b = _tree_signature(expected), _tree_signature(found)
  lines = []
  for key in sorted(set(a) - set(b)):
    lines.append(f'missing from the checkpoint: {key} {a[key][0]}')
  for key in sorted(set(b) - set(a)):
    lines.append(f'unexpected in the checkpoint: {key} {b[key][0]}')
  for key in sorted(set(a) & set(b)):
    if a[key][0] != b[key][0]:
      lines.append(f'shape of {key}: checkpoint {b[key][0]}, expected {a[key][0]}')
    elif a[key][1] != b[key][1]:
      lines.append(f'dtype of {key}: checkpoint {b[key][1]}, expected {a[key][1]}')
  if len(lines) > max_lines:
    lines = lines[:max_lines] + [f'... and {len(lines) - max_lines} more']
  return lines


def _abstract_numpy_tree(metadata):
  """Zero-size-cost numpy restore targets from orbax array metadata."""

  def leaf(m):
    if hasattr(m, 'shape') and hasattr(m, 'dtype'):
      return np.zeros(m.shape, m.dtype)
    return m

  return jax.tree.map(leaf, metadata)


def _restorable(tree):
  # orbax restores into arrays and ShapeDtypeStructs, not numpy or Python scalars.
  def leaf(x):
    if isinstance(x, (np.generic, int, float, bool)):
      return np.asarray(x)
    return x

  return jax.tree.map(leaf, tree)


def _restore_items(manager: ocp.CheckpointManager, step: int, where: str,
                   targets: Mapping[str, Any], json_items: Sequence[str] = ()) -> dict:
  """Restores items of the step folder `where` after checking their structure."""
  try:
    metadata = manager.item_metadata(step)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointMismatchError(
        f'Cannot read the checkpoint metadata of {where}: {e}. The checkpoint may be truncated '
        'or written by an incompatible version.') from e
  args = {}
  for name, target in targets.items():
    found = metadata[name] if name in metadata else None
    if found is None:
      raise CheckpointMismatchError(f'{where} has no item {name!r} (truncated or incomplete).')
    differences = tree_differences(target, found)
    if differences:
      raise CheckpointMismatchError(
          f'{where}/{name} does not match this model/optimiser:\n  ' + '\n  '.join(differences))
    args[name] = ocp.args.StandardRestore(_restorable(target))
  for name in json_items:
    # orbax reports no metadata for JSON items, so look for the item's folder.
    if os.path.isdir(os.path.join(where, name)):
      args[name] = ocp.args.JsonRestore()
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**args))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointMismatchError(
        f'Failed to restore {where}: {type(e).__name__}: {_short_error(e)}. The checkpoint may '
        'be truncated.'
    ) from e
  return {name: restored[name] for name in args}


def _to_numpy(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def check_inference_checkpoint_target(directory: str, overwrite: bool = False,
                                      what: str = 'output directory') -> str:
  """Checks, before any work, that an inference checkpoint may be written at `directory`.

  Args:
    directory: where the checkpoint will go.
    overwrite: whether an existing checkpoint there may be replaced.
    what: the flag that named it, for the messages.

  Returns:
    The absolute path.

  Raises:
    OutputPathError: `directory` is a file (or under one, or not writable); it is not empty and
      `overwrite` is False; or it holds a file that no earlier save wrote (`overwrite` replaces
      the whole folder, so it only replaces a checkpoint whose record lists every file in it).
  """
  directory = fileio.check_output_folder(directory, what)
  if not os.path.isdir(directory) or not os.listdir(directory):
    return directory
  if not overwrite:
    raise OutputPathError(f'{what} {directory} already exists and is not empty; choose another '
                          'output directory or pass overwrite=True (CLI: --overwrite).')
  foreign = fileio.files_not_written(directory)
  if foreign:
    record = os.path.join(directory, fileio.WRITTEN_FILES_RECORD)
    why = ('' if os.path.isfile(record) else
           f' (it has no {fileio.WRITTEN_FILES_RECORD}: not a checkpoint written by this version)')
    raise OutputPathError(
        f'{what} {directory} holds files that this converter did not write'
        f'{why} ({", ".join(foreign[:5])}{", ..." if len(foreign) > 5 else ""}); overwrite '
        'only replaces a converted checkpoint. Choose another output directory.')
  return directory


@_quietly
def save_inference_checkpoint(directory: str, config: ml_collections.ConfigDict,
                              variables: Mapping[str, Any], overwrite: bool = False) -> str:
  """Writes a checkpoint that holds only model variables (used by the converter).

  The checkpoint is written into a temporary sibling folder, which lists its files
  (`fileio.record_written_files`), and moved into place when complete
  (`fileio.replace_folder`), so `directory` either holds the whole checkpoint or is left as it
  was.

  Args:
    directory: where to write; must not exist, or be empty (or `overwrite`).
    config: the full configuration the variables belong to.
    variables: {'params': ..., 'batch_stats': ...} (numpy or JAX arrays).
    overwrite: replace an existing checkpoint written by this function (a folder holding any
      other file is refused).

  Returns:
    The absolute path of the checkpoint directory.

  Raises:
    OutputPathError: see `check_inference_checkpoint_target`.
  """
  directory = check_inference_checkpoint_target(directory, overwrite, 'checkpoint directory')
  missing = {'params', 'batch_stats'} - set(variables)
  if missing:
    raise ValueError(f'variables must have keys params and batch_stats; missing {sorted(missing)}.')
  os.makedirs(os.path.dirname(directory), exist_ok=True)
  tmp = fileio.sibling_temp_folder(directory)
  try:
    os.makedirs(tmp)
    run_config.write_config(tmp, config)
    manager = _make_manager(os.path.join(tmp, runs.LATEST_SUBDIR), max_to_keep=1, best=False)
    variables = {'params': variables['params'], 'batch_stats': variables['batch_stats']}
    manager.save(0, args=ocp.args.Composite(variables=ocp.args.StandardSave(_to_numpy(variables))))
    manager.wait_until_finished()
    manager.close()
    fileio.record_written_files(tmp)
    fileio.replace_folder(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


def _pick_step(checkpoint_dir: str, step: Optional[int]):
  """(manager folder, step) for `step`, or the best step by R@1, else the latest."""
  best_dir = os.path.join(checkpoint_dir, runs.BEST_SUBDIR)
  latest_dir = os.path.join(checkpoint_dir, runs.LATEST_SUBDIR)
  best_steps, latest_steps = runs.finalized_steps(best_dir), runs.finalized_steps(latest_dir)
  if step is not None:
    if step in best_steps:
      return best_dir, step
    if step in latest_steps:
      return latest_dir, step
    raise ValueError(f'No step {step} in {checkpoint_dir}; available: best {best_steps}, '
                     f'latest {latest_steps}.')
  if best_steps:
    manager = _make_manager(best_dir, max_to_keep=None, best=True, read_only=True)
    best = manager.best_step()
    manager.close()
    if best is not None:
      return best_dir, best
  if latest_steps:
    return latest_dir, latest_steps[-1]
  raise CheckpointNotFoundError(f'{checkpoint_dir} holds no completed checkpoint step.')


@_quietly
def load_for_eval(path: str, step: Optional[int] = None):
  """Loads a model's configuration and variables for evaluation.

  Args:
    path: a training workdir, its checkpoints/ folder, or a converted checkpoint directory.
    step: a specific step; None picks the best checkpoint by validation R@1, else the latest.

  Returns:
    (config, variables, step): the run's ConfigDict, {'params', 'batch_stats'} as numpy arrays,
    and the step restored.
  """
  checkpoint_dir = runs.resolve_checkpoint_dir(path)
  config = run_config.read_config(checkpoint_dir)
  manager_dir, step = _pick_step(checkpoint_dir, step)
  manager = _make_manager(manager_dir, max_to_keep=None, best=False, read_only=True)
  where = os.path.join(manager_dir, str(step))
  try:
    metadata = manager.item_metadata(step)
    found = metadata['variables'] if 'variables' in metadata else None
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointMismatchError(f'Cannot read {where}: {e} (truncated checkpoint?)') from e
  if found is None:
    raise CheckpointMismatchError(f'{where} has no "variables" item (truncated checkpoint?).')
  target = _abstract_numpy_tree(found)
  restored = _restore_items(manager, step, where, {'variables': target})
  manager.close()
  variables = restored['variables']
  variables.setdefault('batch_stats', {})
  return config, variables, step


def encode_iterator_state(state) -> Optional[dict]:
  """Makes a data iterator state (grain: bytes or dict) JSON-serialisable."""
  if state is None:
    return None
  if isinstance(state, (bytes, bytearray)):
    try:
      return {'encoding': 'utf-8', 'state': bytes(state).decode('utf-8')}
    except UnicodeDecodeError:
      return {'encoding': 'base64', 'state': base64.b64encode(bytes(state)).decode('ascii')}
  if isinstance(state, Mapping):
    return {'encoding': 'json', 'state': json.loads(json.dumps(dict(state)))}
  raise TypeError(f'Unsupported data iterator state type {type(state).__name__}; expected bytes '
                  'or a dict (grain iterator get_state()).')


def decode_iterator_state(encoded: Optional[Mapping]):
  """Inverse of `encode_iterator_state`."""
  if encoded is None:
    return None
  encoding = encoded.get('encoding')
  if encoding == 'utf-8':
    return encoded['state'].encode('utf-8')
  if encoding == 'base64':
    return base64.b64decode(encoded['state'])
  if encoding == 'json':
    return encoded['state']
  raise ValueError(f'Unknown data iterator state encoding {encoding!r}.')


def _is_disk_full(error: BaseException) -> bool:
  # tensorstore reports ENOSPC as a ValueError whose text carries the OS error.
  if isinstance(error, OSError) and error.errno == errno.ENOSPC:
    return True
  text = str(error)
  return 'No space left on device' in text or "os_error_code='28'" in text


def _short_error(error: BaseException, limit: int = 600) -> str:
  # tensorstore appends its whole JSON spec to the message: keep the part a reader needs.
  text = str(error).split(' [tensorstore_spec=')[0]
  return text if len(text) <= limit else text[:limit] + ' ...'


class TrainCheckpointer:
  """Best-N (by validation R@1) and latest training checkpoints of one run.

  Creating it on an existing checkpoint directory compares the stored config.json with the current
  configuration and raises `CheckpointMismatchError` listing the differences (fields in
  `RESUMABLE_CONFIG_FIELDS` may differ; they are logged). Nothing is written before that check.
  """

  @_quietly
  def __init__(self, directory: str, config: ml_collections.ConfigDict,
               keep_best: Optional[int] = None):
    """Opens (or creates) the checkpoint directory of a run.

    Args:
      directory: the checkpoint directory (usually `<workdir>/checkpoints`).
      config: the configuration of this run.
      keep_best: best checkpoints kept; default config.keep_best.
    """
    self.directory = os.path.abspath(os.fspath(directory))
    self.config = config
    keep_best = config.keep_best if keep_best is None else keep_best
    if keep_best < 1:
      raise ValueError(f'keep_best must be >= 1, got {keep_best}.')
    changed = run_config.check_resumable(self.directory, config)
    if changed:
      logging.warning('Resuming with changed run settings:\n  %s', '\n  '.join(changed))
    if jax.process_index() == 0:
      os.makedirs(self.directory, exist_ok=True)
      run_config.write_config(self.directory, config)
      for sub in (runs.BEST_SUBDIR, runs.LATEST_SUBDIR):
        _remove_unfinished_saves(os.path.join(self.directory, sub))
    self.best = _make_manager(os.path.join(self.directory, runs.BEST_SUBDIR), max_to_keep=keep_best,
                              best=True)
    self.latest = _make_manager(os.path.join(self.directory, runs.LATEST_SUBDIR), max_to_keep=1,
                                best=False)

  def latest_step(self) -> Optional[int]:
    """The most recent saved step over both managers, or None."""
    steps = list(self.best.all_steps()) + list(self.latest.all_steps())
    return max(steps) if steps else None

  def best_step(self) -> Optional[int]:
    """The step with the highest validation R@1, or None."""
    return self.best.best_step()

  @_quietly
  def save(self, step: int, *, variables, train, data_iterator_state=None,
           r1: Optional[float] = None, info: Optional[Mapping[str, Any]] = None) -> None:
    """Saves the latest state, and a best checkpoint too when `r1` is given.

    Args:
      step: the number of optimiser steps taken.
      variables: {'params', 'batch_stats'} (one copy: not replicated per device).
      train: pytree of the rest of the training state (optimiser state, step, RNG, ...).
      data_iterator_state: the data iterator's `get_state()` (bytes or dict) or None.
      r1: validation R@1 of the first validation set; ranks best checkpoints.
      info: JSON-serialisable extra record (epoch, recalls, ...).

    Raises:
      CheckpointWriteError: the write failed (e.g. disk full); the message says which steps are
        still on disk, all of them intact.
    """
    iterator_json = encode_iterator_state(data_iterator_state)
    info_json = dict(info or {}, step=int(step), r1=None if r1 is None else float(r1),
                     time=datetime.datetime.now().isoformat())
    # Fail before anything is written rather than half-way through a save.
    for name, value in (('data_iterator_state', iterator_json), ('info', info_json)):
      try:
        json.dumps(value)
      except (TypeError, ValueError) as e:
        raise TypeError(f'Checkpoint item {name} is not JSON-serialisable: {e}') from e
    items = dict(
        variables=ocp.args.StandardSave(variables),
        train=ocp.args.StandardSave(train),
        data_iterator=ocp.args.JsonSave(iterator_json),
        info=ocp.args.JsonSave(info_json),
    )
    try:
      if r1 is not None and step not in self.best.all_steps():
        self.best.save(step, args=ocp.args.Composite(**items), metrics={'r1': float(r1)})
      if step not in self.latest.all_steps():
        self.latest.save(step, args=ocp.args.Composite(**items))
    except BaseException as e:
      # Let the writers of the failed step finish before anyone touches its temporary folder.
      for manager in (self.best, self.latest):
        try:
          manager.wait_until_finished()
        except Exception:  # pylint: disable=broad-except
          pass
      if not isinstance(e, Exception):
        raise
      if jax.process_index() == 0:
        # The half-written step is useless; removing it gives back the space it took.
        for sub in (runs.BEST_SUBDIR, runs.LATEST_SUBDIR):
          _remove_unfinished_saves(os.path.join(self.directory, sub))
      latest = runs.finalized_steps(os.path.join(self.directory, runs.LATEST_SUBDIR))
      best = runs.finalized_steps(os.path.join(self.directory, runs.BEST_SUBDIR))
      disk_full = _is_disk_full(e)
      error = CheckpointWriteError(
          f'Could not save checkpoint step {step} in {self.directory}'
          f'{" (no space left on device)" if disk_full else ""}: {type(e).__name__}: '
          f'{_short_error(e)}\nThe previous checkpoints are intact (latest: steps {latest}, '
          f'best: steps {best}); the half-written step was removed. '
          f'{"Free some space, then rerun" if disk_full else "Rerun"} the same command to resume '
          'from the latest of them.')
      error.errno = errno.ENOSPC if disk_full else getattr(e, 'errno', None)
      raise error from e

  @_quietly
  def restore(self, variables_target, train_target, step: Optional[int] = None) -> dict:
    """Restores a training state.

    Args:
      variables_target: pytree with the structure, shapes, dtypes (and shardings, for JAX arrays
        or ShapeDtypeStructs) of {'params', 'batch_stats'}.
      train_target: the same for the `train` item.
      step: the step to restore; None takes the most recent.

    Returns:
      dict with 'step', 'variables', 'train', 'data_iterator_state' (bytes/dict/None) and 'info'.
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f'No checkpoint in {self.directory}.')
    if step in self.latest.all_steps():
      manager, sub = self.latest, runs.LATEST_SUBDIR
    elif step in self.best.all_steps():
      manager, sub = self.best, runs.BEST_SUBDIR
    else:
      raise ValueError(f'No step {step} in {self.directory}.')
    where = os.path.join(self.directory, sub, str(step))
    restored = _restore_items(manager, step, where,
                              {'variables': variables_target, 'train': train_target},
                              json_items=('data_iterator', 'info'))
    return dict(step=step, variables=restored['variables'], train=restored['train'],
                data_iterator_state=decode_iterator_state(restored.get('data_iterator')),
                info=restored.get('info') or {})

  @_quietly
  def close(self) -> None:
    """Waits for pending writes and releases the managers."""
    self.best.close()
    self.latest.close()
