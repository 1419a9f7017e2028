"""Where was this photo taken? A persistent index of geotagged photos, and localisation against it.

One module per stage, each with one entry point:

  build.py        `build_index`: a folder of photos -> an index folder (incremental, resumable)
  localizer.py    `Localizer.from_index(folder).localize(photos)` -> `Localization`s of `Match`es
  outputs.py      `results_json`, `format_result`, `write_sheet`: what `localize` prints and writes

and the helpers they share:

  embedding.py    the checkpoint behind an index: loading it, its fingerprint, L2-normalised
                  descriptors computed exactly as evaluation computes them
  coordinates.py  where a database photo was taken: benchmark-style names, EXIF GPS, a CSV
  faiss_index.py  FAISS factories ('flat', 'ivfpq'), training, nprobe, index files
  store.py        the index folder (its layout is documented there): manifest, generations,
                  pending parts, commit, clean-up
"""
