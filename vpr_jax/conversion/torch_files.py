"""Reading PyTorch checkpoint files (`.pth` state dicts, Lightning `.ckpt`) into numpy arrays."""

import os
from typing import Any, Mapping

import numpy as np

from vpr_jax.errors import CheckpointNotFoundError
from vpr_jax.errors import TorchCheckpointError

def to_numpy(value) -> np.ndarray:
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
    raise TorchCheckpointError(f'Expected a state dict (a mapping of names to tensors), got '
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


def load_torch_state_dict(path: str, allow_unsafe_pickle: bool = False) -> dict[str, np.ndarray]:
  """Reads a PyTorch `.pth` / `.ckpt` file into a numpy state dict.

  Args:
    path: the file.
    allow_unsafe_pickle: load with `weights_only=False`, which can run code stored in the file;
      only for files from a trusted source that the safe loader rejects.

  Returns:
    {name: np.ndarray} (the Lightning 'state_dict' entry if present, `module.` removed).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointNotFoundError(f'PyTorch checkpoint {path} does not exist.')
  import torch  # pylint: disable=g-import-not-at-top
  try:
    checkpoint = torch.load(path, map_location='cpu', weights_only=not allow_unsafe_pickle)
  except Exception as e:  # pylint: disable=broad-except
    hint = '' if allow_unsafe_pickle else (
        ' If the file comes from a source you trust and holds other Python objects, retry with '
        'allow_unsafe_pickle=True (CLI: --allow_unsafe_pickle).')
    raise TorchCheckpointError(f'Cannot read PyTorch checkpoint {path}: {e}.{hint}') from e
  return {key: to_numpy(value) for key, value in unwrap_state_dict(checkpoint).items()
          if hasattr(value, 'shape')}
