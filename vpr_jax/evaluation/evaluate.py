"""The library function of `python -m vpr_jax.eval`: a checkpoint on benchmark sets -> files.

checkpoint -> `checkpoints.orbax_states.load_for_eval` (config + variables) -> every set read by
`data.evaluation.catalog.load_benchmarks` -> per set `benchmark_eval.evaluate_dataset` -> the
seed's table -> `outputs` (JSON, NPZ, CSV) and `visualize` (query sheets).
"""

import os
from typing import Callable, Optional, Sequence

from absl import logging
import jax

from vpr_jax import fileio
from vpr_jax import visualize as visualize_lib
from vpr_jax.checkpoints import orbax_states
from vpr_jax.checkpoints import runs
from vpr_jax.data.evaluation import catalog
from vpr_jax.data import roots
from vpr_jax.data.multiprocess import workers
from vpr_jax.errors import CheckpointMismatchError
from vpr_jax.errors import CheckpointNotFoundError
from vpr_jax.errors import ConfigError
from vpr_jax.evaluation import benchmark_eval
from vpr_jax.evaluation import outputs
from vpr_jax.evaluation import search
from vpr_jax.models import vpr_model

def check_arguments(batch_size: Optional[int], num_workers: Optional[int], visualize: int,
                    visualize_k: int) -> None:
  """The numeric options of `evaluate`, checked before any work (ConfigError names the flag)."""
  if batch_size is not None and int(batch_size) < 1:
    raise ConfigError(f'--batch_size must be a positive integer, got {batch_size}.')
  if num_workers is not None and int(num_workers) < -1:
    raise ConfigError(f'--num_workers must be -1 (one per CPU core), 0 (this process only) or a '
                      f'positive number, got {num_workers}.')
  if int(visualize) < 0:
    raise ConfigError(f'--visualize must be >= 0 (the number of query sheets), got {visualize}.')
  if int(visualize_k) < 1:
    raise ConfigError(f'--visualize_k must be >= 1, got {visualize_k}.')


def evaluate(checkpoint: Optional[str], datasets: Optional[Sequence[str]] = None,
             data_root: str = '', *, config=None, batch_size: Optional[int] = None,
             num_workers: Optional[int] = None, output: Optional[str] = None,
             save_descriptors_to: Optional[str] = None, save_predictions_to: Optional[str] = None,
             visualize: int = 0, only_failures: bool = False,
             visualize_dir: Optional[str] = None, visualize_k: int = 5,
             ground_truth_dir: Optional[str] = None,
             print_fn: Callable[[str], None] = print) -> list[benchmark_eval.EvalResult]:
  """Evaluates a checkpoint on benchmark sets, prints the tables and writes the requested files.

  Args:
    checkpoint: checkpoint or training workdir (the best checkpoint is used); None or '': the most
      recent run in the default runs folder.
    datasets: registered benchmark names, groups ('family', 'all_available'), split folders or
      built benchmark folders (`data.evaluation.catalog`); default: the config's validation sets.
    data_root: datasets root; '' -> the config's data.root, then $VPR_DATA_ROOT.
    config: a ConfigDict used instead of the checkpoint's (e.g. another image size or radius).
    batch_size: images per forward batch; default config.data.eval_batch_size.
    num_workers: decoding worker processes (-1: one per core); default config.data.num_workers.
    output: JSON summary file.
    save_descriptors_to: `.npz` descriptors file (one per dataset when several).
    save_predictions_to: predictions CSV.
    visualize: number of query sheets (PNG) per dataset; 0 for none.
    only_failures: visualise only queries whose top-1 prediction is wrong.
    visualize_dir: folder of the sheets (a subfolder per dataset); default ./visualizations.
    visualize_k: predictions per sheet.
    ground_truth_dir: the gsv-cities family's list files (a folder laid out as its datasets/);
      default the config's data.ground_truth_dir, then <data root>/ground_truth.
    print_fn: where the tables and notes go.

  Returns:
    One `EvalResult` per dataset, in the order given.
  """
  checkpoint = resolve_checkpoint(checkpoint)
  check_arguments(batch_size, num_workers, visualize, visualize_k)
  # Every result file is checked before the (long) evaluation, so that none is lost at its end.
  check_output_files(output, save_descriptors_to, save_predictions_to,
                     visualize_dir if visualize else None, bool(visualize))
  config, model, variables, step = load_model(checkpoint, config, print_fn)
  datasets = list(datasets) if datasets else list(config.data.val_datasets)
  if not datasets:
    raise ConfigError('No dataset to evaluate: pass --dataset.')
  batch_size = int(batch_size if batch_size is not None else config.data.eval_batch_size)
  num_workers = workers.resolve_num_workers(
      config.data.num_workers if num_workers is None else num_workers)
  image_size = vpr_model.eval_image_size(config)
  interpolation = str(config.data.get('eval_interpolation', 'bilinear'))
  root = data_root or config.data.root
  if not root and roots.synthetic_enabled(config):
    root = roots.synthetic_data_root()  # where the demo generated its data

  # Every set is read and checked before the first is evaluated: a mistake in the last one
  # stops the command before any long work.
  loaded = catalog.load_benchmarks(
      datasets, root, float(config.data.positive_radius_m),
      ground_truth_dir=ground_truth_dir or config.data.get('ground_truth_dir', ''),
      prepared=tuple(config.data.get('prepared_benchmarks', ())), print_fn=print_fn)
  results = []
  for benchmark in loaded:
    result = benchmark_eval.evaluate_dataset(model, variables, benchmark, image_size, batch_size,
                                             num_workers, interpolation=interpolation)
    print_fn(outputs.format_recall_table(result.dataset, result.recall))
    for note in result_notes(result, benchmark):
      print_fn(note)
    results.append(result)

  extra = {'checkpoint': os.path.abspath(checkpoint), 'step': None if step is None else int(step),
           'image_size': list(image_size)}
  write_outputs(results, extra, output, save_descriptors_to, save_predictions_to, print_fn)
  if visualize:
    write_sheets(results, visualize_dir or 'visualizations', visualize, visualize_k,
                 only_failures, print_fn)
  return results


