"""Descriptors on the accelerator: the jitted eval-mode forward over padded, sharded batches.

database and query images -> `data.eval_pipeline` (decode, torchvision-exact resize, fixed-size
batches) -> `compute_descriptors` (jitted forward sharded over the local devices; batch i+1 is
read while the device computes batch i) -> host float32 [N, D].
"""

from typing import Any, Callable, Optional, Sequence
import weakref

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from vpr_jax import parallel
from vpr_jax.data.evaluation import eval_pipeline
from vpr_jax.data.imaging import images

# (id(model), mesh key) -> (weak reference to the model, embed function). Keeps one jitted
# function per model so that validation every epoch reuses the compiled executable.
_EMBED_CACHE: dict[tuple[int, Any], tuple[weakref.ref, Callable]] = {}


def _mesh_key(mesh: Mesh) -> tuple:
  return (tuple(d.id for d in mesh.devices.flat), mesh.devices.shape, tuple(mesh.axis_names))


def eval_mesh(batch_size: int, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """The mesh evaluation batches are sharded over.

  All local devices when `batch_size` divides by their number, else the first local device alone
  (a batch cannot be split evenly; padding every batch instead would waste work on every step).

  Args:
    batch_size: images per evaluation batch.
    devices: devices to use; default `jax.local_devices()`.

  Returns:
    A 1-D `Mesh` with axis `parallel.BATCH_AXIS`.
  """
  devices = list(devices if devices is not None else jax.local_devices())
  if len(devices) > 1 and batch_size % len(devices):
    logging.warning('Evaluation batch size %d does not divide by the %d local devices: '
                    'evaluating on one device. Use a multiple of %d to use them all.',
                    batch_size, len(devices), len(devices))
    devices = devices[:1]
  return parallel.make_mesh(devices)


def make_embed_fn(model, mesh: Optional[Mesh] = None) -> Callable[[Any, Any], jax.Array]:
  """The jitted eval-mode forward pass `embed(variables, images) -> descriptors`.

  The function is built once per (model, mesh) and cached, so repeated evaluations (validation
  every epoch) do not recompile. `images` are uint8 [B, H, W, 3] (host or device arrays; B must
  divide by the mesh size); `variables` must already be placed with `replicate(variables, mesh)`.

  Args:
    model: a flax module whose `apply(variables, images, train=False)` returns a dict with
      'descriptors' [B, D].
    mesh: 1-D mesh with axis `parallel.BATCH_AXIS`; default: the first local device.

  Returns:
    `embed(variables, images) -> jax.Array float32 [B, D]`, sharded like the batch (asynchronous:
    convert with `np.asarray` when the values are needed).
  """
  if mesh is None:
    mesh = parallel.make_mesh(jax.local_devices()[:1])
  key = (id(model), _mesh_key(mesh))
  cached = _EMBED_CACHE.get(key)
  if cached is not None and cached[0]() is model:
    return cached[1]

  def forward(variables, images):
    outputs = model.apply(variables, images, train=False)
    return outputs['descriptors'].astype(jnp.float32)

  data_sharding = NamedSharding(mesh, PartitionSpec(parallel.BATCH_AXIS))
  replicated = NamedSharding(mesh, PartitionSpec())
  embed = jax.jit(forward, in_shardings=(replicated, data_sharding), out_shardings=data_sharding)
  # Drop entries of collected models so that ids are never confused after reuse.
  for stale in [k for k, (ref, _) in _EMBED_CACHE.items() if ref() is None]:
    del _EMBED_CACHE[stale]
  _EMBED_CACHE[key] = (weakref.ref(model), embed)
  return embed


def replicate(variables, mesh: Mesh):
  """Places `variables` on every device of `mesh` (a no-op when already there).

  Train-state variables of a multi-host run are global arrays; evaluation runs on each host's
  local devices, so a replicated global array is replaced by its local copy first.

  Args:
    variables: pytree of arrays (numpy or jax).
    mesh: the evaluation mesh.

  Returns:
    The pytree, replicated over `mesh`.
  """
  def to_local(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if not x.sharding.is_fully_replicated:
        raise ValueError('Evaluation needs replicated variables; got an array of shape '
                         f'{x.shape} sharded as {x.sharding}.')
      return x.addressable_data(0)
    return x
  variables = jax.tree_util.tree_map(to_local, variables)
  return jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))


