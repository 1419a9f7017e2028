r"""Compiles the real train step (and the eval forward) for a GPU or TPU without one: costs.

XLA compiles for a GPU target on a CPU-only machine from a device description, and for a TPU
slice from libtpu's topology; nothing runs. For each config and target this script compiles the
very step the training loop runs (`training.programs.get_programs`; `--parallel jit`: jit over a
mesh of the target's devices, the state replicated and donated, the batch sharded over 'batch';
`--parallel pmap`: `jax.pmap` over the same devices, the state stacked to [devices, ...] and the
batch reshaped to [devices, N / devices, ...] as `DataParallel` places them; jax's pmap is jit of
shard_map, so it lowers for compile-only devices too) and the evaluation forward
(`evaluation.descriptors.make_embed_fn`, the same jit in both modes: compiled once), and
reports:
  - compile time and device memory (arguments, outputs, donated, temporaries: XLA's
    memory_analysis of the target program);
  - FLOPs: XLA's cost analysis of the same step lowered for the CPU client (the GPU compile-only
    client has none; TPU's is used when it answers), divided by the number of devices;
  - HBM bytes of the optimised target program: every top-level instruction's operand and result
    bytes, split by kind (fusions, convolutions, matmuls, other) and by model part (stem, layer1..,
    aggregator, loss, optimizer; forward / backward from the op_name metadata). An estimate: no
    L2 / VMEM reuse between kernels is assumed, and nothing is autotuned;
  - collectives (kind, count, bytes) of the multi-device program;
  - the roofline bound: FLOPs / peak and bytes / bandwidth, and the img/s of the larger.

Needs its own virtual environment (never the project's default install):
  python3 -m venv ~/vpr_jax_aot && ~/vpr_jax_aot/bin/pip install "jax[cuda12]==0.10.2" -e .
  # TPU targets additionally: ~/vpr_jax_aot/bin/pip install "jax[tpu]==0.10.2"

  ~/vpr_jax_aot/bin/python scripts/aot_compile.py --configs mixvpr,mixvpr_r50 \
      --targets h100 --devices 1,8 --output aot.json
  ~/vpr_jax_aot/bin/python scripts/aot_compile.py --configs mixvpr,mixvpr_r50 \
      --targets h100 --devices 8 --parallel jit,pmap --no_eval   # pmap against jit
  ~/vpr_jax_aot/bin/python scripts/aot_compile.py --targets cpu --configs mixvpr \
      --places_per_batch 8                 # the same breakdown of the CPU program

`--dtype` is explicit (default bfloat16): under JAX_PLATFORMS=cpu, model.dtype='auto' would
resolve to float32 and compile a float32 GPU program.
"""

import os
import sys

# Before jax is imported: the CUDA plugin must not probe for a GPU (cuInit fails with error 303
# without one), nothing can autotune Triton GEMM tiles without a device, and the CPU client
# gets 8 devices for the multi-device CPU target.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''), '--xla_gpu_enable_triton_gemm=false',
     '--xla_force_host_platform_device_count=8']).strip()

_SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_SCRIPTS))
sys.path.insert(0, _SCRIPTS)

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import platform
import time

import aot_targets
import hlo_bytes
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from vpr_jax import errors
from vpr_jax import parallel
from vpr_jax.cli import common
from vpr_jax.evaluation import descriptors
from vpr_jax.training import programs as programs_lib
from vpr_jax.training import state as train_state
# pylint: enable=g-import-not-at-top,wrong-import-position

DEFAULT_CONFIGS = ('mixvpr', 'mixvpr_r50')
ALL_CONFIGS = ('avg', 'gem', 'convap', 'mixvpr', 'mixvpr_r50', 'mixvpr_contrastive',
               'mixvpr_triplet', 'netvlad_r18', 'boq_r50', 'boq_dinov2', 'salad_dinov2')
_STEPS_PER_EPOCH = 1000


