"""What a training run reports, as hooks the loop calls: files, TensorBoard, console, sheets.

The loop (`loop.train_and_evaluate`) calls every hook at the same points:

  on_start(run)                      after setup, before the first step
  wrap_train_step(step) -> step      once, to wrap the compiled step (tests inject faults here)
  on_train_record(run, record)       every training record (config.log_every_steps)
  on_validation(run, step, results)  after every validation ({dataset: EvalResult})
  on_save(run, step)                 a context around every checkpoint write
  on_end(run)                        after the last step and its checkpoint
  close()                            always, also after an error

`default_hooks` gives what a run writes: `metrics.jsonl` (`MetricsFile`), TensorBoard events
(`TensorBoardHook`), the console tables and progress bar (`ConsoleHook`) and the query + top-5
prediction sheets of the last validation (`PredictionSheetsHook`). Tests add their own hooks with
`train_and_evaluate(..., hooks=[...])`.
"""

import contextlib
import json
import os
import sys
from typing import Any, Callable, ContextManager, Mapping, Optional, Sequence

import tensorboardX
from tqdm import auto as tqdm

from vpr_jax import fileio
from vpr_jax import strict_json
from vpr_jax import visualize
from vpr_jax.evaluation import outputs

METRICS_FILENAME = 'metrics.jsonl'
TENSORBOARD_SUBDIR = 'tb'
PREDICTIONS_SUBDIR = 'predictions'


class Hook:
  """A training hook: every method does nothing unless overridden."""

  def on_start(self, run) -> None:
    """After setup, before the first step."""

  def wrap_train_step(self, step_fn: Callable) -> Callable:
    """Returns the step the loop calls: `step_fn` itself, or a wrapper of it."""
    return step_fn

  def on_train_record(self, run, record: Mapping[str, Any]) -> None:
    """A training record: step, epoch, loss, b_acc, lr, images_per_sec, grad_norm, skipped."""

  def on_validation(self, run, step: int, results: Mapping[str, Any]) -> None:
    """After a validation: {dataset: `evaluation.benchmark_eval.EvalResult`}."""

  def on_save(self, run, step: int) -> ContextManager:
    """A context entered around the checkpoint write of `step`."""
    del run, step
    return contextlib.nullcontext()

  def on_end(self, run) -> None:
    """After the last step and its checkpoint."""

  def close(self) -> None:
    """Always called last, also when the run failed."""


class Hooks(Hook):
  """Several hooks called in order, as one."""

  def __init__(self, hooks: Sequence[Hook]):
    self.hooks = list(hooks)

  def on_start(self, run) -> None:
    for hook in self.hooks:
      hook.on_start(run)

  def wrap_train_step(self, step_fn: Callable) -> Callable:
    for hook in self.hooks:
      step_fn = hook.wrap_train_step(step_fn)
    return step_fn

  def on_train_record(self, run, record: Mapping[str, Any]) -> None:
    for hook in self.hooks:
      hook.on_train_record(run, record)

  def on_validation(self, run, step: int, results: Mapping[str, Any]) -> None:
    for hook in self.hooks:
      hook.on_validation(run, step, results)

  @contextlib.contextmanager
  def on_save(self, run, step: int):
    with contextlib.ExitStack() as stack:
      for hook in self.hooks:
        stack.enter_context(hook.on_save(run, step))
      yield

  def on_end(self, run) -> None:
    for hook in self.hooks:
      hook.on_end(run)

  def close(self) -> None:
    errors = []
    for hook in self.hooks:
      try:
        hook.close()
      except Exception as e:  # pylint: disable=broad-except
        errors.append(e)
    if errors:
      raise errors[0]


