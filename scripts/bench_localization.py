"""Localisation at scale: FAISS index build time, memory, query latency and R@1 vs exact search.

Synthetic descriptors with the structure of a place-recognition database: `--centers` random
"places" (unit Gaussian directions), every database vector a place plus Gaussian spread
(`--spread` per dimension relative to the place's), L2-normalised. Queries are database vectors
plus noise (`--noise`), normalised: near duplicates, so that the exact nearest neighbour is a
meaningful target. R@1 (R@10) of an approximate index = share of queries whose exact nearest
database vector is its top-1 (within its top-10).

Vectors are generated chunk by chunk from per-chunk seeds, so a 10M database never exists whole in
memory: every chunk is added to the index under test and searched exactly (brute force,
`faiss.knn`) for the queries, whose sources are drawn from the first chunk; the running best of
the exact searches is the ground truth. The flat (exact) index is built only for sizes up to
`--max_flat` (1M x 256-d float32 = 1 GiB).

Indexes are built with `vpr_jax.localization.faiss_index` (`train_faiss_index`, `add_in_chunks`,
`set_nprobe`), what `python -m vpr_jax.index --faiss FACTORY` runs.

  python scripts/bench_localization.py                       # 1M and 10M, 256-d (~10 min, 2 cores)
  python scripts/bench_localization.py --sizes 100000 --factories 100000=IVF256,PQ32  # smoke

Prints a table and writes the figures to --output (JSON).
"""

import argparse
import os
import platform
import resource
import sys
import time

_SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_SCRIPTS))
sys.path.insert(0, _SCRIPTS)

# pylint: disable=g-import-not-at-top,wrong-import-position
import bench_common
import faiss
import numpy as np
import psutil

from vpr_jax.localization import faiss_index



