"""The train state: parameters, BatchNorm statistics, optimiser state and non-finite counters.

Also its two checkpoint items (`checkpoint_items`: 'variables' for inference, 'train' for
resuming) and the inverse (`restore_checkpoint_items`).
"""

from typing import Any, Mapping, Optional

from flax.training import train_state as flax_train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vpr_jax.models import vpr_model

class TrainState(flax_train_state.TrainState):
  """Flax TrainState plus BatchNorm statistics and non-finite bookkeeping.

  Attributes:
    batch_stats: BatchNorm running statistics.
    nonfinite_count: steps whose update was not applied (non-finite loss or gradient).
    first_nonfinite_step: index of the first such step, -1 if none.
  """
  batch_stats: Any
  nonfinite_count: jax.Array
  first_nonfinite_step: jax.Array


def create_train_state(config: ml_collections.ConfigDict, model, rng: jax.Array, *,
                       tx: optax.GradientTransformation,
                       variables: Optional[Mapping[str, Any]] = None) -> TrainState:
  """Initialises (or wraps given) model variables and the optimiser state.

  Args:
    config: the full ConfigDict (image_size).
    model: the VPRModel.
    rng: PRNG key for the initialisation (unused when `variables` is given).
    tx: the optimiser (`optim.make_optimizer`).
    variables: {'params', 'batch_stats'} to start from, e.g. with ImageNet weights.

  Returns:
    The TrainState at step 0.
  """
  if variables is None:
    variables = vpr_model.init_variables(model, rng, tuple(config.image_size))
  state = TrainState.create(
      apply_fn=model.apply, params=variables['params'], tx=tx,
      batch_stats=variables.get('batch_stats', {}),
      nonfinite_count=jnp.zeros((), jnp.int32),
      first_nonfinite_step=jnp.full((), -1, jnp.int32))
  # A typed int32 step (not a Python int) keeps the step's input signature fixed: no recompile.
  return state.replace(step=jnp.zeros((), jnp.int32))


def checkpoint_items(host_state: TrainState, rng: jax.Array) -> tuple[dict, dict]:
  """The 'variables' and 'train' checkpoint items of a host (numpy) train state.

  Args:
    host_state: the TrainState on the host, one copy (not replicated per device).
    rng: the run's base PRNG key.

  Returns:
    ({'params', 'batch_stats'}, {'step', 'opt_state', 'rng', 'nonfinite_count',
    'first_nonfinite_step'}) as numpy arrays.
  """
  variables = {'params': host_state.params, 'batch_stats': host_state.batch_stats}
  train = {'step': host_state.step, 'opt_state': host_state.opt_state,
           'rng': np.asarray(rng),
           'nonfinite_count': host_state.nonfinite_count,
           'first_nonfinite_step': host_state.first_nonfinite_step}
  return variables, jax.tree.map(np.asarray, train)


def restore_checkpoint_items(host_state: TrainState, variables: Mapping[str, Any],
                             train: Mapping[str, Any]) -> tuple[TrainState, jax.Array]:
  """The inverse of `checkpoint_items`: (restored host state, the run's base PRNG key)."""
  restored = host_state.replace(
      step=train['step'], params=variables['params'], batch_stats=variables['batch_stats'],
      opt_state=train['opt_state'], nonfinite_count=train['nonfinite_count'],
      first_nonfinite_step=train['first_nonfinite_step'])
  return restored, jnp.asarray(train['rng'])
