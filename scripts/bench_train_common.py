"""What the training-speed benchmarks share: flags, config overrides, the train step, the driver.

The modes of `bench_train.py` live in their own scripts (`bench_train_compute.py`,
`bench_train_augment.py`, `bench_train_pipeline.py`, `bench_train_end_to_end.py`,
`bench_train_eval.py`); each runs through `run` below, so one mode alone and several modes in
one `bench_train.py --modes ...` run print the same lines and write the same JSON.
"""

import argparse
import contextlib
import os
import sys
import tempfile

_SCRIPTS = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_SCRIPTS)
for _path in (_REPO, _SCRIPTS):
  if _path not in sys.path:
    sys.path.insert(0, _path)

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
import jax
import numpy as np

import bench_common
import bench_eval
from vpr_jax.training import programs as train_programs
from vpr_jax.training import state as train_state
from vpr_jax.data.training import gsv_cities
from vpr_jax.data.multiprocess import workers as worker_processes
# pylint: enable=g-import-not-at-top,wrong-import-position

# The choices of `bench_train.py --modes` (they run in the order of `bench_train.mode_runners`).
MODES = ('compute', 'end_to_end', 'pipeline', 'augment', 'eval')
SOURCES = ('original', 'prepared')
REFERENCE_VARIANTS = ('eager', 'channels_last', 'compile')
DEFAULT_CONFIGS = bench_eval.DEFAULT_CONFIGS
# Steps per epoch the schedules are built with: the speed does not depend on it.
STEPS_PER_EPOCH = 1000


# ----------------------------------------------------------------------------------------------
# Configs and the train step.


def bench_config(path: str, args, augment: str = 'none', parallel_mode: str = 'jit'):
  """A config file with the command line's overrides (image size, P x K, dtype, augment)."""
  config = bench_eval.load_config(path)
  if args.image_size:
    config.image_size = (args.image_size, args.image_size)
  if args.places_per_batch:
    config.data.places_per_batch = args.places_per_batch
  if args.images_per_place:
    config.data.images_per_place = args.images_per_place
    config.data.min_img_per_place = args.images_per_place
  if args.dtype:
    config.model.dtype = args.dtype
  config.data.augment = augment
  config.parallel = parallel_mode
  return config


def config_name(path: str) -> str:
  """The name a config file is reported under: its file name without the extension."""
  return os.path.splitext(os.path.basename(path))[0]


def batch_images(config) -> int:
  """Images in one global batch: P x K."""
  return int(config.data.places_per_batch) * int(config.data.images_per_place)


def step_programs(config, devices):
  """The model, optimiser and compiled step the training loop uses for this config."""
  return train_programs.get_programs(config, STEPS_PER_EPOCH, devices=list(devices))


def initial_state(config, programs, seed: int):
  """A freshly initialised train state, replicated over the devices of `programs`."""
  variables = programs.init(jax.random.PRNGKey(seed))
  state = train_state.create_train_state(config, programs.model, None, tx=programs.tx,
                                         variables=variables)
  return programs.dp.replicate(jax.device_get(state))


def random_batch(config, rng: np.random.Generator, places: int | None = None) -> dict:
  """A flat host batch of random uint8 images; K consecutive images share a label."""
  p = places or int(config.data.places_per_batch)
  k = int(config.data.images_per_place)
  h, w = (int(s) for s in config.image_size)
  return {'images': rng.integers(0, 256, (p * k, h, w, 3), dtype=np.uint8),
          'labels': np.repeat(np.arange(p, dtype=np.int32), k)}


def data_devices(args) -> list:
  """Devices of the end_to_end and eval modes: the first of --num_devices, else all."""
  return jax.devices()[:args.num_devices[0]] if args.num_devices else jax.devices()


# ----------------------------------------------------------------------------------------------
# Flags: every mode script takes all of them, as `bench_train.py --modes MODE` does; they are
# added in one fixed order, which is the order of `args` in the JSON.


def _add_recipe_arguments(parser):
  """Which configs, and the overrides every mode applies to them."""
  parser.add_argument('--configs', default=None,
                      help='comma-separated config files (default: the seed and the MixVPR-paper '
                      'recipes; --tiny: the seed only)')
  parser.add_argument('--image_size', type=int, default=None,
                      help='square input size overriding the configs (--tiny: 32)')
  parser.add_argument('--places_per_batch', type=int, default=None, help='P (--tiny: 4)')
  parser.add_argument('--images_per_place', type=int, default=None, help='K (--tiny: 2)')
  parser.add_argument('--dtype', default=None, choices=('auto', 'float32', 'bfloat16'),
                      help='model.dtype override (default: the config\'s, auto)')


