r"""Lists every registered benchmark: the folder it expects, whether it is present, its size.

  python -m vpr_jax.datasets [--data_root /data/vpr] [--ground_truth_dir gsv-cities/datasets]

One line per name: the name, its layout (`folders`: database/queries folders of `@UTM@` names,
25 m positives; `lists`: the gsv-cities family's list files), the folder (and list files) it
expects, and `present: N database + M queries` or `missing:` with what was looked for. The groups
(`family`, `all_available`) close the list. Nothing is loaded beyond the list files and folder
listings, and nothing is written. `python -m vpr_jax.eval --list_datasets` prints the same.
"""

from absl import app
from absl import flags

from vpr_jax.cli import common
from vpr_jax.data.evaluation import catalog

_DATA_ROOT = flags.DEFINE_string(
    'data_root', '', 'Root of the datasets. Default: $VPR_DATA_ROOT.')
_GROUND_TRUTH_DIR = flags.DEFINE_string(
    'ground_truth_dir', '', 'Folder laid out as gsv-cities\' datasets/ (the family\'s list '
    'files), absolute or under the data root. Default: <data root>/ground_truth.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  common.report_user_errors(catalog.list_datasets, _DATA_ROOT.value,
                            _GROUND_TRUTH_DIR.value or None)


def run():
  """Console entry point: accepts dashed flag names, then runs `main` under absl."""
  common.run(main)


if __name__ == '__main__':
  run()
