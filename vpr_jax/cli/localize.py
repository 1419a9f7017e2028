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
"""

from absl import app
from absl import flags

from vpr_jax.cli import common
from vpr_jax import fileio
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
  flags.mark_flags_as_required(['index'])


def localize(index: str, photos, top_k: int, output: str | None, sheet: str | None,
             checkpoint: str | None = None, exif_transpose: bool | None = None,
             fast_decode: bool | None = None) -> list[localizer_lib.Localization]:
  """Localises photos, prints the matches and writes the requested files."""
  # Both outputs are checked before any photo is embedded (the work is lost otherwise).
  if output:
    fileio.check_output_path(output, '--output')
  if sheet:
    fileio.check_output_folder(sheet, '--sheet')
  localizer = localizer_lib.Localizer.from_index(index, checkpoint)
  results = localizer.localize(photos, top_k, exif_transpose=exif_transpose,
                               fast_decode=fast_decode)
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
  return results


def main(argv):
  photos = argv[1:]
  if not photos:
    raise app.UsageError('Give at least one photo: python -m vpr_jax.localize --index INDEX '
                         'PHOTO [PHOTO ...]')
  common.report_user_errors(
      localize, FLAGS.index, photos, FLAGS.top_k, FLAGS.output, FLAGS.sheet,
      checkpoint=FLAGS.checkpoint, exif_transpose=FLAGS.exif_transpose,
      fast_decode=FLAGS.fast_decode)


def run():
  """Console entry point: accepts dashed flag names, then runs `main` under absl."""
  _define_flags()
  common.run(main)


if __name__ == '__main__':
  run()
