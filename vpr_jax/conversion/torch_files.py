"""PyTorch state dicts as numpy arrays: read from `.pth` / `.ckpt` files, then unwrapped."""

from typing import Any, Mapping

import numpy as np

from vpr_jax.conversion import torch_reader
from vpr_jax.errors import TorchCheckpointError


def to_numpy(value) -> np.ndarray:
  """A state-dict value (numpy array, or a torch tensor in tests) as a numpy array."""
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


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a PyTorch `.pth` / `.ckpt` file into a numpy state dict (torch is not needed).

  Args:
    path: the file.

  Returns:
    {name: np.ndarray} (the Lightning 'state_dict' entry if present, `module.` removed; half
    precision stays as stored).

  Raises:
    CheckpointNotFoundError: no such file.
    TorchCheckpointError: the file cannot be read, or is refused as unsafe (its pickle would
      run code; nothing from the file ever runs).
  """
  return unwrap_state_dict(torch_reader.load_state_dict(path))
