"""Optimisers and learning-rate schedules with torch.optim semantics.

Every name builds what the gsv-cities family's `configure_optimizers` builds for it, and every
default is set explicitly to torch.optim's, so that a recipe ported from the PyTorch family trains
the same way:
  - 'adamw':   torch.optim.AdamW (betas (0.9, 0.999), eps 1e-8, decoupled decay
               p -= lr * wd * p).
  - 'adam':    the same AdamW: gsv-cities, MixVPR and mldl24-vpr build torch.optim.AdamW for
               optimizer='adam'.
  - 'adam_l2': torch.optim.Adam (same betas/eps; weight_decay is L2: wd * p added to the
               gradient before the moments).
  - 'sgd':     torch.optim.SGD with momentum (dampening 0, nesterov False, buf = m * buf + g;
               weight decay added to the gradient).
The learning rate is lr * warmup(step) * decay(step): a linear warmup by step,
min(1, (step + 1) / warmup_steps), times MultiStepLR by epoch (gamma ** number of milestones
<= epoch, epoch = step // steps_per_epoch), a cosine decay to 0 over all steps, or a constant.
The seed's warmup (600 steps) ends before its first milestone (epoch 5), where this product
equals its Lightning schedule exactly.

Frozen parameters get no update and no weight decay, and hold no optimiser state.
"""

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vpr_jax.errors import ConfigError

OPTIMIZERS = ('sgd', 'adam', 'adamw', 'adam_l2')
SCHEDULES = ('multistep', 'cosine', 'constant', 'linear')

# torch.optim defaults.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
SGD_NESTEROV = False

Schedule = Callable[[Any], jax.Array]


def check_config(optim_config: ml_collections.ConfigDict) -> None:
  """Checks `config.optim`: names (listing the valid choices) and every number's range."""
  if optim_config.optimizer not in OPTIMIZERS:
    raise ConfigError(f'Unknown optim.optimizer {optim_config.optimizer!r}; valid choices: '
                      f'{", ".join(OPTIMIZERS)}.')
  if optim_config.schedule not in SCHEDULES:
    raise ConfigError(f'Unknown optim.schedule {optim_config.schedule!r}; valid choices: '
                      f'{", ".join(SCHEDULES)}.')
  ranges = {  # field: (lowest allowed, whether the lowest is allowed itself)
      'learning_rate': (0.0, False), 'weight_decay': (0.0, True), 'momentum': (0.0, True),
      'gamma': (0.0, False)}
  for field, (low, inclusive) in ranges.items():
    value = optim_config.get(field)
    if value is None:
      continue
    if (isinstance(value, bool) or not isinstance(value, (int, float))
        or not math.isfinite(value) or value < low or (value == low and not inclusive)):
      raise ConfigError(f'optim.{field} must be a finite number {">=" if inclusive else ">"} '
                        f'{low:g}, got {value!r}.')
  warmup = optim_config.warmup_steps
  if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
    raise ConfigError(f'optim.warmup_steps must be an integer >= 0, got {warmup!r}.')
  milestones = tuple(optim_config.get('milestones', ()) or ())
  if any(isinstance(m, bool) or not isinstance(m, int) or m < 0 for m in milestones) or (
      list(milestones) != sorted(milestones)):
    raise ConfigError('optim.milestones must be increasing epoch numbers >= 0, got '
                      f'{milestones!r}.')


def make_schedule(optim_config: ml_collections.ConfigDict, steps_per_epoch: int,
                  num_epochs: int) -> Schedule:
  """The learning rate as a function of the step (0-based count of optimiser steps taken).

  Args:
    optim_config: `config.optim`.
    steps_per_epoch: optimiser steps per epoch (milestones are in epochs).
    num_epochs: length of training (the cosine schedule reaches 0 at its end).

  Returns:
    `schedule(step) -> float32 learning rate`, jit-safe.
  """
  check_config(optim_config)
  if steps_per_epoch < 1:
    raise ValueError(f'steps_per_epoch must be >= 1, got {steps_per_epoch}.')
  base_lr = float(optim_config.learning_rate)
  warmup_steps = int(optim_config.warmup_steps)
  kind = optim_config.schedule
  milestones = tuple(int(m) for m in optim_config.milestones)
  gamma = float(optim_config.gamma)
  total_steps = max(1, int(num_epochs) * int(steps_per_epoch))
  linear_steps = max(1, int(optim_config.get('linear_steps', 0) or total_steps))
  linear_end_factor = float(optim_config.get('linear_end_factor', 1.0))

  def schedule(step):
    step = jnp.asarray(step, jnp.int32)
    if warmup_steps > 0:
      warmup = jnp.minimum(1.0, (step + 1).astype(jnp.float32) / warmup_steps)
    else:
      warmup = jnp.float32(1.0)
    if kind == 'multistep':
      epoch = step // steps_per_epoch
      passed = sum((epoch >= m).astype(jnp.int32) for m in milestones) if milestones else 0
      decay = jnp.float32(gamma) ** jnp.asarray(passed, jnp.float32)
    elif kind == 'linear':
      # torch.optim.lr_scheduler.LinearLR(start_factor=1, end_factor, total_iters) (SALAD).
      progress = jnp.minimum(step, linear_steps).astype(jnp.float32) / linear_steps
      decay = 1.0 + (linear_end_factor - 1.0) * progress
    elif kind == 'cosine':
      progress = jnp.minimum(step, total_steps).astype(jnp.float32) / total_steps
      decay = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    else:
      decay = jnp.float32(1.0)
    return (base_lr * warmup * decay).astype(jnp.float32)

  return schedule