def recall_record(results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
  """{dataset: {"1": percent, ...}} of validation results (string keys, as in metrics.jsonl)."""
  return {name: {str(n): float(v) for n, v in result.recall.items()}
          for name, result in results.items()}


class MetricsFile(Hook):
  """metrics.jsonl, written by process 0; truncated to the restored step on resume.

  One strict JSON object per line (non-finite numbers are null). Training records: step, epoch
  (0-based epoch of that step), loss and b_acc (means over the steps since the previous record),
  lr (of the last step), images_per_sec, grad_norm, skipped_steps. Validation records: step,
  epoch (epochs completed), dataset, recall {"1": percent, ...}.
  """

  def __init__(self, workdir: str, enabled: bool):
    self.path = os.path.join(workdir, METRICS_FILENAME)
    self.enabled = enabled

  def on_start(self, run) -> None:
    # A resumed run reads as one uninterrupted run; a fresh one (also after a run that failed
    # before its first checkpoint) starts an empty file.
    self.truncate_after(run.start_step if run.resumed else -1)

  def truncate_after(self, step: int) -> None:
    """Drops the records after `step`."""
    if not self.enabled or not os.path.exists(self.path):
      return
    kept = []
    with open(self.path) as f:
      for line in f:
        line = line.strip()
        if not line:
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          break  # a line cut short by a crash ends the usable history
        if int(record.get('step', 0)) <= step:
          kept.append(line)
    fileio.atomic_write(self.path, ''.join(line + '\n' for line in kept))

  def write(self, record: Mapping[str, Any]) -> None:
    """Appends one record."""
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(strict_json.dumps(record) + '\n')

  def on_train_record(self, run, record: Mapping[str, Any]) -> None:
    self.write(record)

  def on_validation(self, run, step: int, results: Mapping[str, Any]) -> None:
    for name, recall in recall_record(results).items():
      self.write({'step': step, 'epoch': step // run.steps_per_epoch, 'dataset': name,
                  'recall': recall})


class TensorBoardHook(Hook):
  """TensorBoard event files under <workdir>/tb: train/* and val/<dataset>/R<N>."""

  _TRAIN_KEYS = ('loss', 'b_acc', 'lr', 'images_per_sec', 'grad_norm')

  def __init__(self, workdir: str, enabled: bool):
    self.writer = (tensorboardX.SummaryWriter(logdir=os.path.join(workdir, TENSORBOARD_SUBDIR))
                   if enabled else None)

  def on_train_record(self, run, record: Mapping[str, Any]) -> None:
    if self.writer is None:
      return
    for key in self._TRAIN_KEYS:
      if record.get(key) is not None:
        self.writer.add_scalar(f'train/{key}', record[key], record['step'])

  def on_validation(self, run, step: int, results: Mapping[str, Any]) -> None:
    if self.writer is None:
      return
    for name, recall in recall_record(results).items():
      for n, value in recall.items():
        self.writer.add_scalar(f'val/{name}/R{n}', value, step)
    self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


class ConsoleHook(Hook):
  """On process 0: the start tables, the recall tables, then a tqdm progress bar of the steps."""

  def __init__(self, enabled: bool, start_lines: Callable[[Any], Sequence[str]] = lambda run: ()):
    self.enabled = enabled
    self.start_lines = start_lines
    self.bar = None
    self.total = self.initial = 0

  def print(self, text: str) -> None:
    """Prints a line above the progress bar."""
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.write(text)
    else:
      print(text, flush=True)

  def on_start(self, run) -> None:
    self.total, self.initial = run.last_step, run.start_step
    if not self.enabled:
      return
    for line in list(run.notes) + list(self.start_lines(run)):
      self.print(line)

  def on_train_record(self, run, record: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    if self.bar is None:
      self.bar = tqdm.tqdm(total=self.total, initial=self.initial, unit='step',
                           dynamic_ncols=True, smoothing=0.1, file=sys.stderr)
    fmt = lambda key, spec: 'nan' if record.get(key) is None else format(record[key], spec)
    self.bar.set_postfix({'loss': fmt('loss', '.4f'), 'b_acc': fmt('b_acc', '.3f'),
                          'lr': fmt('lr', '.2e'), 'img/s': fmt('images_per_sec', '.0f')},
                         refresh=False)
    self.bar.update(record['step'] - self.bar.n)

  def on_validation(self, run, step: int, results: Mapping[str, Any]) -> None:
    for name, result in results.items():
      self.print(outputs.format_recall_table(name, result.recall))

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


class PredictionSheetsHook(Hook):
  """At the end: query + top-5 prediction sheets of the last validation, a folder per dataset."""

  def __init__(self, workdir: str, num_queries: int, enabled: bool,
               print_fn: Callable[[str], None] = print):
    self.folder = os.path.join(workdir, PREDICTIONS_SUBDIR)
    self.num_queries = int(num_queries)
    self.enabled = enabled and self.num_queries > 0
    self.print_fn = print_fn
    self.last_results: dict[str, Any] = {}

  def on_validation(self, run, step: int, results: Mapping[str, Any]) -> None:
    self.last_results = dict(results)

  def on_end(self, run) -> None:
    if not self.enabled:
      return
    for name, result in self.last_results.items():
      out_dir = visualize.sheet_folder(self.folder, name)
      written = visualize.visualize_predictions(result, out_dir, self.num_queries)
      self.print_fn(f'Wrote {len(written)} prediction sheets of {name} to {out_dir}')


def default_hooks(workdir: str, config, is_main: bool,
                  start_lines: Optional[Callable[[Any], Sequence[str]]] = None) -> list[Hook]:
  """The hooks of every run: metrics.jsonl, TensorBoard, console, prediction sheets.

  Args:
    workdir: the run folder.
    config: the run's ConfigDict (visualize_queries).
    is_main: process 0 writes and prints; the other processes only run.
    start_lines: run -> the tables printed at start.

  Returns:
    The hooks, in the order they are called.
  """
  console = ConsoleHook(is_main, start_lines or (lambda run: ()))
  return [
      MetricsFile(workdir, is_main),
      TensorBoardHook(workdir, is_main),
      console,
      PredictionSheetsHook(workdir, int(config.visualize_queries), is_main, console.print),
  ]

