"""The train-and-evaluate loop: steps, training records, validation, checkpoints, hooks.

  run = setup.setup_run(config, workdir)      everything read, checked, compiled, restored
  for each batch (parallel.host_batches -> prefetch to the devices):
    state, metrics = train_step(state, batch, rng)
    every log_every_steps: a training record -> hooks (metrics.jsonl, TensorBoard, console)
    every eval_every_epochs epochs: validation (Recall@N) -> hooks -> best + latest checkpoint
    every checkpoint_every_steps steps: latest checkpoint
    SIGTERM / SIGINT: finish the step, save a checkpoint (with the data iterator), stop

One trainer per workdir: process 0 holds the workdir's lock (`workdir_lock`) from before anything
is written until the run ends; a second trainer started on the same workdir stops at once, naming
the holder.

Non-finite loss or gradients are caught inside the step: the update is not applied (parameters,
BatchNorm statistics and optimiser state keep their values). The host looks at the count at every
log step and before every checkpoint: on_nonfinite='stop' ends the run naming the first bad step
(the checkpoints hold only states from before it); 'skip' carries on and counts skipped steps.
"""

import time
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np

from vpr_jax import parallel
from vpr_jax.errors import NonFiniteError
from vpr_jax.training import hooks as hooks_lib
from vpr_jax.training import preemption
from vpr_jax.training import setup
from vpr_jax.training import state as state_lib
from vpr_jax.training import workdir_lock


class PendingMetrics:
  """The step metrics since the last training record, kept on the device until a log step."""

  def __init__(self, run: setup.Run):
    self.run = run
    self.pending: list[tuple[int, Any]] = []
    self.interval_start = time.perf_counter()
    self.interval_steps = 0

  def add(self, step: int, metrics) -> None:
    """Keeps the (asynchronous) metrics of `step`."""
    self.pending.append((step, metrics))
    self.interval_steps += 1

  def restart_clock(self) -> None:
    """Validation time does not count towards the next record's images_per_sec."""
    self.interval_start = time.perf_counter()

  def check_finite(self, step: int) -> int:
    """Raises (on_nonfinite='stop') for a bad step since the last check; returns the count."""
    run = self.run
    dp = run.programs.dp
    if run.config.on_nonfinite == 'stop' and self.pending:
      flags = jax.device_get(dp.unreplicate([metrics['finite'] for _, metrics in self.pending]))
      bad = [number for (number, _), flag in zip(self.pending, flags) if float(flag) == 0.0]
      if bad:
        raise NonFiniteError(
            f'Non-finite loss or gradient at step {bad[0]} (the update was not applied; '
            f'detected at step {step}). Checkpoints in {run.checkpointer.directory} are intact '
            f'(latest step {run.checkpointer.latest_step()}). Set on_nonfinite="skip" to skip '
            'such steps.')
    return int(np.asarray(jax.device_get(dp.unreplicate(run.state.nonfinite_count))))

  def record(self, step: int) -> dict[str, Any]:
    """The training record of the steps since the last one (fetches their metrics)."""
    run = self.run
    skipped = self.check_finite(step)
    fetched = jax.device_get(run.programs.dp.unreplicate([m for _, m in self.pending]))
    self.pending.clear()
    # Measured after the fetch, which waits for the (asynchronously dispatched) steps.
    elapsed = max(time.perf_counter() - self.interval_start, 1e-9)
    finite = [m for m in fetched if float(m['finite']) > 0]

    def mean(key):
      value = float(np.mean([float(m[key]) for m in finite])) if finite else float('nan')
      return value if np.isfinite(value) else None

    record = {
        'step': step, 'epoch': (step - 1) // run.steps_per_epoch,
        'loss': mean('loss'), 'b_acc': mean('b_acc'), 'lr': float(fetched[-1]['lr']),
        'images_per_sec': self.interval_steps * run.sizes.images_global / elapsed,
        'grad_norm': mean('grad_norm'), 'skipped_steps': skipped,
    }
    self.interval_start, self.interval_steps = time.perf_counter(), 0
    return record


def validate(run: setup.Run, hooks: hooks_lib.Hook, step: int) -> dict[str, dict[str, float]]:
  """Recall@N of the current state on the validation sets; hooks see the results."""
  results = run.evaluator.run(run.eval_variables())
  run.last_eval_results = results
  run.last_val = hooks_lib.recall_record(results)
  hooks.on_validation(run, step, results)
  return run.last_val