def load_config(name: str, args, parallel_mode: str = 'jit'):
  """A packaged config (or a config file) with the command line's overrides."""
  path = common.resolve_config_path(name)
  spec = importlib.util.spec_from_file_location(f'aot_config_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.dtype = args.dtype
  config.data.augment = args.augment
  config.parallel = parallel_mode
  if args.places_per_batch:
    config.data.places_per_batch = args.places_per_batch
  if args.image_size:
    config.image_size = (args.image_size, args.image_size)
  for override in args.set or ():
    apply_override(config, override)
  return config


def apply_override(config, override: str) -> None:
  """Sets one `--set KEY=JSON` override; ConfigError in one line for a bad one."""
  key, separator, value = override.partition('=')
  if not separator:
    raise errors.ConfigError(f'--set {override!r}: expected KEY=JSON, e.g. sync_batch_norm=false')
  node, leaf = common.config_field(config, key, f'--set {key}')
  try:
    parsed = json.loads(value)
  except json.JSONDecodeError:
    raise errors.ConfigError(f'--set {key}: {value!r} is not JSON (strings need quotes: '
                             f'\'"{value}"\')') from None
  try:
    node[leaf] = type(node[leaf])(parsed) if node[leaf] is not None else parsed
  except (TypeError, ValueError) as error:
    raise errors.ConfigError(f'--set {key}: {value} does not fit the field ({error})') from None


def _abstract(tree, sharding, leading: tuple = ()):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(leading + tuple(x.shape), x.dtype, sharding=sharding), tree)


def abstract_train_inputs(programs, state_shapes, images: int, image_size) -> tuple:
  """Abstract (state, batch, rng) of the train step, placed as `programs.dp` places them.

  jit: the state replicated over the mesh, the batch [N, ...] sharded over 'batch'. pmap (as
  `DataParallel.replicate` / `shard_batch`): every state leaf stacked to [devices, ...] and the
  batch reshaped to [devices, N / devices, ...], both sharded along that leading axis; the rng is
  broadcast (in_axes None).
  """
  dp = programs.dp
  sharded = NamedSharding(dp.mesh, PartitionSpec(parallel.BATCH_AXIS))
  h, w = (int(s) for s in image_size)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
  if dp.mode == 'jit':
    replicated = NamedSharding(dp.mesh, PartitionSpec())
    state = _abstract(state_shapes, replicated)
    lead, rng = (images,), jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
  else:
    d = dp.num_local_devices
    state = _abstract(state_shapes, sharded, leading=(d,))
    lead = (d, images // d)
  batch = {'images': jax.ShapeDtypeStruct(lead + (h, w, 3), jnp.uint8, sharding=sharded),
           'labels': jax.ShapeDtypeStruct(lead, jnp.int32, sharding=sharded)}
  return state, batch, rng


def lower_programs(config, devices, weak_scaling: bool, with_eval: bool = True):
  """The train step and the eval forward of `config`, lowered for abstract inputs on `devices`.

  The train step is `get_programs(config).train_step` for `config.parallel` ('jit' or 'pmap');
  the eval forward is the same jit over the mesh in both modes (`descriptors.make_embed_fn`).

  Returns:
    (lowered train step, lowered eval forward or None, global batch, eval batch).
  """
  config = config.copy_and_resolve_references()
  if weak_scaling and len(devices) > 1:
    config.data.places_per_batch = int(config.data.places_per_batch) * len(devices)
  # Program caches are keyed by device ids, which repeat across targets.
  programs_lib.clear_program_cache()
  programs = programs_lib.get_programs(config, _STEPS_PER_EPOCH, devices=list(devices))

  def initial_state():
    variables = programs.init(jax.random.PRNGKey(0))
    return train_state.create_train_state(config, programs.model, None, tx=programs.tx,
                                          variables=variables)

  state_shapes = jax.eval_shape(initial_state)
  n = int(config.data.places_per_batch) * int(config.data.images_per_place)
  state, batch, rng = abstract_train_inputs(programs, state_shapes, n, config.image_size)
  train = programs.train_step.lower(state, batch, rng)

  eval_batch = int(config.data.eval_batch_size) * (len(devices) if weak_scaling else 1)
  if not with_eval:
    return train, None, n, eval_batch
  mesh = programs.dp.mesh
  eh, ew = (int(s) for s in programs.eval_model.image_size)
  embed = descriptors.make_embed_fn(programs.eval_model, mesh)
  variables = _abstract({'params': state_shapes.params, 'batch_stats': state_shapes.batch_stats},
                        NamedSharding(mesh, PartitionSpec()))
  images = jax.ShapeDtypeStruct((eval_batch, eh, ew, 3), jnp.uint8,
                                sharding=NamedSharding(mesh, PartitionSpec(parallel.BATCH_AXIS)))
  forward = embed.lower(variables, images)
  return train, forward, n, eval_batch


def lowered_flops(lowered) -> float | None:
  """XLA's FLOP count of a lowered program (None where the client has no cost analysis)."""
  try:
    cost = lowered.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost['flops']) if cost and cost.get('flops') else None