def compute_descriptors(model, variables, root: str, paths: Sequence[str], image_size,
                        batch_size: int, num_workers: int = 0, mesh: Optional[Mesh] = None,
                        decode_options: Optional[images.DecodeOptions] = None,
                        progress: Optional[Callable[[int], None]] = None,
                        image_reader: Optional[Callable[[int], np.ndarray]] = None) -> np.ndarray:
  """Descriptors of the images `root/paths[i]`, computed in eval mode.

  Batches have a fixed size (the last one padded, padding dropped by its mask) so the forward
  pass compiles once; batch i+1 is read while the device computes batch i.

  Args:
    model: the VPR model (see `make_embed_fn`).
    variables: its variables {'params', 'batch_stats'}.
    root: folder the paths are relative to.
    paths: image paths relative to `root`.
    image_size: (height, width) the images are resized to.
    batch_size: images per batch.
    num_workers: decoding worker processes (0: in this process).
    mesh: evaluation mesh; default `eval_mesh(batch_size)`.
    decode_options: `data.images.DecodeOptions` (EXIF orientation, fast JPEG decode); default
      exact with EXIF ignored, as the references.
    progress: called with the number of images of each batch once its descriptors are stored
      (e.g. a progress bar's `update`).
    image_reader: read image i from here instead of `root/paths[i]` (a prepared benchmark's
      records, `BenchmarkSet.image_reader`).

  Returns:
    float32 [len(paths), D], row i for paths[i].
  """
  num_images = len(paths)
  if num_images == 0:
    raise ValueError(f'No images to embed under {root}.')
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}.')
  mesh = mesh if mesh is not None else eval_mesh(batch_size)
  embed = make_embed_fn(model, mesh)
  variables = replicate(variables, mesh)

  descriptors = None
  filled = np.zeros(num_images, bool)

  def store(pending):
    nonlocal descriptors
    outputs, mask, index = pending
    outputs = np.asarray(outputs, np.float32)
    if descriptors is None:
      descriptors = np.zeros((num_images, outputs.shape[-1]), np.float32)
    rows = index[mask]
    if rows.size and (rows.min() < 0 or rows.max() >= num_images):
      raise ValueError(f'Evaluation batch index out of range [0, {num_images}).')
    descriptors[rows] = outputs[mask]
    filled[rows] = True
    if progress is not None:
      progress(int(rows.size))

  iterator = eval_pipeline.make_eval_iterator(root, list(paths), tuple(image_size), batch_size,
                                              num_workers=num_workers,
                                              decode_options=decode_options,
                                              image_reader=image_reader)
  pending = None
  for batch in iterator:
    images = np.asarray(batch['images'])
    mask = np.asarray(batch['mask'], bool)
    index = np.asarray(batch['index'], np.int64)
    if images.shape[0] != batch_size:
      # A short batch would compile a second executable: pad it here.
      pad = batch_size - images.shape[0]
      if pad < 0:
        raise ValueError(f'Evaluation batch of {images.shape[0]} images, expected {batch_size}.')
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
      mask = np.concatenate([mask, np.zeros(pad, bool)])
      index = np.concatenate([index, np.full(pad, -1, np.int64)])
    outputs = embed(variables, images)
    if pending is not None:
      store(pending)
    pending = (outputs, mask, index)
  if pending is not None:
    store(pending)
  if not filled.all():
    missing = [paths[i] for i in np.flatnonzero(~filled)[:5]]
    raise RuntimeError(f'{int((~filled).sum())} of {num_images} images under {root} got no '
                       f'descriptor (first: {missing}).')
  return descriptors