def _add_step_arguments(parser):
  """How the steps run: augmentation, data parallelism, devices, PyTorch reference, counts."""
  parser.add_argument('--compute_augment', type=bench_common.parse_choices(('none', 'device')),
                      default=['none'],
                      help='compute mode: none and/or device (device RandAugment in the step)')
  parser.add_argument('--augment', default='device', choices=('none', 'device', 'randaugment'),
                      help='end_to_end / pipeline augmentation (data.augment)')
  parser.add_argument('--parallel', type=bench_common.parse_choices(('jit', 'pmap')),
                      default=['jit'],
                      help="compute mode: data-parallel implementations to time ('jit,pmap')")
  parser.add_argument('--num_devices', type=bench_common.parse_int_list, default=None,
                      help='compute mode: device counts to run on, e.g. 1,8 (a scaling study: '
                      'P grows with the devices); end_to_end and eval use the first count '
                      '(default: all devices, the recipe\'s batch split over them)')
  parser.add_argument('--strong_scaling', action='store_true',
                      help='split the recipe\'s batch over the devices instead of growing P')
  parser.add_argument('--reference',
                      type=bench_common.parse_choices(REFERENCE_VARIANTS + ('none',)),
                      default=None,
                      help='PyTorch variants (default: all three on CUDA, eager on CPU)')
  parser.add_argument('--warmup', type=int, default=None, help='untimed steps (default 3)')
  parser.add_argument('--steps', type=int, default=None, help='timed steps (default 20)')


def _add_data_arguments(parser):
  """Where the end_to_end / pipeline / eval modes read their images from, and how."""
  parser.add_argument('--sources', type=bench_common.parse_choices(SOURCES), default=None,
                      help='end_to_end / pipeline data: original and/or prepared (default both)')
  parser.add_argument('--train_dir', default='', help='training folder (default: synthetic)')
  parser.add_argument('--layout', default='gsv_cities', choices=gsv_cities.LAYOUTS)
  parser.add_argument('--cities', default='', help='comma-separated; default: all in train_dir')
  parser.add_argument('--prepared_dir', default='',
                      help='built TFDS dataset folder (`vpr_jax.prepare` prints it; default: build '
                      '--train_dir into a temp folder)')
  parser.add_argument('--synthetic_places', type=int, default=None,
                      help='places of the synthetic set (default 400; --tiny: 8)')
  parser.add_argument('--source_size', type=bench_common.parse_hw, default=None,
                      help='H,W of the synthetic JPEGs (default 480,640 as GSV-Cities; --tiny: '
                      '48,64)')
  parser.add_argument('--workers', type=int, default=None,
                      help='grain worker processes (default: one per core, at most 16; --tiny: 0)')
  parser.add_argument('--threaded_prefetch', action='store_true',
                      help='end_to_end: also run with the host side in a background thread')
  parser.add_argument('--eval_batch_size', type=int, default=None,
                      help='eval mode batch (default 256; --tiny: 8)')
  parser.add_argument('--eval_batches', type=int, default=None,
                      help='eval mode timed batches (default 40; --tiny: 2)')


def _add_run_arguments(parser):
  """Size of the run, where its files go, its seed."""
  parser.add_argument('--tiny', action='store_true',
                      help='CPU smoke run: small images, P x K, steps and data')
  parser.add_argument('--workdir', default='', help='where generated data goes (default: temp)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--output', default='', help='also write the results to this JSON file')


def _resolve_defaults(args, parser):
  """Fills the defaults that depend on --tiny, then refuses impossible step counts."""
  tiny = args.tiny
  args.modes = args.modes or (list(MODES) if tiny else ['compute'])
  args.configs = (args.configs.split(',') if args.configs
                  else [DEFAULT_CONFIGS[0]] if tiny else list(DEFAULT_CONFIGS))
  if tiny:
    args.image_size = args.image_size or 32
    args.places_per_batch = args.places_per_batch or 4
    args.images_per_place = args.images_per_place or 2
  args.images_per_place_data = args.images_per_place or 4
  args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
  args.steps = args.steps if args.steps is not None else (2 if tiny else 20)
  args.sources = args.sources or list(SOURCES)
  args.synthetic_places = args.synthetic_places or (8 if tiny else 400)
  args.source_size = args.source_size or ((48, 64) if tiny else (480, 640))
  if args.workers is None:
    args.workers = 0 if tiny else worker_processes.resolve_num_workers(-1)
  args.eval_batch_size = args.eval_batch_size or (8 if tiny else 256)
  args.eval_batches = args.eval_batches or (2 if tiny else 40)
  if args.steps <= 0 or args.warmup < 0 or args.workers < 0:
    parser.error('--steps must be positive, --warmup and --workers non-negative')
  return args