def lowered_flops_and_bytes(compiled) -> dict:
  """FLOPs and bytes of a compiled program's own cost analysis ({} where it has none)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost:
    return {}
  return {'flops': cost.get('flops'), 'bytes_accessed': cost.get('bytes accessed')}


def cpu_flops(config, num_devices: int, weak_scaling: bool,
              with_eval: bool) -> tuple[float, float | None]:
  """FLOPs of the whole global train step and eval forward, counted on one CPU device.

  The program of `config.parallel` on one device: the lowered (unpartitioned) jit program of
  several devices also counts the global batch, but a pmap program counts one device's.
  """
  cpu = jax.devices('cpu')[:1]
  config = config.copy_and_resolve_references()
  if weak_scaling and num_devices > 1:
    config.data.places_per_batch = int(config.data.places_per_batch) * num_devices
    config.data.eval_batch_size = int(config.data.eval_batch_size) * num_devices
  train, forward, _, _ = lower_programs(config, cpu, weak_scaling=False, with_eval=with_eval)
  return lowered_flops(train), (lowered_flops(forward) if forward is not None else None)


def memory(compiled) -> dict:
  """XLA's memory analysis of a compiled program (bytes; donated buffers counted once)."""
  stats = compiled.memory_analysis()
  out = {'argument_bytes': int(stats.argument_size_in_bytes),
         'output_bytes': int(stats.output_size_in_bytes),
         'alias_bytes': int(stats.alias_size_in_bytes),
         'temp_bytes': int(stats.temp_size_in_bytes)}
  out['total_bytes'] = (out['argument_bytes'] + out['output_bytes'] - out['alias_bytes']
                        + out['temp_bytes'])
  return out


def analyse(lowered, target: aot_targets.Target, images: int, num_devices: int,
            global_flops: float | None) -> dict:
  """Compiles one lowered program and returns its costs (see the module docstring)."""
  start = time.perf_counter()
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  traffic = hlo_bytes.analyse_hlo(compiled.as_text())
  flops = lowered_flops(lowered) if global_flops is None else global_flops / num_devices
  if flops is None:
    flops = global_flops
  result = {'compile_seconds': round(seconds, 2), 'memory': memory(compiled),
            'images': images, 'images_per_device': images // num_devices,
            'flops_per_device': flops, 'hbm': dataclasses.asdict(traffic)}
  if flops:
    result['gflop_per_image'] = flops * num_devices / images / 1e9
  result['hbm_bytes_per_image'] = traffic.total_bytes * num_devices / images
  # The target's own cost analysis where it has one (TPU; the GPU compile-only client has none).
  own = lowered_flops_and_bytes(compiled)
  if own:
    result['target_cost_analysis'] = own
  result['bound'] = target.roofline(flops, traffic.total_bytes, images)
  return result


