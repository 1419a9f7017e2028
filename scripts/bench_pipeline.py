"""Images per second of the training input pipeline (JPEG -> uint8 batches), by source/decoder.

Reads a training folder (--train-dir) or, by default, a small synthetic GSV-Cities set it writes
to a temporary folder (optionally made of real photos, --photos), and times
`train_pipeline.make_train_iterator` for each (source, decoder, worker count): decode + resize +
RandAugment (or not, --augment) + batching, as in training (no accelerator involved).

Sources: 'original' reads the JPEG files; 'prepared' first builds them at --image-size into a
TFDS dataset (`training_set.build_training_set`, in a temporary folder) and reads its records.
Decoders (`config.data.decode`): 'pil' (Pillow only), 'turbo' (libjpeg-turbo, the same pixels)
and 'turbo_dct' (DCT-scaled decode + exact resize). Next to the pipeline, the raw decode (+ the
exact resize, when the stored size is not --image-size) of the same encoded images, already in
memory, is timed in this process: `efficiency` is the pipeline's img/s per worker over it.

Runs are interleaved: each of --repeats rounds times every combination once, and the reported
figure is the median over the rounds (robust to other jobs on a shared machine).

  python scripts/bench_pipeline.py                                   # tiny smoke run
  python scripts/bench_pipeline.py --source prepared,original --decoders pil,turbo \
      --workers 1 --augment none --source-size 480,640 --photos ../shared/data/real \
      --synthetic-places 30 --num-batches 20 --repeats 5 --output bench.json
  python scripts/bench_pipeline.py --train-dir /data/gsv_cities --layout gsv_cities \
      --cities London,Boston --places-per-batch 100 --workers 16 --num-batches 30

The first batch of each run (worker start-up) and --warmup-batches more are not timed.
"""

import argparse
import glob
import multiprocessing
import math
import os
import platform
import statistics
import sys
import tempfile
import time

from absl import flags
import numpy as np
from PIL import Image

_SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_SCRIPTS))
sys.path.insert(0, _SCRIPTS)

# pylint: disable=g-import-not-at-top,wrong-import-position
import bench_common
from vpr_jax.configs import default
from vpr_jax.data.imaging import decode
from vpr_jax.data.training import gsv_cities
from vpr_jax.data.imaging import images
from vpr_jax.data import synthetic
from vpr_jax.data.tfds import records
from vpr_jax.data.tfds import training_set
from vpr_jax.data.training import train_pipeline
# pylint: enable=g-import-not-at-top,wrong-import-position


