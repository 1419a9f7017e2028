r"""Converts a PyTorch checkpoint of the family into a checkpoint that `vpr_jax.eval` loads.

  python -m vpr_jax.convert --config mixvpr_r50 --torch-checkpoint model.ckpt --out DIR
  python -m vpr_jax.convert --config salad_dinov2 --torch-checkpoint dino_salad.ckpt --out DIR
  python -m vpr_jax.eval --checkpoint DIR ...

See `vpr_jax.conversion.mapping` (the family's files) and `transformer_mapping` (SALAD's and
BoQ's released files) for the files understood. Nothing is written unless the whole
conversion succeeds.
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from vpr_jax import config_fields
from vpr_jax.cli import common
from vpr_jax.conversion import converter
from vpr_jax.models import vpr_model

FLAGS = flags.FLAGS

config_flags.DEFINE_config_file('config', None, 'Config describing the model: a packaged config '
                                'name (mixvpr, ...) or a configs/*.py file.', lock_config=True)
flags.DEFINE_string('torch_checkpoint', None, 'PyTorch .pth / .ckpt file to convert.')
flags.DEFINE_string('out', None, 'Output checkpoint directory (for vpr_jax.eval --checkpoint).')
flags.DEFINE_enum('kind', 'auto', converter.KINDS, 'torchvision: ImageNet ResNet state dict '
                  '(backbone only); family: gsv-cities / MixVPR / mldl24-vpr / NetVLAD model; '
                  'salad, boq_dinov2, boq_resnet: the authors\' released files; auto: detect.')
flags.DEFINE_alias('layout', 'kind')
flags.DEFINE_bool('overwrite', False, 'Replace a checkpoint that vpr_jax.convert wrote in --out '
                  '(a folder holding other files is refused).')
flags.mark_flags_as_required(['config', 'torch_checkpoint', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config_fields.split_comma_separated(FLAGS.config)
  config, variables = common.report_user_errors(
      converter.convert_checkpoint, FLAGS.config, FLAGS.torch_checkpoint, FLAGS.out,
      kind=FLAGS.kind, overwrite=FLAGS.overwrite)
  counts = vpr_model.count_parameters(variables['params'], model_config=config.model)
  print(vpr_model.format_parameter_table(counts, config.model))
  print(f'Wrote {os.path.abspath(FLAGS.out)}')


def run():
  """Console entry point: accepts dashed flag names, then runs `main` under absl."""
  common.run(main, interrupted='nothing was written.')


if __name__ == '__main__':
  run()