def scale_by_torch_adam(b1: float = ADAM_BETAS[0], b2: float = ADAM_BETAS[1],
                        eps: float = ADAM_EPS) -> optax.GradientTransformation:
  """Adam's direction as torch.optim.Adam computes it: (m / bc1) / (sqrt(v) / sqrt(bc2) + eps).

  optax.scale_by_adam forms the bias corrections 1 - b ** t with b rounded to float32, which
  is 1.3e-5 off for b2 = 0.999 at t = 1; torch uses float64. Here 1 - b ** t is computed as
  -expm1(t * log(b)) with log(b) taken in float64, accurate to float32 rounding.

  Args:
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the denominator after the bias correction.

  Returns:
    The transformation; its state is an optax.ScaleByAdamState.
  """
  log_b1, log_b2 = math.log(b1), math.log(b2)

  def init_fn(params):
    zeros = lambda p: jnp.zeros_like(p)
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                  mu=jax.tree.map(zeros, params), nu=jax.tree.map(zeros, params))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_int32_increment(state.count)
    mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * jnp.square(g), state.nu, updates)

    def direction(m, v):
      t = count.astype(m.dtype)
      bias_correction1 = -jnp.expm1(t * log_b1)
      bias_correction2 = -jnp.expm1(t * log_b2)
      return (m / bias_correction1) / (jnp.sqrt(v) / jnp.sqrt(bias_correction2) + eps)

    return jax.tree.map(direction, mu, nu), optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def _base_optimizer(optim_config: ml_collections.ConfigDict,
                    schedule: Schedule) -> optax.GradientTransformation:
  name = optim_config.optimizer
  weight_decay = float(optim_config.weight_decay)
  b1, b2 = ADAM_BETAS
  if name in ('adamw', 'adam'):
    # The family's configure_optimizers builds torch.optim.AdamW for both names.
    # optax adds wd * p to the Adam direction before scaling by -lr: p - lr * (adam + wd * p),
    # which is torch's p * (1 - lr * wd) - lr * adam.
    return optax.chain(
        scale_by_torch_adam(b1=b1, b2=b2, eps=ADAM_EPS),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(schedule),
    )
  if name == 'adam_l2':
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        scale_by_torch_adam(b1=b1, b2=b2, eps=ADAM_EPS),
        optax.scale_by_learning_rate(schedule),
    )
  # sgd: torch's buf = momentum * buf + g (first step buf = g), matching optax.trace from zeros.
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.trace(decay=float(optim_config.momentum), nesterov=SGD_NESTEROV),
      optax.scale_by_learning_rate(schedule),
  )


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int,
                   frozen_mask: Optional[Any] = None
                   ) -> tuple[optax.GradientTransformation, Schedule]:
  """Builds the optimiser of a config.

  Args:
    config: the full ConfigDict (uses config.optim and config.num_epochs).
    steps_per_epoch: optimiser steps per epoch.
    frozen_mask: pytree of bools with the structure of the params, True for frozen parameters
      (no update, no weight decay, no optimiser state); None freezes nothing.

  Returns:
    (optax transformation, schedule): schedule(step) gives the learning rate used at that step.
  """
  schedule = make_schedule(config.optim, steps_per_epoch, config.num_epochs)
  tx = _base_optimizer(config.optim, schedule)
  if frozen_mask is not None:
    labels = jax.tree.map(lambda frozen: 'frozen' if frozen else 'trained', frozen_mask)
    tx = optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()}, labels)
  return tx, schedule
