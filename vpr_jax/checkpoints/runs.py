"""Run folders: where a run keeps its checkpoints, finding the latest run, resolving a path.

Layout of a checkpoint directory `DIR` (a training workdir keeps it in `<workdir>/checkpoints`):

  DIR/config.json            the full ConfigDict as JSON (`run_config`)
  DIR/best/<step>/...        orbax CheckpointManager, keep_best steps ranked by validation R@1
  DIR/latest/<step>/...      orbax CheckpointManager, the most recent step only

(see `orbax_states` for what a step folder holds).
"""

import os
from typing import Optional

from vpr_jax.errors import CheckpointNotFoundError

CONFIG_FILENAME = 'config.json'

CHECKPOINTS_SUBDIR = 'checkpoints'

BEST_SUBDIR = 'best'

LATEST_SUBDIR = 'latest'


def default_runs_dir() -> str:
  """The folder that holds training runs: $VPR_RUNS_DIR if set, else ./runs."""
  return os.path.abspath(os.environ.get('VPR_RUNS_DIR') or 'runs')


def finalized_steps(manager_dir: str) -> list[int]:
  """Step folders that orbax committed (temporary folders have non-numeric names)."""
  if not os.path.isdir(manager_dir):
    return []
  return sorted(int(name) for name in os.listdir(manager_dir)
                if name.isdigit() and os.path.isdir(os.path.join(manager_dir, name)))


def has_checkpoint(checkpoint_dir: str) -> bool:
  if not os.path.isfile(os.path.join(checkpoint_dir, CONFIG_FILENAME)):
    return False
  return bool(finalized_steps(os.path.join(checkpoint_dir, LATEST_SUBDIR)) or
              finalized_steps(os.path.join(checkpoint_dir, BEST_SUBDIR)))


def find_latest_run(runs_dir: str) -> Optional[str]:
  """The most recently modified run folder under `runs_dir` that holds a checkpoint.

  Args:
    runs_dir: a folder of training workdirs (see `default_runs_dir`).

  Returns:
    The workdir path, or None when no run there has a checkpoint.
  """
  if not os.path.isdir(runs_dir):
    return None
  best_time, best_run = -1.0, None
  for name in os.listdir(runs_dir):
    run = os.path.join(runs_dir, name)
    checkpoint_dir = os.path.join(run, CHECKPOINTS_SUBDIR)
    if not has_checkpoint(checkpoint_dir):
      continue
    mtime = max(os.path.getmtime(os.path.join(checkpoint_dir, sub))
                for sub in (BEST_SUBDIR, LATEST_SUBDIR)
                if os.path.isdir(os.path.join(checkpoint_dir, sub)))
    if mtime > best_time:
      best_time, best_run = mtime, run
  return best_run


def resolve_checkpoint_dir(path: str) -> str:
  """Finds the checkpoint directory given a workdir, its checkpoints/ folder or a converted one.

  Args:
    path: a training workdir, `<workdir>/checkpoints`, or a converted checkpoint directory.

  Returns:
    The directory that holds config.json and the best/ and latest/ managers.
  """
  path = os.path.abspath(os.fspath(path))
  for candidate in (os.path.join(path, CHECKPOINTS_SUBDIR), path):
    if os.path.isfile(os.path.join(candidate, CONFIG_FILENAME)) and (
        os.path.isdir(os.path.join(candidate, LATEST_SUBDIR)) or
        os.path.isdir(os.path.join(candidate, BEST_SUBDIR))):
      return candidate
  if not os.path.exists(path):
    raise CheckpointNotFoundError(f'Checkpoint path {path} does not exist.')
  raise CheckpointNotFoundError(
      f'No checkpoint in {path}: expected a training workdir (with {CHECKPOINTS_SUBDIR}/), its '
      f'{CHECKPOINTS_SUBDIR}/ folder, or a converted checkpoint ({CONFIG_FILENAME} and '
      f'{LATEST_SUBDIR}/ or {BEST_SUBDIR}/).')