def resolve_checkpoint(checkpoint: Optional[str]) -> str:
  """The checkpoint given, or the most recent run under the default runs folder."""
  if checkpoint:
    return checkpoint
  runs_dir = runs.default_runs_dir()
  latest = runs.find_latest_run(runs_dir)
  if latest is None:
    raise CheckpointNotFoundError(
        f'No --checkpoint given and no run with a checkpoint under '
        f'{os.path.abspath(runs_dir)} (set $VPR_RUNS_DIR or pass --checkpoint).')
  return latest


def check_output_files(output: Optional[str], save_descriptors_to: Optional[str],
                       save_predictions_to: Optional[str], visualize_dir: Optional[str],
                       visualize: bool):
  """Raises OutputPathError for a result file or sheet folder that could not be written."""
  for path, flag in ((output, '--output'), (save_descriptors_to, '--save_descriptors'),
                     (save_predictions_to, '--save_predictions')):
    if path:
      fileio.check_output_path(path, flag)
  if visualize:
    fileio.check_output_folder(visualize_dir or 'visualizations', '--visualize_dir')


def load_model(checkpoint: str, config, print_fn: Callable[[str], None]):
  """(config, model, variables, step) of a checkpoint, the model built from `config` if given.

  Raises:
    CheckpointMismatchError: the checkpoint's variables do not fit the given config's model.
  """
  checkpoint_config, variables, step = orbax_states.load_for_eval(checkpoint)
  print_fn(f'Checkpoint: {os.path.abspath(checkpoint)} (step {step})')
  if config is None:
    config = checkpoint_config
  elif config.model.to_dict() != checkpoint_config.model.to_dict():
    logging.warning('The model fields of the given config differ from those of the checkpoint; '
                    'the checkpoint variables may not fit.')
  image_size = vpr_model.eval_image_size(config)
  model = vpr_model.build_model(config, image_size=image_size)
  if config is not checkpoint_config:
    # A config of another architecture would otherwise fail deep inside the forward pass.
    expected = jax.eval_shape(
        lambda: vpr_model.init_variables(model, jax.random.PRNGKey(0), image_size))
    differences = orbax_states.tree_differences(expected, variables)
    if differences:
      raise CheckpointMismatchError(
          f'The variables of {os.path.abspath(checkpoint)} (step {step}) do not fit the model of '
          'the given config; evaluate without --config, or with the config the checkpoint was '
          'trained with. Differences:\n  ' + '\n  '.join(differences))
  return config, model, variables, step


def result_notes(result: benchmark_eval.EvalResult, benchmark) -> list[str]:
  """What a reader of a recall table must know: queries without positives, a small database."""
  notes = []
  if result.queries_without_positives:
    within = (f'within {benchmark.radius_m:g} m' if benchmark.radius_m is not None
              else 'in the ground truth')
    notes.append(f'{result.queries_without_positives} of {result.num_queries} queries have no '
                 f'positive {within} (counted as misses).')
  if result.num_database < max(search.RECALL_NS):
    notes.append(f'The database has only {result.num_database} images: Recall@N for larger N '
                 'uses all of them.')
  return notes


def write_outputs(results: Sequence[benchmark_eval.EvalResult], extra: dict,
                  output: Optional[str], save_descriptors_to: Optional[str],
                  save_predictions_to: Optional[str], print_fn: Callable[[str], None]):
  """Writes the JSON summary, the descriptors (one file per set when several), the CSV."""
  if output:
    outputs.write_json(output, results, extra)
    print_fn(f'Wrote {output}')
  if save_descriptors_to:
    for result in results:
      path = outputs.per_dataset_path(save_descriptors_to, result.dataset, len(results))
      outputs.save_descriptors(path, result)
      print_fn(f'Wrote {path}')
  if save_predictions_to:
    outputs.save_predictions(save_predictions_to, results)
    print_fn(f'Wrote {save_predictions_to}')


def write_sheets(results: Sequence[benchmark_eval.EvalResult], visualize_dir: str, count: int,
                 top_k: int, only_failures: bool, print_fn: Callable[[str], None]):
  """Writes `count` query sheets (PNG) per set, in a subfolder per set."""
  for result in results:
    folder = visualize_lib.sheet_folder(visualize_dir, result.dataset)
    written = visualize_lib.visualize_predictions(result, folder, count, top_k=top_k,
                                                  only_failures=only_failures)
    print_fn(f'Wrote {len(written)} query sheets to {folder}')