def _workers(text):
  try:
    values = [int(v) for v in text.split(',') if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected comma-separated integers, got {text!r}') from None
  if not values or min(values) < -1:
    raise argparse.ArgumentTypeError(f'worker counts must be >= 0 (or -1), got {text!r}')
  return values


SOURCES = ('original', 'prepared')
# Benchmark batch-memory name -> config.data.reuse_batch_memory (how worker batches travel).
BATCH_MEMORY = {'reuse': True, 'new': False}
# Benchmark decoder name -> config.data.decode.
DECODERS = {'pil': 'pil', 'turbo': 'exact', 'turbo_dct': 'dct_scaled'}


def _choices(allowed):
  def parse(text):
    values = [v.strip() for v in text.split(',') if v.strip()]
    unknown = [v for v in values if v not in allowed]
    if not values or unknown:
      raise argparse.ArgumentTypeError(f'expected a comma-separated subset of {list(allowed)}, '
                                       f'got {text!r}')
    return values
  return parse


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--train-dir', default='',
                      help='training folder; empty: write a synthetic GSV-Cities set to a temp dir')
  parser.add_argument('--layout', default='gsv_cities', choices=gsv_cities.LAYOUTS)
  parser.add_argument('--cities', default='',
                      help='comma-separated cities; empty: every city in --train-dir')
  parser.add_argument('--workers', type=_workers, default=[0, 1, 2],
                      help='comma-separated grain worker counts to time (-1: one per core)')
  parser.add_argument('--num-batches', type=int, default=3, help='timed batches per run')
  parser.add_argument('--warmup-batches', type=int, default=1,
                      help='untimed batches after the first one')
  parser.add_argument('--places-per-batch', type=int, default=8)
  parser.add_argument('--images-per-place', type=int, default=4)
  parser.add_argument('--image-size', type=bench_common.parse_hw, default=(224, 224),
                      help='H,W fed to the model')
  parser.add_argument('--augment', default='randaugment', choices=('randaugment', 'none'))
  parser.add_argument('--prefetch', type=int, default=2, help='batches prefetched per worker')
  parser.add_argument('--synthetic-places', type=int, default=16,
                      help='places of the synthetic set')
  parser.add_argument('--source-size', type=bench_common.parse_hw, default=(240, 320),
                      help='H,W of the synthetic JPEGs (GSV-Cities images are 480,640)')
  parser.add_argument('--photos', default='',
                      help='folder of real JPEGs (searched recursively): the synthetic set\'s '
                      'images are replaced by them (cycled), resized to --source-size')
  parser.add_argument('--source', type=_choices(SOURCES), default=['original'],
                      help='comma-separated: original (the JPEG files), prepared (a TFDS dataset '
                      'built at --image-size)')
  parser.add_argument('--decoders', type=_choices(DECODERS), default=['turbo'],
                      help=f'comma-separated subset of {list(DECODERS)}')
  parser.add_argument('--batch-memory', type=_choices(BATCH_MEMORY), default=['reuse'],
                      help='comma-separated: reuse (workers decode into reused shared-memory '
                      'batch slots) and/or new (grain sends each batch through a new segment, '
                      'the transport before batch slots); only matters with workers')
  parser.add_argument('--prepared-quality', type=int, default=images.DEFAULT_QUALITY,
                      help='JPEG quality of the prepared records')
  parser.add_argument('--repeats', type=int, default=1,
                      help='interleaved rounds; figures are medians over them')
  parser.add_argument('--raw-images', type=int, default=200,
                      help='images timed for the raw decode (at most the whole set)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--output', default='', help='also write the results to this JSON file')
  args = parser.parse_args(argv)
  if args.num_batches <= 0 or args.warmup_batches < 0:
    parser.error('--num-batches must be positive and --warmup-batches >= 0')
  if args.repeats <= 0 or args.raw_images <= 0:
    parser.error('--repeats and --raw-images must be positive')
  return args


