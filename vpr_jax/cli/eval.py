r"""Evaluates a checkpoint on VPR benchmark sets and prints Recall@N.

  python -m vpr_jax.eval --checkpoint runs/seed_20260101-120000 --dataset sf_xs_val,tokyo_xs \
      --data_root /data --output results.json --save_descriptors desc.npz \
      --save_predictions predictions.csv --visualize 20 --only_failures --visualize_dir sheets

The checkpoint carries its config (model, image size, positive radius); `--config FILE` replaces
it (and allows `--config.field=value` overrides). Without `--checkpoint`, the best checkpoint of
the most recent run under $VPR_RUNS_DIR (default ./runs) is used. Dashed flag spellings
(`--data-root`, `--save-descriptors`, `--only-failures`, ...) are accepted.

Output files are described in `vpr_jax.evaluation.outputs`: with several datasets the JSON holds a list of
per-dataset objects, the descriptors go to `<stem>_<dataset>.npz`, and the CSV has a `dataset`
column.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from vpr_jax import config_fields
from vpr_jax.cli import common
from vpr_jax.data.evaluation import catalog
from vpr_jax.evaluation import evaluate

_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', '', 'Checkpoint folder, training workdir or its checkpoints/ folder (the best '
    'checkpoint is used). Default: the most recent run under $VPR_RUNS_DIR or ./runs.')
_DATASET = flags.DEFINE_list(
    'dataset', [], 'Comma-separated benchmark names (e.g. msls_val,pitts30k_test,nordland,sped; '
    '--list_datasets shows them all), groups (family, all_available), folders holding database/ '
    'and queries/, or benchmark folders built by vpr_jax.prepare --benchmark. Default: the '
    'config\'s validation sets.')
_GROUND_TRUTH_DIR = flags.DEFINE_string(
    'ground_truth_dir', '', 'Folder laid out as gsv-cities\' datasets/ (the family\'s list '
    'files), absolute or under the data root. Default: config data.ground_truth_dir, then '
    '<data root>/ground_truth.')
_LIST_DATASETS = flags.DEFINE_bool(
    'list_datasets', False, 'Print every registered benchmark (expected folder, present or not, '
    'size) and exit.')
_DATA_ROOT = flags.DEFINE_string(
    'data_root', '', 'Root of the datasets. Default: the config\'s data.root, then '
    '$VPR_DATA_ROOT.')
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file used instead of the checkpoint\'s config.', lock_config=False)
_BATCH_SIZE = flags.DEFINE_integer(
    'batch_size', None, 'Images per forward batch. Default: config data.eval_batch_size (256).')
_NUM_WORKERS = flags.DEFINE_integer(
    'num_workers', None, 'Image decoding worker processes (0: in the main process). Default: '
    'config data.num_workers.')
_OUTPUT = flags.DEFINE_string('output', '', 'Write the recall summary to this JSON file.')
_SAVE_DESCRIPTORS = flags.DEFINE_string(
    'save_descriptors', '', 'Write descriptors and image paths to this .npz file.')
_SAVE_PREDICTIONS = flags.DEFINE_string(
    'save_predictions', '', 'Write the top-25 predictions of every query to this CSV file.')
_VISUALIZE = flags.DEFINE_integer(
    'visualize', 0, 'Write a PNG sheet (query + top-k predictions) for this many queries.')
_VISUALIZE_K = flags.DEFINE_integer('visualize_k', 5, 'Predictions per sheet.')
_ONLY_FAILURES = flags.DEFINE_bool(
    'only_failures', False, 'Sheets only for queries whose top-1 prediction is wrong.')
_VISUALIZE_DIR = flags.DEFINE_string(
    'visualize_dir', 'visualizations', 'Folder of the sheets (one subfolder per dataset).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _LIST_DATASETS.value:
    common.report_user_errors(catalog.list_datasets, _DATA_ROOT.value,
                              _GROUND_TRUTH_DIR.value or None)
    return
  if _CONFIG.value is not None:
    config_fields.split_comma_separated(_CONFIG.value)
  common.report_user_errors(
      evaluate.evaluate,
      _CHECKPOINT.value or None,
      _DATASET.value or None,
      _DATA_ROOT.value,
      config=_CONFIG.value,
      batch_size=_BATCH_SIZE.value,
      num_workers=_NUM_WORKERS.value,
      output=_OUTPUT.value or None,
      save_descriptors_to=_SAVE_DESCRIPTORS.value or None,
      save_predictions_to=_SAVE_PREDICTIONS.value or None,
      visualize=_VISUALIZE.value,
      only_failures=_ONLY_FAILURES.value,
      visualize_dir=_VISUALIZE_DIR.value,
      visualize_k=_VISUALIZE_K.value,
      ground_truth_dir=_GROUND_TRUTH_DIR.value or None)


def run():
  """Console entry point: accepts dashed flag names, then runs `main` under absl."""
  common.run(main)


if __name__ == '__main__':
  run()
