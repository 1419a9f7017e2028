r"""Where the train step's time goes: vpr_jax's step and the PyTorch reference, op by op.

Runs the very step `bench_train_compute.py` times (the training loop's jitted step; the PyTorch
reference of `bench_train_reference.py`) on the current backend, traces `--steps` steps of each
with its own profiler (jax.profiler; torch.profiler), and sums the time of every operation by
kind: convolutions forward / backward, matrix products, the rest (XLA fusions: BatchNorm,
LayerNorm, elementwise; torch: batch_norm, relu, add, ...), the optimiser. vpr_jax's operations
are also split by model part (the op_name metadata, as `scripts/hlo_bytes.py` reads it). Summed
operation time can exceed the wall time where two operations run at once (XLA's CPU runtime runs
independent thunks concurrently).

  JAX_PLATFORMS=cpu python scripts/profile_step.py --configs configs/mixvpr.py \
      --places_per_batch 8 --images_per_place 4 --output profile.json
"""

import collections
import glob
import os
import sys
import tempfile
import time

_SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_SCRIPTS))
sys.path.insert(0, _SCRIPTS)

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse

import bench_common
import bench_train_common
import bench_train_reference
import hlo_bytes
import jax
import numpy as np

from vpr_jax import errors
# pylint: enable=g-import-not-at-top,wrong-import-position

# Kinds both sides are split into. torch operators (self time) by name fragment; anything else
# is 'other'. The optimiser's operators are AdamW's (foreach=False on the CPU: one per tensor).
_TORCH_KINDS = (('convolution_backward', 'convolution backward'),
                ('mkldnn_convolution', 'convolution forward'),
                ('_convolution', 'convolution forward'), ('conv2d', 'convolution forward'),
                ('aten::mm', 'matmul'), ('aten::addmm', 'matmul'), ('aten::bmm', 'matmul'),
                ('batch_norm', 'BatchNorm, ReLU (backbone)'),
                ('threshold_backward', 'BatchNorm, ReLU (backbone)'),
                ('layer_norm', 'LayerNorm'),
                ('addcdiv', 'optimizer'), ('addcmul', 'optimizer'), ('lerp', 'optimizer'),
                ('_foreach', 'optimizer'), ('aten::sqrt', 'optimizer'))
_BACKBONE_PARTS = ('stem', 'layer1', 'layer2', 'layer3', 'layer4', 'backbone (other)')


def _jax_kind(kind: str, part: str, direction: str) -> str:
  """The kind of a vpr_jax operation (see _TORCH_KINDS) from its HLO kind and model part."""
  if kind == 'convolution':
    return f'convolution {direction}'
  if kind == 'matmul':
    return 'matmul'
  if part in _BACKBONE_PARTS:
    return 'BatchNorm, ReLU (backbone)'
  if part == 'optimizer':
    return 'optimizer'
  return 'LayerNorm' if part == 'aggregator' else 'other'


def profile_vpr_jax(config, steps: int, warmup: int = 2, seed: int = 0) -> dict:
  """Seconds per step of vpr_jax's step, by kind and by model part (forward / backward)."""
  programs = bench_train_common.step_programs(config, jax.devices()[:1])
  state = bench_train_common.initial_state(config, programs, seed)
  rng = np.random.default_rng(seed)
  batches = [programs.dp.shard_batch(bench_train_common.random_batch(config, rng))
             for _ in range(2)]
  step_rng = jax.random.PRNGKey(seed + 1)
  compiled = programs.train_step.lower(state, batches[0], step_rng).compile()
  table = hlo_bytes.instruction_table(compiled.as_text())
  for i in range(warmup):
    state, metrics = compiled(state, batches[i % 2], step_rng)
  bench_common.block((state, metrics))
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    for i in range(steps):
      state, metrics = compiled(state, batches[i % 2], step_rng)
    bench_common.block((state, metrics))
    wall = time.perf_counter() - start
    jax.profiler.stop_trace()
    trace = glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True)[0]
    data = jax.profiler.ProfileData.from_file(trace)
  by_kind, by_part = collections.Counter(), collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        if stats.get('hlo_op') not in table or 'train_step' not in str(stats.get('hlo_module')):
          continue
        kind, part, direction = table[stats['hlo_op']]
        seconds = event.duration_ns / 1e9 / steps
        by_kind[_jax_kind(kind, part, direction)] += seconds
        by_part[f'{part} {direction}'] += seconds
  return {'seconds_per_step': wall / steps, 'by_kind': dict(by_kind), 'by_part': dict(by_part)}


