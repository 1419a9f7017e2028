"""Training speed, compute only: vpr_jax's train step against the PyTorch reference.

The train step of `vpr_jax.training` (jitted, state donated) on device-resident random uint8
batches: warm-up steps (the first compiles), then timed steps ending in block_until_ready. Also
reported: XLA's FLOP count per image, the compiled step's memory, its number of convolutions
(forward + backward of the trained stages only: nothing runs backward through frozen stages), and
--num_devices scaling. With torch installed, the same step in PyTorch
(`bench_train_reference.py`): AMP fp16 eager, channels_last, channels_last + torch.compile.

  python scripts/bench_train_compute.py --output train.json    # seed + MixVPR-paper recipes
  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
      python scripts/bench_train_compute.py --tiny --num_devices 1,8   # scaling code path on CPU

The same as `bench_train.py --modes compute`: same flags (but --modes), table and JSON.
"""

import itertools
import os
import sys
import time
import warnings

_SCRIPTS = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_SCRIPTS)
for _path in (_REPO, _SCRIPTS):
  if _path not in sys.path:
    sys.path.insert(0, _path)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

import bench_common
import bench_train_common
import bench_train_reference
from vpr_jax.training import state as train_state
from vpr_jax.models import vpr_model
# pylint: enable=g-import-not-at-top,wrong-import-position

_rate = bench_common.format_rate


def lower_train_step(config, devices=None):
  """The train step of a config lowered for abstract inputs (no initialisation, no compile).

  Cheap enough to inspect the program of a full-size config on a CPU, e.g. its convolutions:
  `lower_train_step(config).as_text().count('stablehlo.convolution')`.
  """
  programs = bench_train_common.step_programs(config, devices or jax.devices())

  def initial_state():
    """The state `initial_state` would build, for jax.eval_shape (nothing is computed)."""
    variables = programs.init(jax.random.PRNGKey(0))
    return train_state.create_train_state(config, programs.model, None, tx=programs.tx,
                                          variables=variables)

  state = jax.eval_shape(initial_state)
  n = bench_train_common.batch_images(config)
  h, w = (int(s) for s in config.image_size)
  batch = {'images': jax.ShapeDtypeStruct((n, h, w, 3), jnp.uint8),
           'labels': jax.ShapeDtypeStruct((n,), jnp.int32)}
  return programs.train_step.lower(state, batch, jax.random.PRNGKey(0))


def compiled_cost(compiled) -> dict:
  """XLA's FLOP and byte counts and the memory of a compiled program, where it reports them."""
  out = {}
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else {}
    out['flops'] = float(cost.get('flops', 0.0)) or None
    out['bytes_accessed'] = float(cost.get('bytes accessed', 0.0)) or None
  except Exception:  # pylint: disable=broad-except
    pass
  try:
    memory = compiled.memory_analysis()
    out['memory'] = {
        'argument_bytes': int(memory.argument_size_in_bytes),
        'output_bytes': int(memory.output_size_in_bytes),
        'alias_bytes': int(memory.alias_size_in_bytes),
        'temp_bytes': int(memory.temp_size_in_bytes),
    }
    # Donated (aliased) state buffers are counted once.
    out['memory']['total_bytes'] = (out['memory']['argument_bytes'] + out['memory']['output_bytes']
                                    - out['memory']['alias_bytes'] + out['memory']['temp_bytes'])
  except Exception:  # pylint: disable=broad-except
    pass
  return out


def _compile_step(programs, state, batch, step_rng) -> dict:
  """Lowers and compiles the step ahead of time, keeping what JAX said about donation."""
  start = time.perf_counter()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    lowered = programs.train_step.lower(state, batch, step_rng)
    compiled = lowered.compile()
  return {'compiled': compiled, 'hlo': lowered.as_text(),
          'compile_seconds': time.perf_counter() - start,
          'donation_warnings': [str(w.message) for w in caught
                                if 'donat' in str(w.message).lower()]}


def _time_steps(compiled, state, batches, step_rng, warmup: int, steps: int):
  """1 + warmup untimed steps, then `steps` timed: (state, metrics, dispatch s, total s)."""
  for i in range(1 + warmup):
    state, metrics = compiled(state, batches[i % 2], step_rng)
  bench_common.block((state, metrics))
  start = time.perf_counter()
  for i in range(steps):
    state, metrics = compiled(state, batches[i % 2], step_rng)
  dispatched = time.perf_counter() - start
  bench_common.block((state, metrics))
  return state, metrics, dispatched, time.perf_counter() - start


