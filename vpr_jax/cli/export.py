r"""Writes a vpr_jax checkpoint as a PyTorch file that the family's own code loads.

  python -m vpr_jax.export --checkpoint runs/mixvpr --out mixvpr.ckpt            # Lightning
  python -m vpr_jax.export --checkpoint ckpt/salad --out dino_salad.ckpt          # SALAD's layout
  python -m vpr_jax.export --checkpoint ckpt/boq_dinov2 --out boq.pth             # BoQ's layout
  python -m vpr_jax.export --checkpoint runs/mixvpr --out mixvpr.safetensors --format safetensors

`FILE.json` beside the file gives the input size, resize, normalisation, descriptor size and the
authors' constructor call. See `vpr_jax.conversion.exporter` for the formats. Nothing is written
unless the whole export succeeds; an existing file is replaced only with --overwrite, and only
when it is an earlier export.
"""

from absl import app
from absl import flags

from vpr_jax.cli import common
from vpr_jax.conversion import exporter

FLAGS = flags.FLAGS


def _define_flags():
  """Defines the flags; only when run as a program, as other entry points define the same names."""
  flags.DEFINE_string('checkpoint', None, 'Training workdir, its checkpoints/ folder or a '
                      'converted checkpoint (the best step by validation R@1, else the latest).')
  flags.DEFINE_string('out', None, 'File to write (.ckpt, .pth, .safetensors); FILE.json is '
                      'written beside it.')
  flags.DEFINE_enum('format', None, exporter.FORMATS, 'lightning: {"state_dict": ...} of '
                    'gsv-cities / MixVPR; pth: the same state dict bare; salad: SALAD\'s '
                    'dino_salad.ckpt layout; boq: BoQ\'s released layout; safetensors: the '
                    'model\'s own layout as safetensors. Default: lightning for the ResNet '
                    'family, salad for SALAD, boq for BoQ.')
  flags.DEFINE_integer('step', None, 'A particular step of a training run (default: the best).')
  flags.DEFINE_bool('overwrite', False, 'Replace an earlier export at --out (any other file there '
                    'is refused).')
  flags.mark_flags_as_required(['checkpoint', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  info = common.report_user_errors(
      exporter.export_checkpoint, FLAGS.checkpoint, FLAGS.out, export_format=FLAGS.format,
      overwrite=FLAGS.overwrite, step=FLAGS.step)
  print(f'{info["model"]}: {info["tensors"]} tensors in the {info["layout"]} layout '
        f'({info["format"]}), descriptor {info["descriptor_size"]}-d at '
        f'{info["image_size"][0]}x{info["image_size"][1]}.')
  print(f'Load with: {info["load"]}')
  print(f'Wrote {FLAGS.out} and {FLAGS.out}{exporter.SIDECAR_SUFFIX}')


def run():
  """Console entry point: accepts dashed flag names, then runs `main` under absl."""
  _define_flags()
  common.run(main)


if __name__ == '__main__':
  run()