def run_one(config_name: str, target: aot_targets.Target, num_devices: int, args,
            parallel_mode: str = 'jit', with_eval: bool = True) -> dict:
  """Costs of the train step (and eval forward) of one config, target, device count and mode."""
  config = load_config(config_name, args, parallel_mode)
  devices = target.devices(num_devices)
  train_flops = eval_flops = None
  # One CPU device's count of the global step (only the CPU target's one-device program counts
  # its own FLOPs: the GPU compile-only client has none, and a multi-device program's lowered
  # count is the global batch under jit but one device's under pmap).
  if target.kind != 'cpu' or num_devices > 1:
    train_flops, eval_flops = cpu_flops(config, num_devices, not args.strong_scaling, with_eval)
  train, forward, images, eval_images = lower_programs(config, devices, not args.strong_scaling,
                                                       with_eval)
  row = {'config': config_name, 'target': target.name, 'devices': num_devices,
         'parallel': parallel_mode, 'dtype': args.dtype, 'image_size': list(config.image_size),
         'train': analyse(train, target, images, num_devices, train_flops)}
  if forward is not None:
    row['eval'] = analyse(forward, target, eval_images, num_devices, eval_flops)
  return row


def _gb(x: float) -> str:
  return f'{x / 1e9:.2f}'


def format_table(rows: list[dict]) -> str:
  """The summary table (one line per config, target, device count and program)."""
  head = ('| config | target | dev | parallel | program | batch | compile s | '
          'memory GiB (arg/out/temp) | GFLOP/img | HBM GB/step/dev (fusion/conv/matmul/other) | '
          'collectives (n, MB) | bound img/s (FLOP/bytes) |')
  lines = [head, '|' + '---|' * 12]
  for row in rows:
    for program in ('train', 'eval'):
      if program not in row:
        continue
      r = row[program]
      m, h, b = r['memory'], r['hbm'], r['bound']
      kinds = h['by_kind']
      coll = h['collectives']
      n_coll = sum(c['count'] for c in coll.values())
      mb_coll = sum(c['bytes'] for c in coll.values()) / 1e6
      gib = lambda x: f'{x / 2**30:.2f}'
      lines.append(
          f"| {row['config']} | {row['target']} | {row['devices']} | {row['parallel']} | "
          f"{program} | {r['images']} | "
          f"{r['compile_seconds']:.0f} | {gib(m['total_bytes'])} ({gib(m['argument_bytes'])}/"
          f"{gib(m['output_bytes'])}/{gib(m['temp_bytes'])}) | "
          f"{r.get('gflop_per_image', float('nan')):.2f} | {_gb(h['total_bytes'])} "
          f"({'/'.join(_gb(kinds.get(k, 0)) for k in hlo_bytes.KINDS)}) | "
          f"{n_coll}, {mb_coll:.1f} | "
          f"{b.get('img_per_s', float('nan')):,.0f} ({b.get('flop_img_per_s', float('nan')):,.0f}"
          f"/{b.get('bytes_img_per_s', float('nan')):,.0f}) |")
  return '\n'.join(lines)


def format_parts(rows: list[dict]) -> str:
  """HBM GB per step and device by model part, forward / backward, of each train step."""
  lines = []
  for row in rows:
    parts = row['train']['hbm']['by_part']
    cells = ', '.join(f'{name} {_gb(v["forward"])}/{_gb(v["backward"])}'
                      for name, v in sorted(parts.items(), key=lambda kv: -kv[1]['total']))
    lines.append(f"{row['config']} {row['target']} x{row['devices']} {row['parallel']} train, "
                 f"GB fwd/bwd: {cells}")
    coll = row['train']['hbm']['collectives']
    if coll:
      lines.append('  collectives: ' + ', '.join(
          f"{kind} {c['count']} x ({c['bytes'] / 1e6:.2f} MB)" for kind, c in coll.items()))
  return '\n'.join(lines)


