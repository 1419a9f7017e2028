"""The benchmark sets known by name: where each one lives under the data root and how it is read.

Benchmarks are data here, not code: a set is one `BenchmarkSpec` in `REGISTRY`. Three kinds:

* `folders`: a split folder with a database folder and a query folder of `@UTM_east@UTM_north@...`
  names; positives are the database images within the radius (25 m). The VPR-datasets-downloader
  layout (deep-visual-geo-localization-benchmark, VPR-methods-evaluation, EigenPlaces, CosPlace:
  `<name>/images/test/{database,queries}`, SVOX's `gallery` + `queries_<condition>`, SF-XL's
  `queries_night` / `queries_occlusion`) and the SF-XS / Tokyo-XS releases of mldl24-vpr.
* `lists`: the gsv-cities family's list files (gsv-cities ships them in `datasets/`):
  `<prefix>_dbImages.npy`, `<prefix>_qImages.npy` (paths relative to the image folder) and
  `<prefix>_gt.npy` (per query, the database indices of its positives), looked for in the image
  folder, then in `<ground truth dir>/<list_dir>/` (the layout of gsv-cities' `datasets/`).
* `msls_lists`: MSLS val of that family: `msls_val_{dbImages,qImages,qIdx,pIdx}.npy`; the queries
  are `qImages[qIdx]`, their positives `pIdx`.

Names are lowercase and stable. Where a dataset exists in both conventions, the list one has the
family's name (`nordland`, `sped`, `msls_val`, `pitts30k_test`) and the downloader one another
(`nordland_vpr`, `sped_vpr`, `msls`, `pitts30k`).
"""

from __future__ import annotations

import dataclasses

FOLDERS = 'folders'
LISTS = 'lists'
MSLS_LISTS = 'msls_lists'
KINDS = (FOLDERS, LISTS, MSLS_LISTS)


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
  """One registered benchmark set.

  Attributes:
    name: the registered name.
    kind: FOLDERS, LISTS or MSLS_LISTS (module doc).
    folder: relative to the data root: the split folder (FOLDERS) or the image folder the listed
      paths are relative to (LISTS, MSLS_LISTS).
    database: FOLDERS: the database folder inside `folder`.
    queries: FOLDERS: the query folder inside `folder`.
    list_dir: LISTS: the folder of gsv-cities' `datasets/` holding the list files.
    prefix: LISTS: the list files' prefix.
    origin: who distributes the images (and, for lists, the list files), for the README and the
      listing; nothing is ever downloaded.
    also_at: other folders (relative to the data root) holding the same layout, used when
      `folder` does not exist (e.g. where the downloader's own scripts put the set).
  """
  name: str
  kind: str
  folder: str
  database: str = 'database'
  queries: str = 'queries'
  list_dir: str = ''
  prefix: str = ''
  origin: str = ''
  also_at: tuple[str, ...] = ()

  def folders(self) -> tuple[str, ...]:
    """`folder`, then the other places (`also_at`) where the set is found when `folder` is not."""
    return (self.folder,) + tuple(self.also_at)

  def list_kinds(self) -> tuple[str, ...]:
    """The list files a LISTS / MSLS_LISTS set reads (`<prefix>_<kind>.npy`)."""
    if self.kind == MSLS_LISTS:
      return ('dbImages', 'qImages', 'qIdx', 'pIdx')
    if self.kind == LISTS:
      return ('dbImages', 'qImages', 'gt')
    return ()

  def list_files(self) -> list[str]:
    return [f'{self.prefix}_{kind}.npy' for kind in self.list_kinds()]


_VPR_BENCH = 'images: VPR-Bench; lists: gsv-cities datasets/'
_DOWNLOADER = 'VPR-datasets-downloader'


def _lists(name, folder, list_dir, prefix, origin=_VPR_BENCH, kind=LISTS):
  return BenchmarkSpec(name, kind, folder, list_dir=list_dir, prefix=prefix, origin=origin)


def _downloader(name, folder=None, database='database', queries='queries', origin=_DOWNLOADER,
                also_at=()):
  return BenchmarkSpec(name, FOLDERS, folder or f'{name}/images/test', database, queries,
                       origin=origin, also_at=also_at)


