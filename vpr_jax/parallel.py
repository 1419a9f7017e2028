"""Data parallelism over all devices of all hosts: `jax.jit` over a Mesh, or `jax.pmap`.

Both modes split the global batch of P places x K images over the devices and compute exactly
what one device computes on the whole batch:
  - 'jit' (default): the batch is a global jax.Array sharded along its first axis over a 1-D mesh
    ('batch'), parameters are replicated, and XLA's SPMD partitioner inserts the collectives
    (global BatchNorm statistics, gathering descriptors for the loss, summing gradients).
  - 'pmap': each device runs the step on its shard; BatchNorm statistics are averaged over the
    'batch' axis, descriptors and labels are all-gathered so the miner and the loss see the whole
    batch, and gradients are averaged.

The batch is flattened on the host, [P, K, ...] -> [P * K, ...], before it is split, so devices
need not divide P: P * K images must be a multiple of the number of devices.

Several hosts: launch one process per host with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID set (or under SLURM / Open MPI / a Cloud TPU pod, which JAX detects), and call
`maybe_initialize_distributed()` before anything else touches JAX. Each process then feeds its own
P / process_count places.
"""

import dataclasses
import os
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

from absl import logging
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from vpr_jax.errors import ConfigError
BATCH_AXIS = 'batch'
PARALLEL_MODES = ('jit', 'pmap')

_EXPLICIT_ENV = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')


def _int_env(name: str) -> int:
  try:
    return int(os.environ.get(name, '0') or 0)
  except ValueError:
    return 0


def _cluster_launch_detected() -> bool:
  """True when a cluster launcher started several processes (SLURM srun, mpirun, TPU pods)."""
  if 'SLURM_STEP_ID' in os.environ and max(_int_env('SLURM_NTASKS'),
                                           _int_env('SLURM_NPROCS')) > 1:
    return True
  if _int_env('OMPI_COMM_WORLD_SIZE') > 1:
    return True
  return ',' in os.environ.get('TPU_WORKER_HOSTNAMES', '')


