r"""Indexes a folder of geotagged photos for localisation (`python -m vpr_jax.localize`).

  python -m vpr_jax.index --checkpoint runs/demo --images ~/photos/city --out city.index \
      [--half] [--faiss ivfpq | --faiss IVF4096,PQ64] [--coordinates coords.csv] [--fast-decode]

Every .jpg/.jpeg/.png under --images (recursively) is embedded exactly as evaluation does and
written with its coordinates (from --coordinates, from benchmark-style '@' names, or from the EXIF
GPS tags) and a FAISS index into --out (layout in `vpr_jax.localization.store`). Rerunning the
command embeds only new or changed images and drops removed ones; an interrupted run resumes where
it stopped. Dashed flag spellings (`--fast-decode`, `--no-exif-transpose`) are accepted.

`--hloc-features DB.h5` also writes the database's descriptors as hloc's extract_features writes
them (one group per image name relative to --images, dataset `global_descriptor`, float16 with
--half), for hloc's pairs_from_retrieval (`vpr_jax.localization.hloc`).
"""

from absl import app
from absl import flags

from vpr_jax.cli import common
from vpr_jax.localization import build
from vpr_jax.localization import faiss_index
from vpr_jax.localization import hloc

FLAGS = flags.FLAGS


def _define_flags():
  """Defines the flags; only when run as a program, as other entry points define the same names."""
  flags.DEFINE_string('checkpoint', None, 'Checkpoint folder, training workdir or its '
                      'checkpoints/ folder (the best checkpoint is used).')
  flags.DEFINE_string('images', None, 'Folder of database images (searched recursively).')
  flags.DEFINE_string('out', None, 'Index folder to create or update.')
  flags.DEFINE_bool('half', False, 'Store the descriptors as float16.')
  flags.DEFINE_string('faiss', faiss_index.DEFAULT_FAISS_FACTORY,
                      "FAISS index: 'flat' (exact), 'ivfpq' (IVF + product quantisation sized to "
                      "the database) or a FAISS factory string such as 'IVF4096,PQ64'.")
  flags.DEFINE_integer('nprobe', faiss_index.DEFAULT_NPROBE,
                       'Inverted lists searched per query (IVF indexes).')
  flags.DEFINE_string('coordinates', None, 'CSV of path,lat,lon (paths relative to --images); '
                      'takes precedence over names and EXIF GPS tags.')
  flags.DEFINE_bool('exif_transpose', True, 'Embed photos upright according to their EXIF '
                    'orientation (--no-exif-transpose: the stored pixels, as benchmarks).')
  flags.DEFINE_bool('fast_decode', False, 'Decode large JPEGs at a reduced DCT scale (faster, '
                    'no longer bit-identical to evaluation).')
  flags.DEFINE_integer('batch_size', None, 'Images per forward batch. Default: the checkpoint '
                       'config\'s data.eval_batch_size.')
  flags.DEFINE_integer('num_workers', 0, 'Image decoding worker processes (-1: one per core).')
  flags.DEFINE_integer('part_size', build.DEFAULT_PART_SIZE,
                       'Images embedded between two saves of the work done (resumable parts).')
  flags.DEFINE_string('hloc_features', None, 'Also write the database descriptors as hloc\'s '
                      'global features file (.h5) for hloc\'s pairs_from_retrieval.')
  flags.mark_flags_as_required(['checkpoint', 'images', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  common.report_user_errors(
      hloc.build_index_and_features, FLAGS.hloc_features, FLAGS.checkpoint, FLAGS.images,
      FLAGS.out, half=FLAGS.half, faiss_factory=FLAGS.faiss, coordinates=FLAGS.coordinates,
      exif_transpose=FLAGS.exif_transpose, fast_decode=FLAGS.fast_decode,
      batch_size=FLAGS.batch_size, num_workers=FLAGS.num_workers, part_size=FLAGS.part_size,
      nprobe=FLAGS.nprobe)


def run():
  """Console entry point: accepts dashed flag names, then runs `main` under absl."""
  _define_flags()
  common.run(main, interrupted='the parts embedded so far are saved; run the same command to '
             'resume.', sigterm_as_interrupt=True)


if __name__ == '__main__':
  run()
