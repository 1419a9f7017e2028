r"""Where was this photo taken? Finds the nearest images of a localisation index.

  python -m vpr_jax.localize --index city.index [--top-k 5] [--output out.json] [--sheet DIR] \
      PHOTO [PHOTO ...]

Prints, per photo, the top-k database images with their L2 descriptor distance and coordinates;
`--output` writes them as JSON:
`{"queries": [{"image": <photo as given>, "matches": [{"image": <database path>, "distance": ...,
"lat": ..., "lon": ..., "rank": ..., "file": ..., "utm_east": ..., "utm_north": ...,
"utm_zone": ..., "coordinate_source": ...}]}]}` (null where unknown); `--sheet DIR` writes one PNG
per photo (the photo beside its matches). The photos are embedded with the index's checkpoint and
settings (upright by EXIF orientation unless the index was built without it); an index built with
another model or preprocessing than `--checkpoint` is refused.

`--hloc-features Q.h5 --pairs PAIRS.txt` also writes the photos' descriptors as hloc's features
file and the `query database` pairs that hloc's pairs_from_retrieval chooses with the index's
database (`vpr_jax.index --hloc-features`): inner products, the `--top-k` best, self-matches and
negative scores left out. Query names are relative to `--hloc-image-dir` (default: the index's
images folder when every photo is in it, else the folder that holds them all).
"""

from absl import app
from absl import flags

from vpr_jax.cli import common
from vpr_jax import fileio
from vpr_jax.errors import ConfigError
from vpr_jax.localization import hloc
from vpr_jax.localization import hloc_io
from vpr_jax.localization import localizer as localizer_lib
from vpr_jax.localization import outputs

FLAGS = flags.FLAGS


def _define_flags():
  """Defines the flags; only when run as a program, as other entry points define the same names."""
  flags.DEFINE_string('index', None, 'Index folder written by python -m vpr_jax.index.')
  flags.DEFINE_string('checkpoint', None, 'Checkpoint to embed the photos with. Default: the one '
                      'the index was built with (its fingerprint must match either way).')
  flags.DEFINE_integer('top_k', 5, 'Database images per photo.', lower_bound=1)
  flags.DEFINE_string('output', None, 'Write the matches to this JSON file.')
  flags.DEFINE_string('sheet', None, 'Write a PNG per photo (photo + matches) into this folder.')
  flags.DEFINE_bool('fast_decode', None, 'Decode large JPEGs at a reduced DCT scale. Default: '
                    'as the index was built.')
  flags.DEFINE_bool('exif_transpose', None, 'Embed photos upright by their EXIF orientation. '
                    'Default: as the index was built.')
  flags.DEFINE_string('hloc_features', None, 'Also write the photos\' descriptors as hloc\'s '
                      'global features file (.h5); needs --pairs.')
  flags.DEFINE_string('pairs', None, 'Write the retrieval pairs (hloc\'s pairs_from_retrieval '
                      'rule, --top-k per photo) to this text file; needs --hloc-features.')
  flags.DEFINE_string('hloc_image_dir', None, 'Folder the hloc names of the photos are '
                      'relative to (default: the index\'s images folder, if it holds them all).')
  flags.mark_flags_as_required(['index'])


def check_hloc_outputs(hloc_features: str | None, pairs: str | None) -> None:
  """Both hloc outputs or neither, each writable, before any work."""
  if bool(hloc_features) != bool(pairs):
    raise ConfigError('--hloc-features and --pairs go together: hloc reads the pairs with the '
                      'queries\' descriptors.')
  if hloc_features:
    features = hloc_io.check_features_output(hloc_features, '--hloc-features')
    hloc_io.check_pairs_output(pairs, features, '--pairs')


def localize(index: str, photos, top_k: int, output: str | None, sheet: str | None,
             checkpoint: str | None = None, exif_transpose: bool | None = None,
             fast_decode: bool | None = None, hloc_features: str | None = None,
             pairs: str | None = None, hloc_image_dir: str | None = None
             ) -> list[localizer_lib.Localization]:
  """Localises photos, prints the matches and writes the requested files."""
  # Both outputs are checked before any photo is embedded (the work is lost otherwise).
  if output:
    fileio.check_output_path(output, '--output')
  check_hloc_outputs(hloc_features, pairs)
  if sheet:
    fileio.check_output_folder(sheet, '--sheet')
  localizer = localizer_lib.Localizer.from_index(index, checkpoint)
  if hloc_features:  # The photos' hloc names, checked before the work.
    hloc.query_names(photos, localizer.manifest['images_dir'], hloc_image_dir)
  descriptors = localizer.embed(photos, exif_transpose, fast_decode)
  results = localizer.localize_descriptors(photos, descriptors, top_k)
  for result in results:
    print(outputs.format_result(result))
  if output:
    fileio.atomic_write(output, outputs.results_json(results))
    print(f'Wrote {output}')
  if sheet:
    upright = (localizer.manifest['decode']['exif_transpose'] if exif_transpose is None
               else exif_transpose)
    for number, (photo, result) in enumerate(zip(photos, results)):
      outputs.write_sheet(result, photo, sheet, number, exif_transpose=upright)
    print(f'Wrote {len(results)} sheets to {sheet}')
  if hloc_features:
    found = hloc.write_query_features_and_pairs(
        localizer.index_dir, localizer.manifest, photos, descriptors, hloc_features, pairs, top_k,
        hloc_image_dir)
    print(f'Wrote the photos\' global descriptors for hloc to {hloc_features} and {len(found)} '
          f'pairs to {pairs}')
  return results


def main(argv):
  photos = argv[1:]
  if not photos:
    raise app.UsageError('Give at least one photo: python -m vpr_jax.localize --index INDEX '
                         'PHOTO [PHOTO ...]')
  common.report_user_errors(
      localize, FLAGS.index, photos, FLAGS.top_k, FLAGS.output, FLAGS.sheet,
      checkpoint=FLAGS.checkpoint, exif_transpose=FLAGS.exif_transpose,
      fast_decode=FLAGS.fast_decode, hloc_features=FLAGS.hloc_features, pairs=FLAGS.pairs,
      hloc_image_dir=FLAGS.hloc_image_dir)


def run():
  """Console entry point: accepts dashed flag names, then runs `main` under absl."""
  _define_flags()
  common.run(main)


if __name__ == '__main__':
  run()