def maybe_initialize_distributed() -> bool:
  """Initialises JAX's multi-process runtime when this process is one of several.

  Explicit settings (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, and optionally
  JAX_LOCAL_DEVICE_IDS) take precedence; otherwise SLURM, Open MPI and Cloud TPU launches are
  detected by JAX. Must run before any JAX computation.

  Returns:
    True if `jax.distributed.initialize` was called.
  """
  explicit = [name for name in _EXPLICIT_ENV if os.environ.get(name)]
  if explicit:
    missing = [name for name in _EXPLICIT_ENV if not os.environ.get(name)]
    if missing:
      raise ValueError(f'Multi-process launch: {", ".join(explicit)} set but {", ".join(missing)} '
                       'missing; set all of JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and '
                       'JAX_PROCESS_ID.')
    num_processes = _int_env('JAX_NUM_PROCESSES')
    if num_processes <= 1:
      return False
    jax.distributed.initialize(coordinator_address=os.environ['JAX_COORDINATOR_ADDRESS'],
                               num_processes=num_processes,
                               process_id=_int_env('JAX_PROCESS_ID'))
  elif _cluster_launch_detected():
    jax.distributed.initialize()
  else:
    return False
  logging.info('JAX distributed: process %d of %d, %d local / %d global devices.',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


@dataclasses.dataclass(frozen=True)
class BatchSizes:
  """Images per step, globally, per host and per device (places too)."""
  places_global: int
  places_per_host: int
  images_per_place: int
  num_processes: int
  num_devices: int

  @property
  def images_global(self) -> int:
    return self.places_global * self.images_per_place

  @property
  def images_per_host(self) -> int:
    return self.places_per_host * self.images_per_place

  @property
  def images_per_device(self) -> int:
    return self.images_global // self.num_devices

  def describe(self) -> str:
    """One line for the log."""
    return (f'batch: global {self.places_global} places x {self.images_per_place} = '
            f'{self.images_global} images; per host ({self.num_processes} hosts) '
            f'{self.places_per_host} places = {self.images_per_host} images; per device '
            f'({self.num_devices} devices) {self.images_per_device} images')


def batch_sizes(places_per_batch: int, images_per_place: int) -> BatchSizes:
  """Checks that the global batch splits over hosts and devices, and returns the sizes.

  Args:
    places_per_batch: P, places per global batch.
    images_per_place: K.

  Returns:
    The BatchSizes of this launch.
  """
  num_processes, num_devices = jax.process_count(), jax.device_count()
  if places_per_batch % num_processes:
    raise ConfigError(f'data.places_per_batch={places_per_batch} must be a multiple of the number '
                     f'of processes ({num_processes}): each process loads its own places.')
  images = places_per_batch * images_per_place
  if images % num_devices:
    raise ConfigError(f'The batch of {places_per_batch} x {images_per_place} = {images} images does '
                     f'not split over {num_devices} devices; choose data.places_per_batch so that '
                     f'P * K is a multiple of {num_devices}.')
  return BatchSizes(places_global=places_per_batch,
                    places_per_host=places_per_batch // num_processes,
                    images_per_place=images_per_place, num_processes=num_processes,
                    num_devices=num_devices)


def check_config(config) -> None:
  """Checks config.parallel, config.sync_batch_norm and that the batch (data.places_per_batch x data.images_per_place)
  splits over the processes and devices."""
  if config.parallel not in PARALLEL_MODES:
    raise ConfigError(f'Unknown parallel mode {config.parallel!r}; valid choices: '
                      f'{", ".join(PARALLEL_MODES)}.')
  if not isinstance(config.get('sync_batch_norm', True), bool):
    raise ConfigError(f'sync_batch_norm must be True or False, got '
                      f'{config.sync_batch_norm!r}.')
  for field in ('places_per_batch', 'images_per_place'):
    value = config.data[field]
    if not isinstance(value, int) or value < 1:
      raise ConfigError(f'data.{field} must be a positive integer, got {value!r}.')
  batch_sizes(int(config.data.places_per_batch), int(config.data.images_per_place))


def flatten_places(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """[P, K, ...] -> [P * K, ...] for every array of a train batch (a free reshape on the host)."""
  return {key: value.reshape((-1,) + value.shape[2:]) for key, value in batch.items()}


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh with axis `BATCH_AXIS` over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (BATCH_AXIS,))


class DataParallel:
  """Places state and batches on devices and compiles a step for one parallel mode.

  Attributes:
    mode: 'jit' or 'pmap'.
    axis_name: the collective axis the step must use ('batch' under pmap, None under jit).
    mesh: the device mesh (jit: all devices; pmap: this process's devices).
  """

  def __init__(self, mode: str = 'jit', devices: Optional[Sequence[jax.Device]] = None):
    """Sets up data parallelism.

    Args:
      mode: 'jit' or 'pmap'.
      devices: jit: the devices of the mesh (default all); pmap: the local devices to use
        (default all local devices).
    """
    if mode not in PARALLEL_MODES:
      raise ValueError(f'Unknown parallel mode {mode!r}; valid choices: '
                       f'{", ".join(PARALLEL_MODES)}.')
    self.mode = mode
    if mode == 'jit':
      self.mesh = make_mesh(devices)
      self.axis_name = None
      self._replicated = NamedSharding(self.mesh, PartitionSpec())
      self._sharded = NamedSharding(self.mesh, PartitionSpec(BATCH_AXIS))
      self.num_devices = self.mesh.size
      self.num_local_devices = len([d for d in self.mesh.devices.flat
                                    if d.process_index == jax.process_index()])
    else:
      local = jax.local_devices() if devices is None else list(devices)
      self.mesh = make_mesh(local)
      self.axis_name = BATCH_AXIS
      self._sharded = NamedSharding(self.mesh, PartitionSpec(BATCH_AXIS))
      self.num_local_devices = len(local)
      self.num_devices = self.num_local_devices * jax.process_count()

  # -- state ---------------------------------------------------------------------------------

  def replicate(self, tree: Any) -> Any:
    """Copies a host (or single-device) pytree to every device."""
    if self.mode == 'jit':
      def put(x):
        x = np.asarray(jax.device_get(x))
        # A fresh copy per device: the CPU backend may alias a numpy buffer without copying, and
        # the step donates the state, so shared (or caller-owned) memory would be overwritten.
        return jax.make_array_from_callback(x.shape, self._replicated,
                                            lambda index: np.array(x[index], copy=True))
      return jax.tree.map(put, tree)
    n = self.num_local_devices
    # np.stack makes a new buffer, so donation never writes into the caller's arrays.
    return jax.tree.map(
        lambda x: jax.device_put(np.stack([np.asarray(jax.device_get(x))] * n), self._sharded),
        tree)

  def unreplicate(self, tree: Any) -> Any:
    """One copy of a replicated pytree (jit: the global arrays themselves; pmap: device 0's)."""
    if self.mode == 'jit':
      return tree

    def first(x):
      if hasattr(x, 'addressable_shards'):
        return x.addressable_shards[0].data.reshape(x.shape[1:])
      return x[0]

    return jax.tree.map(first, tree)

  def to_host(self, tree: Any) -> Any:
    """One copy of a replicated pytree as numpy arrays."""
    def fetch(x):
      if self.mode == 'jit' and hasattr(x, 'addressable_shards') and not x.is_fully_addressable:
        return np.asarray(x.addressable_shards[0].data)
      return np.asarray(jax.device_get(x))
    return jax.tree.map(fetch, self.unreplicate(tree))

  # -- batches -------------------------------------------------------------------------------

  def shard_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Puts this process's part of a flat batch ([N_local, ...] arrays) on the devices.

    jit: a global array [N_local * process_count, ...] sharded over the mesh; pmap: arrays
    [local devices, N_local / local devices, ...].
    """
    if self.mode == 'jit':
      return {key: jax.make_array_from_process_local_data(self._sharded, np.asarray(value))
              for key, value in batch.items()}
    n = self.num_local_devices

    def put(value):
      value = np.asarray(value)
      if value.shape[0] % n:
        raise ValueError(f'A batch of {value.shape[0]} does not split over {n} local devices.')
      return jax.device_put(value.reshape((n, -1) + value.shape[1:]), self._sharded)

    return {key: put(value) for key, value in batch.items()}

  # -- steps ---------------------------------------------------------------------------------

  def compile_step(self, step_fn: Callable, donate_state: bool = True) -> Callable:
    """Compiles `step_fn(state, batch, rng) -> (state, metrics)` for this mode.

    The step must use `self.axis_name` for its collectives. The state is donated (its buffers
    are reused for the new state); rng is the same on every device.

    Args:
      step_fn: the pure step, its keyword arguments already bound.
      donate_state: donate the state argument.

    Returns:
      The compiled callable; its metrics are replicated (see `to_host`).
    """
    donate = (0,) if donate_state else ()
    if self.mode == 'jit':
      # Replicated in, replicated out: the state's sharding is identical at every step, so the
      # step compiles once.
      return jax.jit(step_fn, donate_argnums=donate,
                     out_shardings=(self._replicated, self._replicated))
    return jax.pmap(step_fn, axis_name=BATCH_AXIS, in_axes=(0, 0, None), donate_argnums=donate,
                    devices=list(self.mesh.devices.flat))


def prefetch(iterator: Iterable[Any], put: Callable[[Any], Any], size: int = 2) -> Iterator[Any]:
  """Applies `put` (e.g. a host-to-device transfer) `size` items ahead of the consumer.

  Args:
    iterator: host items.
    put: the transfer; JAX dispatches it asynchronously, so it overlaps the running step.
    size: how many items are in flight.

  Yields:
    put(item), in order.
  """
  queue = []
  iterator = iter(iterator)
  for item in iterator:
    queue.append(put(item))
    if len(queue) > size:
      yield queue.pop(0)
  while queue:
    yield queue.pop(0)


def host_batches(train_iter: Iterable[Mapping[str, np.ndarray]]
                 ) -> Iterator[tuple[dict[str, np.ndarray], Any]]:
  """Training batches as the step takes them, each with the iterator state after it.

  Args:
    train_iter: the grain iterator of [P, K, ...] place batches ('images', 'labels'); its
      `get_state()` after a batch is what a checkpoint of the following step must hold.

  Yields:
    ({'images': [P * K, H, W, 3], 'labels': [P * K]}, iterator state).
  """
  for batch in train_iter:
    yield (flatten_places({'images': batch['images'], 'labels': batch['labels']}),
           train_iter.get_state())


def global_mean(x: jax.Array, axis_name: Optional[str]) -> jax.Array:
  """pmean over `axis_name` under pmap; identity under jit (values are already global)."""
  return x if axis_name is None else jax.lax.pmean(x, axis_name)


def gather_global_batch(x: jax.Array, axis_name: Optional[str]) -> jax.Array:
  """The whole global batch along axis 0: all_gather(tiled) under pmap, identity under jit."""
  return x if axis_name is None else jax.lax.all_gather(x, axis_name, axis=0, tiled=True)