def environment() -> dict:
  """Versions, machine and date of the run."""
  versions = {}
  for name in ('jax', 'jaxlib', 'jax-cuda12-plugin', 'jax-cuda12-pjrt', 'libtpu', 'flax'):
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return {'date_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
          'machine': f'{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}',
          'python': platform.python_version(), 'versions': versions,
          'xla_flags': os.environ.get('XLA_FLAGS', '')}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--configs', default=','.join(DEFAULT_CONFIGS),
                      help=f'comma-separated config names or files; "all": {",".join(ALL_CONFIGS)}')
  parser.add_argument('--targets', default='h100',
                      help=f'comma-separated: {",".join(aot_targets.TARGETS)}')
  parser.add_argument('--devices', default='1,8', help='comma-separated device counts')
  parser.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float32'))
  parser.add_argument('--augment', default='none', choices=('none', 'device'))
  parser.add_argument('--places_per_batch', type=int, default=0,
                      help='P per device (default: the config\'s)')
  parser.add_argument('--image_size', type=int, default=0)
  parser.add_argument('--set', action='append', help='config override KEY=JSON, repeatable')
  parser.add_argument('--strong_scaling', action='store_true',
                      help='split the recipe\'s batch over the devices (default: P grows)')
  parser.add_argument('--parallel', default='jit',
                      help='comma-separated data-parallel modes of the train step: jit, pmap '
                      '(the eval forward is the same jit in both: compiled once)')
  parser.add_argument('--no_eval', action='store_true', help='skip the eval forward')
  parser.add_argument('--output', default='', help='JSON file for every figure')
  return parser.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  names = ALL_CONFIGS if args.configs == 'all' else tuple(args.configs.split(','))
  targets = [aot_targets.get_target(name) for name in args.targets.split(',')]
  missing = [t for t in targets if t.missing()]
  for target in missing:
    print(f'aot_compile: target {target.name} skipped: {target.missing()}')
  modes = tuple(args.parallel.split(','))
  unknown = [mode for mode in modes if mode not in parallel.PARALLEL_MODES]
  if unknown:
    raise aot_targets.TargetError(f'--parallel {",".join(unknown)}: unknown mode; valid: '
                                  f'{", ".join(parallel.PARALLEL_MODES)}')
  rows = []
  for target in targets:
    if target in missing:
      continue
    for num_devices in (int(d) for d in args.devices.split(',')):
      for name in names:
        for mode in modes:
          start = time.perf_counter()
          # The eval forward does not depend on the mode: compiled with the first one only.
          row = run_one(name, target, num_devices, args, mode,
                        with_eval=not args.no_eval and mode == modes[0])
          print(f'aot_compile: {name} on {target.name} x{num_devices} {mode}: '
                f'{time.perf_counter() - start:.0f} s', flush=True)
          rows.append(row)
  result = {'environment': environment(), 'args': vars(args), 'rows': rows,
            'skipped_targets': {t.name: t.missing() for t in missing}}
  if rows:
    print(format_table(rows))
    print(format_parts(rows))
  if args.output:
    with open(args.output + '.tmp', 'w') as f:
      json.dump(result, f, indent=1)
    os.replace(args.output + '.tmp', args.output)
  return result


if __name__ == '__main__':
  try:
    outcome = main()
  except (aot_targets.TargetError, errors.UserError) as error:
    print(f'aot_compile: {error}', file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:
    # The JSON is written (atomically) only after the last compile: nothing half-written.
    print('aot_compile: interrupted; --output not written', file=sys.stderr, flush=True)
    # Not sys.exit: tearing XLA's compilers down right after an interrupted compile can crash
    # (SIGSEGV, seen on the CPU client), and nothing is left to flush or clean up.
    os._exit(130)  # pylint: disable=protected-access
  # 3: nothing compiled because a target's plugin is missing (not a compile error).
  sys.exit(0 if outcome['rows'] or not outcome['skipped_targets'] else 3)
