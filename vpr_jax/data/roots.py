"""Where the data lives: the data root (config, flag or $VPR_DATA_ROOT) and paths under it.

No dataset location is written in the code: every path comes from the config, a command-line
flag or the environment, and relative paths are taken under the data root.
"""

import os
from typing import Optional

from vpr_jax.errors import DatasetNotFoundError

DATA_ROOT_ENV = 'VPR_DATA_ROOT'
# Where generated (synthetic) data goes when no data root is set.
DEFAULT_SYNTHETIC_ROOT = os.path.join('~', '.cache', 'vpr_jax')


def resolve_data_root(data_root: Optional[str] = None, hint: str = '') -> str:
  """Returns the data root: the argument if non-empty, else $VPR_DATA_ROOT.

  Args:
    data_root: config.data.root or a command-line flag; '' or None means "use the environment".
    hint: appended to the error when no root is set (e.g. the registered benchmarks).

  Returns:
    An absolute path to an existing folder.

  Raises:
    DatasetNotFoundError: no root given and $VPR_DATA_ROOT unset, or the folder does not exist.
  """
  origin = 'the data root argument (config.data.root / --data_root)'
  if not data_root:
    data_root = os.environ.get(DATA_ROOT_ENV, '')
    origin = f'${DATA_ROOT_ENV}'
    if not data_root:
      raise DatasetNotFoundError(
          'no data root: set config.data.root (or the --data_root flag) or the environment '
          f'variable {DATA_ROOT_ENV} to the folder holding the datasets'
          f'{" (" + hint + ")" if hint else ""}.')
  root = os.path.abspath(os.path.expanduser(data_root))
  if not os.path.isdir(root):
    raise DatasetNotFoundError(f'data root {root!r} (from {origin}) is not a folder.')
  return root


def synthetic_data_root(data_root: Optional[str] = None) -> str:
  """The root for generated data: the argument, else $VPR_DATA_ROOT, else ~/.cache/vpr_jax.

  The folder is created if missing.
  """
  root = data_root or os.environ.get(DATA_ROOT_ENV) or DEFAULT_SYNTHETIC_ROOT
  root = os.path.abspath(os.path.expanduser(root))
  os.makedirs(root, exist_ok=True)
  return root


def resolve_under(root: Optional[str], path: str) -> str:
  """`path` itself when absolute (after ~ expansion), else `root/path`."""
  path = os.path.expanduser(os.fspath(path))
  if os.path.isabs(path) or not root:
    return path
  return os.path.join(root, path)


def synthetic_enabled(config) -> bool:
  """Whether a config trains on generated data (`data.synthetic.enabled`)."""
  synth = config.data.get('synthetic')
  return synth is not None and bool(synth.enabled)


def config_data_root(config) -> str:
  """The data root of a run's config: data.root, else $VPR_DATA_ROOT; for a config of generated
  data (the demo) the folder it was generated in (~/.cache/vpr_jax without a root)."""
  if synthetic_enabled(config):
    return synthetic_data_root(config.data.root)
  return resolve_data_root(config.data.root)