def _scaled_config(config, devices, weak_scaling: bool):
  """A copy of the config whose P grows with the devices (weak scaling), checked to split."""
  config = config.copy_and_resolve_references()
  if weak_scaling and len(devices) > 1:
    config.data.places_per_batch = int(config.data.places_per_batch) * len(devices)
  places = int(config.data.places_per_batch)
  if (places * int(config.data.images_per_place)) % len(devices):
    raise ValueError(f'a batch of {places} x {config.data.images_per_place} images does not '
                     f'split over {len(devices)} devices')
  return config


def bench_vpr_jax_step(config, warmup: int, steps: int, seed: int = 0, devices=None,
                       weak_scaling: bool = True) -> dict:
  """img/s of vpr_jax's jitted train step on device-resident random batches.

  Args:
    config: the (overridden) config; data.augment='device' includes device RandAugment.
    warmup: untimed steps after the compiling one.
    steps: timed steps.
    seed: init and data seed.
    devices: the devices of the data-parallel mesh (default: all).
    weak_scaling: with several devices, P grows with their number (the per-device batch stays
      the recipe's); False splits the recipe's batch over them.

  Returns:
    A dict: img_per_s (global), img_per_s_per_device, compile_seconds, gflop_per_image, memory,
    hlo_convolutions, donation_warnings, loss (finite check) ...
  """
  devices = list(devices or jax.devices())
  config = _scaled_config(config, devices, weak_scaling)
  programs = bench_train_common.step_programs(config, devices)
  dp = programs.dp
  state = bench_train_common.initial_state(config, programs, seed)
  rng = np.random.default_rng(seed)
  # Two different batches, alternated: nothing can be reused between steps.
  batches = [dp.shard_batch(bench_train_common.random_batch(config, rng)) for _ in range(2)]
  step_rng = jax.random.PRNGKey(seed + 1)
  compiled = _compile_step(programs, state, batches[0], step_rng)
  analysis = compiled_cost(compiled['compiled'])
  state, metrics, dispatched, seconds = _time_steps(compiled['compiled'], state, batches,
                                                     step_rng, warmup, steps)
  metrics = jax.device_get(dp.to_host(metrics))
  images = bench_train_common.batch_images(config)
  result = {
      'img_per_s': images * steps / seconds,
      'img_per_s_per_device': images * steps / seconds / len(devices),
      'seconds_per_step': seconds / steps,
      'dispatch_seconds_per_step': dispatched / steps,
      'batch': images,
      'places_per_batch': int(config.data.places_per_batch),
      'num_devices': len(devices),
      'compile_seconds': compiled['compile_seconds'],
      'dtype': str(np.dtype(vpr_model.resolve_dtype(config.model.dtype))),
      'augment': config.data.augment,
      'hlo_convolutions': compiled['hlo'].count('stablehlo.convolution'),
      'donation_warnings': compiled['donation_warnings'],
      'loss': float(metrics['loss']),
      'finite': float(metrics['finite']) == 1.0,
      'steps': steps,
      'warmup': warmup,
  }
  if analysis.get('flops'):
    # XLA counts the program of one device; the devices share the global batch.
    result['gflop_per_image'] = analysis['flops'] * len(devices) / images / 1e9
  if analysis.get('memory'):
    result['compiled_memory'] = analysis['memory']
  return result


# ----------------------------------------------------------------------------------------------
# The mode: every config x --compute_augment x --parallel x --num_devices.


def _device_counts(args) -> list[int]:
  """--num_devices, or all devices; refuses a count above what is there."""
  device_counts = args.num_devices or [jax.device_count()]
  for count in device_counts:
    if count > jax.device_count():
      raise SystemExit(f'--num_devices {count}: only {jax.device_count()} devices')
  return device_counts


def _row_label(name, augment, parallel_mode, count, device_counts, args) -> str:
  """'mixvpr +device-augment (8 devices) [pmap]': only the parts that tell rows apart."""
  return name + ('' if augment == 'none' else ' +device-augment') + (
      f' ({count} device{"s" if count > 1 else ""})'
      if len(device_counts) > 1 or count > 1 else '') + (
          f' [{parallel_mode}]' if len(args.parallel) > 1 else '')


