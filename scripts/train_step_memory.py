r"""Memory of the compiled train step of a config, from XLA's memory analysis (no step is run).

Lowers the config's jitted train step (`training.programs.get_programs`, the step training runs)
for abstract inputs on one device, compiles it and prints `compiled.memory_analysis()`: the
arguments (train state + batch), outputs, aliased (donated) bytes and temporaries, and their total
(donated buffers counted once). Nothing is initialised or run, so full-size configs fit on a CPU.

Usage:
  python scripts/train_step_memory.py --config salad_dinov2 [--dtype bfloat16] \
      [--places_per_batch 60] [--images_per_place 4] [--image_size 224]
"""

import argparse
import importlib.util
import json
import platform
import time

import jax
import jax.numpy as jnp

from vpr_jax.cli import common
from vpr_jax.models import vpr_model
from vpr_jax.training import programs as programs_lib
from vpr_jax.training import state as train_state


def load_config(name: str):
  """The ConfigDict of a packaged config name or a configs/*.py file."""
  path = common.resolve_config_path(name)
  spec = importlib.util.spec_from_file_location('config_module', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def step_memory(config) -> dict:
  """Bytes of the compiled train step of `config` on one device (see the module doc)."""
  devices = jax.devices()[:1]
  programs = programs_lib.get_programs(config, steps_per_epoch=1000, devices=devices)

  def initial_state():
    variables = programs.init(jax.random.PRNGKey(0))
    return train_state.create_train_state(config, programs.model, None, tx=programs.tx,
                                          variables=variables)

  state = jax.eval_shape(initial_state)
  n = int(config.data.places_per_batch) * int(config.data.images_per_place)
  h, w = (int(s) for s in config.image_size)
  batch = {'images': jax.ShapeDtypeStruct((n, h, w, 3), jnp.uint8),
           'labels': jax.ShapeDtypeStruct((n,), jnp.int32)}
  start = time.perf_counter()
  compiled = programs.train_step.lower(state, batch, jax.random.PRNGKey(0)).compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  out = {'argument_bytes': int(memory.argument_size_in_bytes),
         'output_bytes': int(memory.output_size_in_bytes),
         'alias_bytes': int(memory.alias_size_in_bytes),
         'temp_bytes': int(memory.temp_size_in_bytes)}
  out['total_bytes'] = (out['argument_bytes'] + out['output_bytes'] - out['alias_bytes']
                        + out['temp_bytes'])
  out['compile_seconds'] = round(seconds, 1)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True, help='packaged config name or configs/*.py')
  parser.add_argument('--dtype', default=None, choices=('float32', 'bfloat16'))
  parser.add_argument('--places_per_batch', type=int, default=None)
  parser.add_argument('--images_per_place', type=int, default=None)
  parser.add_argument('--image_size', type=int, default=None)
  args = parser.parse_args()
  config = load_config(args.config)
  if args.dtype:
    config.model.dtype = args.dtype
  if args.places_per_batch:
    config.data.places_per_batch = args.places_per_batch
  if args.images_per_place:
    config.data.images_per_place = args.images_per_place
  if args.image_size:
    config.image_size = (args.image_size, args.image_size)
  vpr_model.check_config(config)
  result = {'config': args.config, 'backbone': config.model.backbone,
            'aggregator': config.model.aggregator, 'image_size': list(config.image_size),
            'batch': int(config.data.places_per_batch) * int(config.data.images_per_place),
            'dtype': str(jnp.dtype(vpr_model.resolve_dtype(config.model.dtype))),
            'backend': jax.default_backend(), 'machine': platform.machine(),
            'jax': jax.__version__}
  result.update(step_memory(config))
  result['total_gib'] = round(result['total_bytes'] / 2**30, 2)
  print(json.dumps(result))


if __name__ == '__main__':
  main()