def cpu_seconds():
  """CPU seconds used so far by this process and its live multiprocessing children (Linux).

  On a machine shared with other jobs, images per CPU second measure the work per image; wall
  time also measures how much of the cores the other jobs left.
  """
  total = time.process_time()
  ticks = os.sysconf('SC_CLK_TCK')
  for child in multiprocessing.active_children():
    try:
      with open(f'/proc/{child.pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    except OSError:
      continue
    # utime and stime: fields 14 and 15 of proc(5), counted from the state field (3).
    total += (int(fields[11]) + int(fields[12])) / ticks
  return total


def time_pipeline(index, config, num_workers, num_batches, warmup_batches, seed=0, source=None):
  """Runs one iterator; returns its start-up time, timed images per second and per CPU second."""
  images_per_batch = config.data.places_per_batch * config.data.images_per_place
  start = time.perf_counter()
  with train_pipeline.make_train_iterator(index, config, seed, num_workers=num_workers,
                                          prepared=source) as it:
    next(it)
    startup = time.perf_counter() - start
    for _ in range(warmup_batches):
      next(it)
    cpu_start, start = cpu_seconds(), time.perf_counter()
    for _ in range(num_batches):
      next(it)
    seconds = time.perf_counter() - start
    cpu = cpu_seconds() - cpu_start
  images = num_batches * images_per_batch
  return {
      'workers': it.num_workers,
      'startup_seconds': round(startup, 3),
      'seconds': round(seconds, 3),
      'cpu_seconds': round(cpu, 3),
      'batches': num_batches,
      'images': images,
      'images_per_second': round(images / seconds, 1),
      'images_per_cpu_second': round(images / cpu, 1) if cpu > 0 else None,
  }


def time_raw_decode(encoded, image_size, decode_mode):
  """Images per second of decode (+ exact resize to image_size) of in-memory encoded images."""
  min_size, decoder = train_pipeline.decode_settings(_decode_config(image_size, decode_mode))
  start, cpu_start = time.perf_counter(), time.process_time()
  for data in encoded:
    images.resize_array(decode.decode_rgb(data, 'bench', min_size, decoder), image_size)
  return (len(encoded) / (time.perf_counter() - start),
          len(encoded) / (time.process_time() - cpu_start))


def _decode_config(image_size, decode_mode):
  config = default.get_config()
  config.image_size = tuple(image_size)
  config.data.decode = decode_mode
  return config


def replace_with_photos(index, photos_dir, source_size, quality=90):
  """Overwrites the images of `index` with real photos (cycled) resized to source_size (H, W)."""
  photos = sorted(glob.glob(os.path.join(photos_dir, '**', '*.jp*g'), recursive=True))
  if not photos:
    raise SystemExit(f'--photos {photos_dir!r}: no JPEG files found.')
  for i in range(index.num_images):
    with Image.open(photos[i % len(photos)]) as img:
      img = img.convert('RGB').resize((source_size[1], source_size[0]), Image.BILINEAR)
      img.save(index.image_path(i), format='JPEG', quality=quality)
  return len(photos)


def _median_record(records):
  record = dict(records[0])
  rates = [r['images_per_second'] for r in records]
  record['images_per_second'] = round(statistics.median(rates), 1)
  record['images_per_sec'] = record['images_per_second']
  record['startup_seconds'] = round(statistics.median(r['startup_seconds'] for r in records), 3)
  record['seconds'] = round(statistics.median(r['seconds'] for r in records), 3)
  record['repeats'] = len(records)
  record['all_images_per_second'] = rates
  return record


def _pipeline_config(args, index, cities):
  """The default config set to the benchmark's batch, augmentation and epoch count."""
  config = default.get_config()
  config.image_size = args.image_size
  data = config.data
  data.cities = tuple(cities)
  data.places_per_batch = args.places_per_batch
  data.images_per_place = args.images_per_place
  data.min_img_per_place = args.images_per_place
  data.augment = args.augment
  data.prefetch_buffer_size = args.prefetch
  steps = train_pipeline.steps_per_epoch(index, config)
  config.num_epochs = math.ceil((1 + args.warmup_batches + args.num_batches) / steps)
  return config


def _prepare_sources(args, train_dir, work_dir, index, cities, raw_count):
  """({source name: (index, record source or None)}, {source name: encoded images})."""
  sources, encoded = {}, {}
  for name in args.source:
    if name == 'original':
      sources[name] = (index, None)
      encoded[name] = [decode.read_file(index.image_path(i)) for i in range(raw_count)]
      continue
    data_dir = os.path.join(work_dir or tempfile.mkdtemp(prefix='vpr_jax_bench_'), 'tfds')
    start = time.perf_counter()
    folder = training_set.build_training_set(
        train_dir, data_dir, layout=args.layout, cities=cities,
        min_img_per_place=args.images_per_place,
        encoding=records.ImageEncoding(tuple(args.image_size), quality=args.prepared_quality))
    print(f'Prepared {index.num_images} images at {args.image_size[0]}x{args.image_size[1]} '
          f'(quality {args.prepared_quality}) in {time.perf_counter() - start:.1f} s.')
    prepared_index, source = training_set.open_training_set(folder)
    if not np.array_equal(prepared_index.image_paths, index.image_paths):
      raise SystemExit('The prepared index lists other images than the source index.')
    sources[name] = (prepared_index, source)
    encoded[name] = [source[i] for i in range(raw_count)]
  return sources, encoded


def _time_rounds(args, config, sources, encoded, combos):
  """Times every combo and raw decode once per round; ({combo: results}, {(source, dec): rates})."""
  timed = {c: [] for c in combos}
  raw = {(s, d): [] for s in args.source for d in args.decoders}
  for round_number in range(args.repeats):
    for (name, decoder) in raw:
      raw[(name, decoder)].append(
          time_raw_decode(encoded[name], args.image_size, DECODERS[decoder]))
    for combo in combos:
      name, decoder, workers, memory = combo
      config.data.decode = DECODERS[decoder]
      config.data.reuse_batch_memory = BATCH_MEMORY[memory]
      result = time_pipeline(*sources[name][:1], config, workers, args.num_batches,
                             args.warmup_batches, args.seed, sources[name][1])
      result.update(source=name, decoder=decoder,
                    batch_memory=memory if result['workers'] else None)
      timed[combo].append(result)
      print(f'round {round_number + 1}/{args.repeats} {name:>8} {decoder:>9} '
            f'workers {result["workers"]:>3} {memory if workers else "":>5}: '
            f'{result["images_per_second"]:10.1f} img/s, '
            f'{result["images_per_cpu_second"] or 0:10.1f} img/CPU-s '
            f'(start-up {result["startup_seconds"]:.1f} s)', flush=True)
  return timed, raw


def _raw_records(args, raw, raw_count):
  """One record per (source, decoder) of the raw decode rates: medians, all rounds, vs PIL."""
  raw_records = []
  for (name, decoder), rates in raw.items():
    wall = [r[0] for r in rates]
    cpu = [r[1] for r in rates]
    record = {'source': name, 'decoder': decoder, 'images': raw_count,
              'images_per_sec': round(statistics.median(wall), 1),
              'images_per_cpu_sec': round(statistics.median(cpu), 1),
              'all_images_per_sec': [round(r, 1) for r in wall],
              'all_images_per_cpu_sec': [round(r, 1) for r in cpu]}
    if 'pil' in args.decoders:
      ratios = [r[0] / b[0] for r, b in zip(rates, raw[(name, 'pil')])]
      record['speedup_vs_pil'] = round(statistics.median(ratios), 3)
      record['cpu_speedup_vs_pil'] = round(statistics.median(
          [r[1] / b[1] for r, b in zip(rates, raw[(name, 'pil')])]), 3)
    raw_records.append(record)
  return raw_records


def _median_ratio(runs, baseline, key):
  """Median over rounds of runs[i][key] / baseline[i][key] (runs of one round under one load)."""
  return round(statistics.median([r[key] / b[key] for r, b in zip(runs, baseline)]), 3)


def _add_pil_speedups(record, combo, timed):
  """Adds the speed-ups of a combo over PIL (same round) and over PIL with new segments."""
  # Ratios within a round compare runs made seconds apart, under the same load.
  baseline = timed[(combo[0], 'pil', *combo[2:])]
  ratios = [r['images_per_second'] / b['images_per_second']
            for r, b in zip(timed[combo], baseline)]
  record['speedup_vs_pil'] = round(statistics.median(ratios), 3)
  record['all_speedups_vs_pil'] = [round(r, 3) for r in ratios]
  if record['images_per_cpu_sec']:
    record['cpu_speedup_vs_pil'] = _median_ratio(timed[combo], baseline, 'images_per_cpu_second')
  before = (combo[0], 'pil', combo[2], 'new')
  if combo[2] and before in timed:
    # Against the path before batch slots and libjpeg-turbo: Pillow, a new segment per batch.
    record['speedup_vs_pil_new_memory'] = _median_ratio(timed[combo], timed[before],
                                                        'images_per_second')
    record['cpu_speedup_vs_pil_new_memory'] = _median_ratio(timed[combo], timed[before],
                                                            'images_per_cpu_second')


def _combo_records(args, combos, timed, raw_records):
  """One record per timed combo: medians, efficiencies against the raw decode, speed-ups."""
  raw_rate = {(r['source'], r['decoder']): r for r in raw_records}
  results = []
  for combo in combos:
    record = _median_record(timed[combo])
    cpu_rates = [r['images_per_cpu_second'] for r in timed[combo] if r['images_per_cpu_second']]
    record['images_per_cpu_sec'] = round(statistics.median(cpu_rates), 1) if cpu_rates else None
    record['all_images_per_cpu_sec'] = cpu_rates
    per_worker = record['images_per_sec'] / max(record['workers'], 1)
    record['efficiency'] = round(per_worker / raw_rate[combo[:2]]['images_per_sec'], 3)
    if record['images_per_cpu_sec']:
      # Work per image of the raw decode over that of the whole pipeline (all its processes).
      record['cpu_efficiency'] = round(
          record['images_per_cpu_sec'] / raw_rate[combo[:2]]['images_per_cpu_sec'], 3)
    if 'pil' in args.decoders:
      _add_pil_speedups(record, combo, timed)
    results.append(record)
  return results


def run(args, train_dir, work_dir=None):
  """Indexes `train_dir` and times every (source, decoder, workers); returns the JSON report."""
  cities = ([c for c in args.cities.split(',') if c] if args.cities
            else gsv_cities.available_cities(train_dir, args.layout))
  index = gsv_cities.build_place_index(train_dir, args.layout, cities, args.images_per_place)
  config = _pipeline_config(args, index, cities)
  print(gsv_cities.format_stats(index, args.places_per_batch, args.images_per_place))
  print()
  raw_count = min(args.raw_images, index.num_images)
  sources, encoded = _prepare_sources(args, train_dir, work_dir, index, cities, raw_count)
  # Decoders innermost: the runs compared with each other follow one another in every round.
  # The batch memory only matters with workers.
  combos = [(s, d, w, m) for s in args.source for w in args.workers
            for m in (args.batch_memory if w else args.batch_memory[:1]) for d in args.decoders]
  timed, raw = _time_rounds(args, config, sources, encoded, combos)
  raw_records = _raw_records(args, raw, raw_count)
  return {
      'train_dir': train_dir,
      'layout': args.layout,
      'synthetic': not args.train_dir,
      'photos': args.photos or None,
      'source_size': list(args.source_size) if not args.train_dir else None,
      'num_places': index.num_places,
      'num_images': index.num_images,
      'image_size': list(args.image_size),
      'places_per_batch': args.places_per_batch,
      'images_per_place': args.images_per_place,
      'augment': args.augment,
      'num_batches': args.num_batches,
      'repeats': args.repeats,
      'prepared_quality': args.prepared_quality,
      'cpu_count': os.cpu_count(),
      'platform': platform.platform(),
      'date': time.strftime('%Y-%m-%d', time.gmtime()),
      'results': _combo_records(args, combos, timed, raw_records),
      'raw_decode': raw_records,
  }


def _cell(record, key, width, digits):
  """A right-aligned number of a table row, blank when the record lacks it."""
  value = record.get(key)
  return f'{value:>{width}.{digits}f}' if value is not None else ' ' * width


def format_table(report):
  """The report's combos as a text table (one row per source, decoder, workers, batch memory)."""
  lines = [f'{"source":>8} | {"decoder":>9} | {"workers":>7} | {"batches":>7} | {"img/s":>8} | '
           f'{"vs pil":>6} | '
           f'{"img/CPU-s":>9} | {"vs pil":>6} | {"raw img/CPU-s":>13} | {"CPU effic.":>10} | '
           f'{"start-up s":>10}', '-' * 125]
  raw = {(r['source'], r['decoder']): r for r in report['raw_decode']}
  for r in report['results']:
    lines.append(f'{r["source"]:>8} | {r["decoder"]:>9} | {r["workers"]:>7} | '
                 f'{r.get("batch_memory") or "":>7} | '
                 f'{_cell(r, "images_per_second", 8, 1)} | {_cell(r, "speedup_vs_pil", 6, 2)} | '
                 f'{_cell(r, "images_per_cpu_sec", 9, 1)} | '
                 f'{_cell(r, "cpu_speedup_vs_pil", 6, 2)} | '
                 f'{raw[(r["source"], r["decoder"])]["images_per_cpu_sec"]:>13.1f} | '
                 f'{_cell(r, "cpu_efficiency", 10, 3)} | {_cell(r, "startup_seconds", 10, 1)}')
  return '\n'.join(lines)


def main(argv=None):
  args = parse_args(argv)
  # grain's worker processes read absl flags; this script parses its own arguments.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with tempfile.TemporaryDirectory(prefix='vpr_jax_bench_') as tmp:
    train_dir = args.train_dir
    if not train_dir:
      if args.layout != 'gsv_cities':
        raise SystemExit('--layout gsv_xs needs --train-dir (the synthetic set is GSV-Cities).')
      needed = args.places_per_batch
      places = max(args.synthetic_places, needed)
      start = time.perf_counter()
      summary = synthetic.make_training_places(
          tmp, seed=args.seed, num_train_places=places, images_per_place=args.images_per_place,
          image_size=args.source_size, layouts=('gsv_cities',))
      train_dir = summary['gsv_cities_dir']
      print(f'Wrote {summary["num_images"]} synthetic {args.source_size[0]}x'
            f'{args.source_size[1]} JPEGs in {time.perf_counter() - start:.1f} s.')
      if args.photos:
        index = gsv_cities.build_place_index(train_dir, 'gsv_cities',
                                             gsv_cities.available_cities(train_dir, 'gsv_cities'),
                                             args.images_per_place)
        count = replace_with_photos(index, args.photos, args.source_size)
        print(f'Replaced them with {count} photos from {args.photos} (cycled, quality 90).')
    elif args.photos:
      raise SystemExit('--photos replaces the synthetic images; it cannot be used with --train-dir.')
    report = run(args, train_dir, tmp)
  print()
  print(format_table(report))
  if args.output:
    bench_common.write_json(args.output, report)
  return report


if __name__ == '__main__':
  main()