def parse_args(argv=None, mode: str | None = None, description: str = ''):
  """The command line of a training benchmark.

  Args:
    argv: the arguments (default: sys.argv[1:]).
    mode: the one mode of a mode script (no --modes flag then); None: `bench_train.py`, which
      takes --modes.
    description: the script's docstring (its first line heads --help, the rest follows it).

  Returns:
    The parsed arguments with every default resolved; args.modes is a list of MODES.
  """
  parser = argparse.ArgumentParser(description=description.split('\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  if mode is None:
    parser.add_argument('--modes', type=bench_common.parse_choices(MODES), default=None,
                        help=f'comma-separated, of {", ".join(MODES)} (default: compute; --tiny: '
                        'all)')
  _add_recipe_arguments(parser)
  _add_step_arguments(parser)
  _add_data_arguments(parser)
  _add_run_arguments(parser)
  # A mode script records its mode as `--modes MODE` would (first, where --modes stands in
  # bench_train.py's flags), so its JSON reads the same.
  namespace = argparse.Namespace(modes=[mode]) if mode else None
  return _resolve_defaults(parser.parse_args(argv, namespace=namespace), parser)


# ----------------------------------------------------------------------------------------------
# Tables and the driver.


_rate = bench_common.format_rate


def format_compute_table(rows) -> str:
  """config, batch, vpr_jax img/s, reference img/s (fastest variant), ratio."""
  lines = []
  for r in rows:
    ratio = r.get('ratio')
    lines.append((r['label'], str(r['batch']), _rate(r.get('vpr_jax_img_per_s')),
                  _rate(r.get('reference_img_per_s')),
                  f'{ratio:.2f}x' if ratio is not None else 'n/a'))
  return bench_common.format_table(
      ('config', 'batch', 'vpr_jax img/s', 'reference img/s', 'ratio'), lines)


def format_e2e_table(rows) -> str:
  """run, batch, img/s, compute-only img/s of the same config, ratio."""
  lines = []
  for r in rows:
    ratio = r.get('ratio_to_compute')
    lines.append((r['label'], str(r['batch']), _rate(r['img_per_s']),
                  _rate(r.get('compute_img_per_s')),
                  f'{ratio:.2f}x' if ratio is not None else 'n/a'))
  return bench_common.format_table(
      ('run', 'batch', 'img/s', 'compute-only img/s', 'ratio'), lines)


def print_summary(results) -> None:
  """The tables of every mode that ran, the reference details and the peak device memory."""
  if results['compute']:
    print()
    print(format_compute_table(results['compute']))
    for row in results['compute']:
      for variant, ref in (row.get('reference') or {}).items():
        detail = _rate(ref['img_per_s']) + ' img/s' if 'img_per_s' in ref else (
            ref.get('skipped') or ref.get('failed'))
        print(f'  {row["config"]} reference {variant}: {detail}')
      if 'per_device_vs_one_device' in row:
        print(f'  {row["label"]}: per-device throughput {row["per_device_vs_one_device"]:.2f}x '
              'of one device')
  if results['end_to_end']:
    print()
    print(format_e2e_table(results['end_to_end']))
  for row in results['augment'] + results['eval']:
    print(f'{row["label"]}: {_rate(row["img_per_s"])} img/s')
  peak = results['peak_device_bytes']
  print('Peak device memory: ' + (f'{peak / 2**30:.2f} GiB' if peak is not None
                                  else f'n/a (not reported by {results["env"]["backend"]})'))


def run(args, runners) -> dict:
  """Runs the modes, prints the summary and writes --output.

  Args:
    args: from `parse_args`.
    runners: callables (args, results, workdir), in the order they run; a later one may read
      what an earlier one put in `results` (the data modes compare with the compute rows).

  Returns:
    The results: env, args, compute, end_to_end, augment, eval, notes, peak_device_bytes and,
    after a data mode, data.
  """
  # grain's worker processes read absl flags; these scripts parse their own arguments.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  results = {'env': bench_common.environment(), 'args': {k: v for k, v in vars(args).items()},
             'compute': [], 'end_to_end': [], 'augment': [], 'eval': [], 'notes': []}
  env = results['env']
  print(f'JAX {env["jax"]} on {env["backend"]}: {env["device"]} x {env["num_devices"]}; '
        f'{env["cpu_count"]} CPUs', flush=True)
  if args.workdir:
    os.makedirs(args.workdir, exist_ok=True)
    workdir, cleanup = args.workdir, contextlib.nullcontext()
  else:
    cleanup = tempfile.TemporaryDirectory(prefix='vpr_jax_bench_train_')
    workdir = cleanup.name
  with cleanup:
    for runner in runners:
      runner(args, results, workdir)
  results['peak_device_bytes'] = bench_common.peak_device_memory()
  print_summary(results)
  if args.output:
    bench_common.write_json(args.output, results)
  return results