def _torch_kind(name: str) -> str:
  lowered = name.lower()
  for key, kind in _TORCH_KINDS:
    if key in lowered:
      return kind
  return 'other'


def profile_torch(config, variant: str, steps: int, warmup: int = 2, seed: int = 0) -> dict:
  """Seconds per step of the PyTorch reference step, by kind (operators' self CPU time)."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  device = torch.device('cpu')
  step = bench_train_reference.ReferenceStep(config, variant, device)
  images, labels = bench_train_reference.random_batches(config, device, seed, step.channels_last)
  for i in range(warmup):  # oneDNN picks its kernels in the first steps.
    step(images[i % 2], labels)
  by_kind = collections.Counter()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
    start = time.perf_counter()
    for i in range(steps):
      step(images[i % 2], labels)
    wall = time.perf_counter() - start
  for event in profiler.key_averages():
    by_kind[_torch_kind(event.key)] += event.self_cpu_time_total / 1e6 / steps
  return {'seconds_per_step': wall / steps, 'by_kind': dict(by_kind), 'variant': variant}


def format_table(name: str, ours: dict, reference: dict) -> str:
  """Seconds per step by kind, side by side."""
  kinds = sorted(set(ours['by_kind']) | set(reference['by_kind']))
  lines = [f'{name}: seconds per step (op time; wall: vpr_jax {ours["seconds_per_step"]:.3f}, '
           f'PyTorch {reference["variant"]} {reference["seconds_per_step"]:.3f})',
           '| kind | vpr_jax | PyTorch |', '|---|---|---|']
  for kind in kinds:
    lines.append(f'| {kind} | {ours["by_kind"].get(kind, 0):.3f} | '
                 f'{reference["by_kind"].get(kind, 0):.3f} |')
  lines.append('vpr_jax by part: ' + ', '.join(
      f'{part} {seconds:.3f}' for part, seconds in
      sorted(ours['by_part'].items(), key=lambda kv: -kv[1]) if seconds >= 0.001))
  return '\n'.join(lines)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--configs', default='configs/mixvpr.py', help='comma-separated files')
  parser.add_argument('--image_size', type=int, default=None)
  parser.add_argument('--places_per_batch', type=int, default=8)
  parser.add_argument('--images_per_place', type=int, default=4)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--reference', default='channels_last', choices=('eager', 'channels_last'))
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps of each')
  parser.add_argument('--steps', type=int, default=3, help='traced steps of each')
  parser.add_argument('--output', default='')
  return parser.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  results = {'env': bench_common.environment(), 'args': vars(args), 'rows': []}
  for path in args.configs.split(','):
    config = bench_train_common.bench_config(path, args)
    ours = profile_vpr_jax(config, args.steps, args.warmup)
    reference = profile_torch(config, args.reference, args.steps, args.warmup)
    print(format_table(bench_train_common.config_name(path), ours, reference), flush=True)
    results['rows'].append({'config': path, 'vpr_jax': ours, 'reference': reference})
  if args.output:
    bench_common.write_json(args.output, results)
  return results


if __name__ == '__main__':
  try:
    main()
  except (FileNotFoundError, errors.UserError) as error:
    print(f'profile_step: {error}', file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:
    # --output is written (atomically) only at the end: nothing half-written.
    print('profile_step: interrupted; --output not written', file=sys.stderr)
    sys.exit(130)
