"""The pure train step `(state, batch, rng) -> (state, metrics)`; jit or pmap it at the call site.

normalise -> backbone -> aggregator -> descriptors of the global batch (gathered across devices)
-> miner -> loss -> gradients (mean over devices) -> optax update, applied only when the loss and
every gradient are finite.
"""

from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax

from vpr_jax import parallel
from vpr_jax.training.state import TrainState

# fold_in constant separating the dropout keys from the augmentation keys of the same step.
DROPOUT_STREAM = 0x64726f70

def all_finite(tree) -> jax.Array:
  """True when every leaf of `tree` is finite (a scalar bool array)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, *, model,
               loss_fn: Callable, schedule: Callable, axis_name: Optional[str] = None,
               augment_fn: Optional[Callable] = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step on a global batch. Pure; jit or pmap it at the call site.

  Args:
    state: the TrainState.
    batch: 'images' uint8 [N, H, W, 3], 'labels' int [N] (places flattened on the host by
      `parallel.flatten_places`). Under pmap, this device's shard.
    rng: the run's base PRNG key; the step folds its index in.
    model: the VPRModel (BatchNorm axis_name set for pmap).
    loss_fn: `losses.make_loss(...)` result: (descriptors [N, D], labels [N]) -> (loss, metrics).
    schedule: step -> learning rate (for the metrics).
    axis_name: the pmap axis; None under jit (GSPMD makes the batch global).
    augment_fn: optional on-device augmentation (images, rng, axis_name) -> images.

  Returns:
    (new state, metrics): loss, b_acc, lr, grad_norm, finite (1.0 if the update was applied).
  """
  images, labels = batch['images'], batch['labels']
  # The named scopes label the ops of each part in the compiled program (its op_name metadata),
  # so that scripts/aot_compile.py can attribute memory traffic to them.
  if augment_fn is not None:
    with jax.named_scope('augment'):
      images = augment_fn(images, jax.random.fold_in(rng, state.step), axis_name)

  def loss_of(params):
    # The dropout key (SALAD) differs per step and per device; models without dropout ignore it.
    dropout_rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), DROPOUT_STREAM)
    if axis_name is not None:
      dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))
    outputs, mutated = model.apply({'params': params, 'batch_stats': state.batch_stats}, images,
                                   train=True, mutable=['batch_stats'],
                                   rngs={'dropout': dropout_rng})
    # The miner and the loss see the whole global batch, as on one device.
    with jax.named_scope('loss'):
      descriptors = parallel.gather_global_batch(outputs['descriptors'], axis_name)
      all_labels = parallel.gather_global_batch(labels, axis_name)
      loss, loss_metrics = loss_fn(descriptors, all_labels)
    return loss, (mutated.get('batch_stats', {}), loss_metrics)

  (loss, (batch_stats, loss_metrics)), grads = jax.value_and_grad(loss_of, has_aux=True)(
      state.params)
  with jax.named_scope('optimizer'):
    # Every device computed the loss of the whole batch; collectives' transposes sum the
    # per-device objectives, so the mean over devices is the gradient of that one loss.
    grads = parallel.global_mean(grads, axis_name)
    finite = jnp.isfinite(loss) & all_finite(grads)

    updated = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    keep = lambda new, old: jnp.where(finite, new, old)
    new_state = updated.replace(
        params=jax.tree.map(keep, updated.params, state.params),
        opt_state=jax.tree.map(keep, updated.opt_state, state.opt_state),
        batch_stats=jax.tree.map(keep, updated.batch_stats, state.batch_stats),
        nonfinite_count=state.nonfinite_count + (~finite).astype(jnp.int32),
        first_nonfinite_step=jnp.where(
            (state.first_nonfinite_step < 0) & ~finite, state.step.astype(jnp.int32),
            state.first_nonfinite_step))
  metrics = {
      'loss': loss.astype(jnp.float32),
      'b_acc': jnp.asarray(loss_metrics.get('b_acc', jnp.nan), jnp.float32),
      # The optimiser's own step count (skipped steps do not advance it) drives its schedule.
      'lr': schedule(state.step - state.nonfinite_count),
      'grad_norm': optax.tree.norm(grads),
      'finite': finite.astype(jnp.float32),
  }
  return new_state, metrics
