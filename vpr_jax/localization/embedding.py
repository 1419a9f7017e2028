"""The checkpoint behind an index: loading it, its fingerprint, and the descriptors it gives.

Photos are embedded exactly as evaluation embeds them (`evaluation.descriptors.compute_descriptors`:
the same decode, torchvision-exact resize and forward pass), then L2-normalised.

The fingerprint of a checkpoint is its model config (without the fields that do not change the
descriptors: weights path at initialisation, compute dtype), the input size, the preprocessing
version and a SHA-256 of the variables. An index is used only with a checkpoint of the same
fingerprint, and extended only with the same fingerprint and decode settings.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from vpr_jax.checkpoints import orbax_states
from vpr_jax.checkpoints import run_config
from vpr_jax.checkpoints import runs
from vpr_jax.data.imaging import images
from vpr_jax.errors import CheckpointNotFoundError
from vpr_jax.evaluation import descriptors as descriptors_lib
from vpr_jax.models import vpr_model

# Changes whenever decode or resize would give other pixels for the same file.
PREPROCESSING_VERSION = 'PIL decode to RGB, torchvision Resize((H, W)) bilinear antialiased; v1'
# Model config fields that do not change the descriptors of given variables.
NON_DESCRIPTOR_MODEL_FIELDS = ('backbone_weights', 'dtype')


def load_model(checkpoint: str):
  """(config, variables, step, model) of a checkpoint folder or training workdir.

  Raises:
    CheckpointNotFoundError: no checkpoint there.
  """
  try:
    runs.resolve_checkpoint_dir(checkpoint)
  except FileNotFoundError as e:
    raise CheckpointNotFoundError(str(e)) from None
  config, variables, step = orbax_states.load_for_eval(checkpoint)
  return config, variables, step, vpr_model.build_model(config)


def descriptor_dim(model, variables, config) -> int:
  """The size of the model's descriptors, from its shapes alone (nothing is computed)."""
  height, width = (int(s) for s in config.image_size)
  shape = jax.eval_shape(lambda v, x: model.apply(v, x, train=False)['descriptors'], variables,
                         jax.ShapeDtypeStruct((1, height, width, 3), np.uint8))
  return int(shape.shape[-1])


def weights_sha256(variables: Any) -> str:
  """SHA-256 of a variables pytree: every leaf's path, dtype, shape and bytes, in tree order."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    array = np.ascontiguousarray(np.asarray(leaf))
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(f'{array.dtype.str}{array.shape}'.encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def checkpoint_fingerprint(config, variables) -> dict[str, Any]:
  """What must agree between an index and the checkpoint that queries it.

  Args:
    config: the checkpoint's ConfigDict.
    variables: its variables.

  Returns:
    JSON-serialisable dict: `model` (config.model without `NON_DESCRIPTOR_MODEL_FIELDS`),
    `image_size`, `preprocessing`, `weights_sha256`.
  """
  model = json.loads(run_config.config_to_json(config.model))
  for field in NON_DESCRIPTOR_MODEL_FIELDS:
    model.pop(field, None)
  return {
      'model': model,
      'image_size': [int(s) for s in config.image_size],
      'preprocessing': PREPROCESSING_VERSION,
      'weights_sha256': weights_sha256(variables),
  }


def fingerprint_differences(built: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
  """Names of the fingerprint fields that differ (model fields as `model.<name>`)."""
  differing = []
  for key in sorted(set(built) | set(given)):
    a, b = built.get(key), given.get(key)
    if key == 'model' and isinstance(a, dict) and isinstance(b, dict):
      differing += [f'model.{k}' for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    elif a != b:
      differing.append('weights' if key == 'weights_sha256' else key)
  return differing


def l2_normalised(x: np.ndarray) -> np.ndarray:
  """Rows of `x` scaled to unit L2 norm, float32 (all-zero rows stay zero)."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def embed(model, variables, config, root: str, entries: Sequence[str | np.ndarray],
          batch_size: int, num_workers: int, decode_options: images.DecodeOptions,
          progress: Callable[[int], None] | None = None) -> np.ndarray:
  """L2-normalised float32 descriptors [len(entries), D], as evaluation computes them.

  Args:
    model, variables, config: from `load_model`.
    root: the folder `entries` are relative to ('' for absolute paths and arrays).
    entries: image paths, or uint8 [H, W, 3] RGB arrays.
    batch_size: images per forward batch.
    num_workers: decoding worker processes.
    decode_options: decode settings (EXIF orientation, DCT-scaled decoding).
    progress: called with the number of images of each finished batch.
  """
  descriptors = descriptors_lib.compute_descriptors(
      model, variables, root, entries, tuple(int(s) for s in config.image_size), batch_size,
      num_workers, decode_options=decode_options, progress=progress)
  return l2_normalised(descriptors)