def _measure_reference(config, name, variants, args) -> dict:
  """variant -> the reference's result, or why it was skipped or failed."""
  reference = {}
  for variant in variants:
    try:
      reference[variant] = bench_train_reference.bench_torch_step(
          config, variant, args.warmup, args.steps, args.seed)
      print(f'{name}: reference {variant} '
            f'{_rate(reference[variant]["img_per_s"])} img/s', flush=True)
    except NotImplementedError as e:
      reference[variant] = {'skipped': str(e)}
    except Exception as e:  # pylint: disable=broad-except
      # A failing variant (e.g. torch.compile without a compiler) must not hide the others.
      reference[variant] = {'failed': f'{type(e).__name__}: {e}'}
      print(f'{name}: reference {variant} failed: {type(e).__name__}: {e}', flush=True)
  return reference


def _add_reference(row, reference) -> None:
  """Puts the reference into a row, with the fastest variant and the ratio to it."""
  rates = {v: r['img_per_s'] for v, r in reference.items() if 'img_per_s' in r}
  row['reference'] = reference
  if rates:
    best = max(rates, key=rates.get)
    row.update({'reference_variant': best, 'reference_img_per_s': rates[best],
                'ratio': row['vpr_jax_img_per_s'] / rates[best]})


def _add_scaling(results, args) -> None:
  """Per-device throughput of each multi-device row relative to one device (same config)."""
  counts = [r for r in results['compute']
            if r['augment'] == 'none' and r['parallel'] == args.parallel[0]]
  for name in {r['config'] for r in counts}:
    single = [r for r in counts if r['config'] == name and r['num_devices'] == 1]
    for r in counts:
      if r['config'] == name and r['num_devices'] > 1 and single:
        r['per_device_vs_one_device'] = (r['vpr_jax']['img_per_s_per_device'] /
                                         single[0]['vpr_jax']['img_per_s_per_device'])


def _compute_row(path, config, label, count, args) -> dict:
  """Times vpr_jax's step of one config on `count` devices; the row of results['compute']."""
  # An explicit list of device counts is a scaling study (P grows with the devices unless
  # --strong_scaling); by default the recipe's batch is split over all devices, as in training.
  scaling_study = args.num_devices is not None
  out = bench_vpr_jax_step(config, args.warmup, args.steps, args.seed,
                           devices=jax.devices()[:count],
                           weak_scaling=scaling_study and not args.strong_scaling)
  print(f'{label}: vpr_jax {_rate(out["img_per_s"])} img/s ({out["dtype"]}, batch '
        f'{out["batch"]}, compile {out["compile_seconds"]:.1f} s, '
        f'{out.get("gflop_per_image", float("nan")):.2f} GFLOP/img, '
        f'{out["hlo_convolutions"]} convolutions)', flush=True)
  return {'label': label, 'config': bench_train_common.config_name(path), 'config_file': path,
          'augment': config.data.augment, 'parallel': config.parallel, 'num_devices': count,
          'batch': out['batch'], 'image_size': list(config.image_size),
          'vpr_jax_img_per_s': out['img_per_s'], 'vpr_jax': out,
          'peak_device_bytes_after': bench_common.peak_device_memory()}


def run(args, results, workdir) -> None:
  """The compute mode: appends one row per measurement to results['compute']."""
  del workdir  # device-resident random batches: no files
  have_reference, why_not = bench_train_reference.reference_available()
  variants = bench_train_reference.reference_variants(args) if have_reference else []
  if not have_reference and args.reference != ['none']:
    results['notes'].append(f'PyTorch reference skipped: {why_not}.')
    print(f'Note: PyTorch reference skipped ({why_not}).', flush=True)
  device_counts = _device_counts(args)
  for path in args.configs:
    name = bench_train_common.config_name(path)
    reference = None  # measured once per config, on its first single-device plain row
    for augment, parallel_mode in itertools.product(args.compute_augment, args.parallel):
      config = bench_train_common.bench_config(path, args, augment, parallel_mode)
      for count in device_counts:
        label = _row_label(name, augment, parallel_mode, count, device_counts, args)
        row = _compute_row(path, config, label, count, args)
        if augment == 'none' and count == 1 and variants and parallel_mode == args.parallel[0]:
          if reference is None:
            reference = _measure_reference(config, name, variants, args)
          _add_reference(row, reference)
        results['compute'].append(row)
  _add_scaling(results, args)


def main(argv=None) -> dict:
  """Parses the command line, runs the compute mode, prints its table, writes --output."""
  args = bench_train_common.parse_args(argv, mode='compute', description=__doc__)
  return bench_train_common.run(args, [run])


if __name__ == '__main__':
  main()