_SPECS = [
    # The seed's sets (mldl24-vpr's SF-XS and Tokyo-XS releases) and the generated ones.
    BenchmarkSpec('sf_xs_val', FOLDERS, 'sf_xs/val', origin='mldl24-vpr (SF-XS)'),
    BenchmarkSpec('sf_xs_test', FOLDERS, 'sf_xs/test', origin='mldl24-vpr (SF-XS)'),
    BenchmarkSpec('tokyo_xs', FOLDERS, 'tokyo_xs/test', origin='mldl24-vpr (Tokyo-XS)'),
    BenchmarkSpec('synthetic_val', FOLDERS, 'synthetic_val', origin='vpr_jax (generated)'),
    BenchmarkSpec('synthetic_test', FOLDERS, 'synthetic_test', origin='vpr_jax (generated)'),
    # The gsv-cities family's list-file sets.
    _lists('pitts30k_val', 'pittsburgh', 'Pittsburgh', 'pitts30k_val',
           'images: Pittsburgh 250k (its authors); lists: gsv-cities datasets/'),
    _lists('pitts30k_test', 'pittsburgh', 'Pittsburgh', 'pitts30k_test',
           'images: Pittsburgh 250k (its authors); lists: gsv-cities datasets/'),
    _lists('pitts250k_test', 'pittsburgh', 'Pittsburgh', 'pitts250k_test',
           'images: Pittsburgh 250k (its authors); lists: gsv-cities datasets/'),
    _lists('msls_val', 'msls_val', 'msls_val', 'msls_val',
           'images: Mapillary SLS (Mapillary); lists: gsv-cities datasets/', kind=MSLS_LISTS),
    _lists('nordland', 'nordland', 'Nordland', 'Nordland'),
    _lists('sped', 'sped', 'SPED', 'SPED'),
    _lists('essex', 'essex', 'ESSEX', 'ESSEX'),
    _lists('crossseason', 'crossseason', 'CrossSeason', 'CrossSeason'),
    _lists('inria', 'inria_holidays', 'InriaHolidays', 'Inria'),
    # The VPR-datasets-downloader layout.
    _downloader('pitts30k'),
    _downloader('pitts250k'),
    # format_mapillary.py writes msls/val/ (and links msls/test to it).
    _downloader('msls', 'msls/images/val', also_at=('msls/val',)),
    _downloader('st_lucia'),
    _downloader('tokyo247'),
    # The downloader names these nordland/ and sped/, beside the list sets' ref/ and query/.
    _downloader('nordland_vpr', also_at=('nordland/images/test',)),
    _downloader('amstertime'),
    _downloader('eynsham'),
    _downloader('sped_vpr', also_at=('sped/images/test',)),
    _downloader('sf_xl_val', 'sf_xl/processed/val', origin='CosPlace (SF-XL)'),
    _downloader('sf_xl_night', 'sf_xl/processed/test', queries='queries_night',
                origin='EigenPlaces (SF-XL)'),
    _downloader('sf_xl_occlusion', 'sf_xl/processed/test', queries='queries_occlusion',
                origin='EigenPlaces (SF-XL)'),
] + [
    _downloader(f'svox_{condition}', 'svox/images/test', database='gallery',
                queries=f'queries_{condition}')
    for condition in ('night', 'overcast', 'rain', 'snow', 'sun')
]

REGISTRY: dict[str, BenchmarkSpec] = {spec.name: spec for spec in _SPECS}

# Names that stand for several sets (`--dataset family`, data.val_datasets).
ALL_AVAILABLE = 'all_available'
GROUPS: dict[str, tuple[str, ...]] = {
    # The list-file test sets the gsv-cities family reports (pitts30k_val is its validation set).
    'family': ('pitts30k_test', 'pitts250k_test', 'msls_val', 'nordland', 'sped', 'essex',
               'crossseason', 'inria'),
}


def get(name: str) -> BenchmarkSpec | None:
  """The spec registered as `name`, or None."""
  return REGISTRY.get(name)


def names() -> list[str]:
  """Every registered name, in registry order."""
  return list(REGISTRY)


def group_names() -> list[str]:
  """The names that stand for several sets."""
  return list(GROUPS) + [ALL_AVAILABLE]