def normalise(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_centers(num: int, dim: int, seed: int) -> np.ndarray:
  return np.random.default_rng([seed, 0]).standard_normal((num, dim), dtype=np.float32)


def make_chunk(chunk: int, size: int, centers: np.ndarray, spread: float, seed: int
               ) -> np.ndarray:
  """Database rows of chunk `chunk` (`size` of them): place + spread, normalised."""
  rng = np.random.default_rng([seed, 1, chunk])
  places = rng.integers(0, len(centers), size)
  x = rng.standard_normal((size, centers.shape[1]), dtype=np.float32)
  x *= spread
  x += centers[places]
  return normalise(x)


def rss_bytes() -> int:
  return psutil.Process().memory_info().rss


def time_queries(index, queries: np.ndarray, k: int, singles: int) -> dict:
  """Batch latency (all queries in one call) and single-query latency (one call per query)."""
  index.search(queries[:4], k)  # Warm-up.
  start = time.perf_counter()
  distances, rows = index.search(queries, k)
  batch = time.perf_counter() - start
  times = []
  for q in queries[:singles]:
    start = time.perf_counter()
    index.search(q[None], k)
    times.append(time.perf_counter() - start)
  return {'rows': rows, 'distances': distances, 'batch_s': batch,
          'batch_ms_per_query': 1e3 * batch / len(queries),
          'single_ms_median': 1e3 * float(np.median(times)),
          'single_ms_p90': 1e3 * float(np.percentile(times, 90))}


def run_size(num: int, args, factory: str) -> list[dict]:
  """Builds the indexes of one database size and measures them."""
  dim, k, chunk_size = args.dim, 10, args.chunk
  centers = make_centers(args.centers, dim, args.seed)
  num_chunks = -(-num // chunk_size)
  first = make_chunk(0, min(chunk_size, num), centers, args.spread, args.seed)
  rng = np.random.default_rng([args.seed, 2])
  sources = rng.choice(len(first), args.queries, replace=False)
  queries = normalise(first[sources] + args.noise * rng.standard_normal(
      (args.queries, dim), dtype=np.float32) / np.sqrt(dim))
  queries = np.ascontiguousarray(queries, np.float32)

  # Training the approximate index on a sample of the first chunk (iid with the rest).
  rss_before = rss_bytes()
  start = time.perf_counter()
  sample = first[rng.choice(len(first), min(args.train_size, len(first)), replace=False)]
  approx = faiss_index.train_faiss_index(factory, dim, sample)
  train_s = time.perf_counter() - start
  flat = faiss.IndexFlatL2(dim) if num <= args.max_flat else None

  best_d = np.full((args.queries, k), np.inf, np.float32)
  best_i = np.full((args.queries, k), -1, np.int64)
  add_s = flat_add_s = exact_s = generate_s = 0.0
  for chunk in range(num_chunks):
    size = min(chunk_size, num - chunk * chunk_size)
    start = time.perf_counter()
    x = first if chunk == 0 else make_chunk(chunk, size, centers, args.spread, args.seed)
    generate_s += time.perf_counter() - start
    start = time.perf_counter()
    faiss_index.add_in_chunks(approx, x)
    add_s += time.perf_counter() - start
    if flat is not None:
      start = time.perf_counter()
      flat.add(x)
      flat_add_s += time.perf_counter() - start
    # Exact ground truth, chunk by chunk (brute force), merged with the running best.
    start = time.perf_counter()
    d, i = faiss.knn(queries, x, k)
    exact_s += time.perf_counter() - start
    d, i = np.concatenate([best_d, d], 1), np.concatenate([best_i, i + chunk * chunk_size], 1)
    order = np.argsort(d, axis=1, kind='stable')[:, :k]
    best_d, best_i = np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
    del x
    print(f'  {num:,}: chunk {chunk + 1}/{num_chunks} added', flush=True)
  del first
  truth = best_i[:, 0]

  results = []
  faiss_index.set_nprobe(approx, args.nprobe)
  measured = time_queries(approx, queries, k, args.singles)
  approx_bytes = int(faiss.serialize_index(approx).nbytes)
  results.append({
      'database': num, 'dim': dim, 'index': factory, 'nprobe': args.nprobe,
      'train_s': train_s, 'add_s': add_s, 'build_s': train_s + add_s,
      'index_bytes': approx_bytes, 'rss_bytes_after': rss_bytes(),
      'rss_growth_bytes': rss_bytes() - rss_before,
      'batch_ms_per_query': measured['batch_ms_per_query'], 'batch_s': measured['batch_s'],
      'single_ms_median': measured['single_ms_median'],
      'single_ms_p90': measured['single_ms_p90'],
      'r1_vs_exact': float(np.mean(measured['rows'][:, 0] == truth)),
      'r10_vs_exact': float(np.mean((measured['rows'] == truth[:, None]).any(axis=1))),
      'exact_top1_is_source': float(np.mean(truth == sources)),
      'exact_chunked_batch_ms_per_query': 1e3 * exact_s / args.queries,
      'generate_s': generate_s})
  del approx
  if flat is not None:
    measured = time_queries(flat, queries, k, args.singles)
    results.append({
        'database': num, 'dim': dim, 'index': 'Flat', 'nprobe': None,
        'train_s': 0.0, 'add_s': flat_add_s, 'build_s': flat_add_s,
        'index_bytes': int(flat.ntotal) * dim * 4, 'rss_bytes_after': rss_bytes(),
        'rss_growth_bytes': None,
        'batch_ms_per_query': measured['batch_ms_per_query'], 'batch_s': measured['batch_s'],
        'single_ms_median': measured['single_ms_median'],
        'single_ms_p90': measured['single_ms_p90'],
        'r1_vs_exact': float(np.mean(measured['rows'][:, 0] == truth)),
        'r10_vs_exact': float(np.mean((measured['rows'] == truth[:, None]).any(axis=1))),
        'exact_top1_is_source': float(np.mean(truth == sources))})
    del flat
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--sizes', default='1000000,10000000',
                      help='database sizes, comma-separated')
  parser.add_argument('--dim', type=int, default=256)
  parser.add_argument('--factories', default='1000000=IVF1024,PQ32;10000000=IVF1024,PQ32',
                      help="'size=FACTORY;size=FACTORY' (';'-separated; FACTORY may hold commas)")
  parser.add_argument('--default_factory', default='IVF1024,PQ32')
  parser.add_argument('--nprobe', type=int, default=faiss_index.DEFAULT_NPROBE)
  parser.add_argument('--queries', type=int, default=300)
  parser.add_argument('--singles', type=int, default=100,
                      help='queries timed one call at a time')
  parser.add_argument('--centers', type=int, default=65536, help='synthetic places')
  parser.add_argument('--spread', type=float, default=0.5)
  parser.add_argument('--noise', type=float, default=0.3,
                      help='query noise norm relative to a unit vector')
  parser.add_argument('--train_size', type=int, default=65536)
  parser.add_argument('--max_flat', type=int, default=1_000_000)
  parser.add_argument('--threads', type=int, default=0, help='FAISS threads (0: default)')
  parser.add_argument('--chunk', type=int, default=1_000_000,
                      help='vectors generated and added at a time')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--output', default='bench_localization.json')
  args = parser.parse_args(argv)
  if args.threads:
    faiss.omp_set_num_threads(args.threads)
  factories = dict(item.split('=', 1) for item in args.factories.split(';') if item)
  results = []
  start = time.perf_counter()
  for size in (int(s) for s in args.sizes.split(',')):
    factory = factories.get(str(size), args.default_factory)
    print(f'{size:,} x {args.dim}-d: {factory} (nprobe {args.nprobe})'
          f'{" and Flat" if size <= args.max_flat else ""}', flush=True)
    results.extend(run_size(size, args, factory))
  total_s = time.perf_counter() - start

  gib = lambda b: 'n/a' if b is None else f'{b / 2**30:.2f}'
  print(bench_common.format_table(
      ('database', 'index', 'build s', 'index GiB', 'RSS GiB', 'batch ms/q', 'single ms',
       'R@1 vs exact', 'R@10'),
      [(f'{r["database"]:,}', r['index'], f'{r["build_s"]:.1f}', gib(r['index_bytes']),
        gib(r['rss_bytes_after']), f'{r["batch_ms_per_query"]:.3f}',
        f'{r["single_ms_median"]:.2f}', f'{100 * r["r1_vs_exact"]:.1f}',
        f'{100 * r["r10_vs_exact"]:.1f}') for r in results]))
  print(f'total {total_s:.0f} s; peak RSS '
        f'{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB')
  bench_common.write_json(args.output, {
      'args': vars(args), 'results': results, 'total_s': total_s,
      'peak_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      'machine': {'platform': platform.platform(), 'cpus': os.cpu_count(),
                  'faiss': faiss.__version__, 'faiss_threads': faiss.omp_get_max_threads(),
                  'numpy': np.__version__},
      'date': time.strftime('%Y-%m-%d %H:%M:%S %Z')})
  return results


if __name__ == '__main__':
  main()