def save_checkpoint(run: setup.Run, hooks: hooks_lib.Hook, step: int,
                    val_results: Optional[dict[str, dict[str, float]]] = None) -> None:
  """Latest checkpoint of `step` (with the data iterator), and a best one after a validation."""
  variables, train = state_lib.checkpoint_items(run.host_state(), run.train_rng)
  r1 = None
  if val_results:
    r1 = val_results[run.evaluator.names[0]]['1']
    if run.best_r1 is None or r1 > run.best_r1:
      run.best_r1, run.best_step = r1, step
  with hooks.on_save(run, step):
    run.checkpointer.save(step, variables=variables, train=train,
                          data_iterator_state=run.iterator_state, r1=r1,
                          info={'epoch': step // run.steps_per_epoch,
                                'val': dict(val_results or {})})


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       hooks: Sequence[hooks_lib.Hook] = ()) -> dict[str, Any]:
  """Trains and validates a model as configured; resumes from `workdir` if it has a checkpoint.

  Args:
    config: the full ConfigDict (configs/default.py documents every field).
    workdir: where config.json, metrics.jsonl, tb/, checkpoints/ and predictions/ go.
    hooks: hooks called after the default ones (`hooks.default_hooks`).

  Returns:
    A summary dict: 'step' (steps done), 'train' (last training record), 'val' ({dataset: recall}
    of the last validation), 'best_r1' and 'best_step', 'skipped_steps', and 'stopped_by' (the
    name of the signal that stopped the run early, or None).
  """
  with workdir_lock.WorkdirLock(workdir, jax.process_index()):
    with preemption.StopRequest(check_every_steps=int(config.log_every_steps)) as stop:
      run = setup.setup_run(config, workdir)
      return _train(run, hooks, stop)


def _train(run: setup.Run, hooks: Sequence[hooks_lib.Hook],
           stop: preemption.StopRequest) -> dict[str, Any]:
  """The loop over a set-up run (see `train_and_evaluate`)."""
  config = run.config
  all_hooks = hooks_lib.Hooks(
      hooks_lib.default_hooks(run.workdir, config, run.is_main, setup.describe) + list(hooks))
  metrics = PendingMetrics(run)
  last_record: dict[str, Any] = {}
  try:
    all_hooks.on_start(run)
    train_step = all_hooks.wrap_train_step(run.programs.train_step)
    if config.eval_before_training and run.step == 0:
      save_checkpoint(run, all_hooks, 0, validate(run, all_hooks, 0))
    dp = run.programs.dp
    device_batches = parallel.prefetch(
        parallel.host_batches(run.train_iter),
        lambda item: (dp.shard_batch(item[0]), item[1]),
        size=2 if jax.default_backend() != 'cpu' else 1)
    metrics.restart_clock()
    while run.step < run.last_step and not stop.should_stop(run.step):
      try:
        batch, iterator_state = next(device_batches)
      except StopIteration:
        break
      run.state, step_metrics = train_step(run.state, batch, run.train_rng)
      run.step += 1
      run.iterator_state = iterator_state
      metrics.add(run.step, step_metrics)
      end_of_epoch = run.step % run.steps_per_epoch == 0
      if (run.step % int(config.log_every_steps) == 0 or run.step == run.last_step
          or end_of_epoch):
        last_record = metrics.record(run.step)
        all_hooks.on_train_record(run, last_record)
      epochs_done = run.step // run.steps_per_epoch
      if end_of_epoch and epochs_done % int(config.eval_every_epochs) == 0:
        metrics.check_finite(run.step)
        save_checkpoint(run, all_hooks, run.step, validate(run, all_hooks, run.step))
        metrics.restart_clock()
      elif config.checkpoint_every_steps and run.step % int(config.checkpoint_every_steps) == 0:
        metrics.check_finite(run.step)
        save_checkpoint(run, all_hooks, run.step)
    skipped = metrics.check_finite(run.step)
    if run.step > run.start_step and run.checkpointer.latest_step() != run.step:
      save_checkpoint(run, all_hooks, run.step)
    if stop.stop_step is None:
      all_hooks.on_end(run)
  finally:
    try:
      all_hooks.close()
    finally:
      run.close()
  if stop.stop_step is not None and run.is_main:
    # After the progress bar is closed, so that the line stands alone.
    print(f'Stopped by {stop.signal_name} after step {run.step}: checkpoint saved in '
          f'{run.checkpointer.directory}. Run the same command to resume.', flush=True)
  return {'step': run.step, 'train': last_record, 'val': run.last_val, 'best_r1': run.best_r1,
          'best_step': run.best_step, 'skipped_steps': skipped,
          'stopped_by': stop.signal_name if stop.stop_step is not None else None}
