"""From `--dataset` / data.val_datasets entries to loaded sets: groups, prepared sets, the listing.

An entry is a registered name (`registry`), a group (`family`: the list-file test sets of the
gsv-cities family; `all_available`: every registered set present under the data root, the
others skipped with one line each), a split folder, or a built benchmark folder (the one
`python -m vpr_jax.prepare --benchmark` prints, holding dataset_info.json). A name that one of
the built benchmarks of `data.prepared_benchmarks` was built from is read from that build.

`describe_all` is the table of `python -m vpr_jax.datasets`: every registered name, the folder it
expects, whether it is present and its size.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

from vpr_jax.data import roots
from vpr_jax.data.evaluation import benchmarks
from vpr_jax.data.evaluation import list_files
from vpr_jax.data.evaluation import registry
from vpr_jax.data.tfds import benchmark_set
from vpr_jax.errors import BuiltDatasetError
from vpr_jax.errors import DatasetNotFoundError
from vpr_jax.errors import UserError


@dataclasses.dataclass
class Availability:
  """Whether a registered set is present under the data root.

  Attributes:
    name: the registered name.
    folder: the folder it expects (absolute when a data root is known).
    present: its folder, subfolders and list files are all there.
    detail: when present, its size ('N database + M queries'); else what is missing, one line.
  """
  name: str
  folder: str
  present: bool
  detail: str


def _count_images(folder: str) -> int:
  return len(benchmarks.list_images(folder, folder))


def check_available(spec: registry.BenchmarkSpec, data_root: str | None,
                    ground_truth_dir: str | None, count: bool = False) -> Availability:
  """Looks for a registered set without loading it (`count`: also count its images)."""
  try:
    root = roots.resolve_data_root(data_root)
  except DatasetNotFoundError:
    return Availability(spec.name, f'<data root>/{spec.folder}', False, 'no data root is set')
  folder = benchmarks.find_spec_folder(spec, root) or os.path.join(root, spec.folder)
  gt_dir = benchmarks.resolve_ground_truth_dir(ground_truth_dir, data_root)
  if not os.path.isdir(folder):
    looked = ''
    if spec.kind != registry.FOLDERS:
      looked = (f'; its lists {", ".join(spec.list_files())} are looked for there and in '
                f'{os.path.join(gt_dir, spec.list_dir)}')
    tried = ' nor '.join(os.path.join(root, f) for f in spec.folders())
    return Availability(spec.name, folder, False, f'{tried} does not exist{looked}')
  if spec.kind == registry.FOLDERS:
    missing = [sub for sub in (spec.database, spec.queries)
               if not os.path.isdir(os.path.join(folder, sub))]
    if missing:
      return Availability(spec.name, folder, False,
                          f'{folder} has no {" and no ".join(missing)} folder')
    detail = ''
    if count:
      detail = (f'{_count_images(os.path.join(folder, spec.database))} database + '
                f'{_count_images(os.path.join(folder, spec.queries))} queries')
    return Availability(spec.name, folder, True, detail)
  try:
    files = list_files.find_lists(spec, folder, gt_dir)
    detail = ''
    if count:
      database, queries, _ = list_files.read_family_lists(spec, files)
      detail = f'{len(database)} database + {len(queries)} queries (lists in ' \
               f'{os.path.dirname(files["dbImages"])})'
  except UserError as e:
    return Availability(spec.name, folder, False, str(e))
  return Availability(spec.name, folder, True, detail)


def describe_all(data_root: str | None, ground_truth_dir: str | None = None
                 ) -> list[Availability]:
  """Every registered set, present or not, with its size when present."""
  return [check_available(spec, data_root, ground_truth_dir, count=True)
          for spec in registry.REGISTRY.values()]


def expand_names(entries: Sequence[str], data_root: str | None,
                 ground_truth_dir: str | None = None,
                 print_fn: Callable[[str], None] = print) -> list[str]:
  """The entries with their groups expanded, each name once, in order.

  `all_available` takes every registered set that `check_available` finds and prints one line
  for each set it skips.

  Raises:
    DatasetNotFoundError: `all_available` found none.
  """
  expanded = []
  for entry in entries:
    if entry == registry.ALL_AVAILABLE:
      found = []
      for spec in registry.REGISTRY.values():
        availability = check_available(spec, data_root, ground_truth_dir)
        if availability.present:
          found.append(spec.name)
        else:
          print_fn(f'Skipping {spec.name}: {availability.detail}.')
      if not found:
        raise DatasetNotFoundError(
            f'{registry.ALL_AVAILABLE}: no registered benchmark is present under the data root '
            '(python -m vpr_jax.datasets says what each one expects).')
      expanded.extend(found)
    else:
      expanded.extend(registry.GROUPS.get(entry, (entry,)))
  return list(dict.fromkeys(expanded))


def prepared_by_name(prepared: Sequence[str], data_root: str | None) -> dict[str, str]:
  """{benchmark name: built folder} of the folders of data.prepared_benchmarks.

  Raises:
    BuiltDatasetError: a folder is not a built benchmark.
  """
  by_name = {}
  for entry in prepared:
    try:
      root = roots.resolve_data_root(data_root)
    except DatasetNotFoundError:
      root = None
    folder = os.path.abspath(roots.resolve_under(root, entry))
    if not benchmark_set.is_built_benchmark(folder):
      raise BuiltDatasetError(
          f'data.prepared_benchmarks: {folder!r} is not a built benchmark (no dataset_info.json '
          f'and {benchmark_set.BENCHMARK_FILE}); give the folder python -m vpr_jax.prepare '
          '--benchmark printed.')
    split, _ = benchmark_set.open_benchmark(folder)
    by_name[split.name] = folder
  return by_name


def _built_folder(entry: str, data_root: str | None) -> str | None:
  """The built benchmark folder an entry names (as given, or under the data root), or None."""
  candidates = [os.path.abspath(os.path.expanduser(entry))]
  try:
    candidates.append(os.path.abspath(roots.resolve_under(roots.resolve_data_root(data_root),
                                                          entry)))
  except DatasetNotFoundError:
    pass
  return next((c for c in candidates if benchmark_set.is_built_benchmark(c)), None)


def _open_built(folder: str, entry: str, radius_m: float) -> benchmarks.BenchmarkSet:
  split, _ = benchmark_set.open_benchmark(folder)
  if split.radius_m is not None and float(split.radius_m) != float(radius_m):
    raise BuiltDatasetError(
        f'benchmark {entry!r} in {folder!r} was built with positives within {split.radius_m:g} m, '
        f'but the positive radius is {radius_m:g} m (data.positive_radius_m); build it again '
        'with that radius or evaluate from the folder.')
  return split


def load_benchmarks(entries: Sequence[str], data_root: str | None, radius_m: float,
                    ground_truth_dir: str | None = None, prepared: Sequence[str] = (),
                    print_fn: Callable[[str], None] = print) -> list[benchmarks.BenchmarkSet]:
  """Every set the entries name (groups expanded), loaded and checked, in order.

  Args:
    entries: names, groups, split folders or built benchmark folders.
    data_root: the data root ('' or None: $VPR_DATA_ROOT).
    radius_m: positive radius (sets whose positives come from the file names).
    ground_truth_dir: the family's list files (see `benchmarks.load_benchmark`).
    prepared: built benchmark folders (data.prepared_benchmarks) read instead of the folders of
      the names they were built from.
    print_fn: where the lines of skipped sets go.

  Returns:
    One BenchmarkSet per set.
  """
  by_name = prepared_by_name(prepared, data_root)
  sets = []
  for name in expand_names(entries, data_root, ground_truth_dir, print_fn):
    built = None if registry.get(name) is not None else _built_folder(name, data_root)
    if name in by_name:
      sets.append(_open_built(by_name[name], name, radius_m))
    elif built is not None:
      sets.append(_open_built(built, name, radius_m))
    else:
      sets.append(benchmarks.load_benchmark(name, data_root, radius_m=radius_m,
                                            ground_truth_dir=ground_truth_dir))
  return sets


def _expects(spec: registry.BenchmarkSpec, folder: str) -> str:
  if spec.kind == registry.FOLDERS:
    return f'{folder}/{{{spec.database},{spec.queries}}}'
  return f'{folder} + {spec.prefix}_{{{",".join(spec.list_kinds())}}}.npy'


def list_datasets(data_root: str = '', ground_truth_dir: str | None = None,
                  print_fn: Callable[[str], None] = print) -> list[Availability]:
  """Prints (and returns) the availability of every registered benchmark.

  Raises:
    DatasetNotFoundError: `data_root` is given but is not a folder (one line, instead of every
      set listed as missing).
  """
  if data_root:
    roots.resolve_data_root(data_root)
  rows = describe_all(data_root, ground_truth_dir)
  width = max(len(name) for name in registry.names())
  for row in rows:
    spec = registry.REGISTRY[row.name]
    kind = 'folders' if spec.kind == registry.FOLDERS else 'lists'
    status = f'present: {row.detail}' if row.present else f'missing: {row.detail}'
    print_fn(f'{row.name:<{width}}  {kind:<7}  {_expects(spec, row.folder)}  {status}')
  for group, members in registry.GROUPS.items():
    print_fn(f'group {group}: {", ".join(members)}')
  print_fn(f'group {registry.ALL_AVAILABLE}: every set above that is present '
           f'({sum(r.present for r in rows)} of {len(rows)})')
  return rows
