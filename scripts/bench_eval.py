"""Evaluation speed: FAISS search time and descriptor extraction img/s, vpr_jax vs PyTorch.

Measures
  (a) exact FAISS search (`vpr_jax.evaluation.search`, k=25) on random unit vectors of an SF-XS
      test-sized problem: 27,191 database x 1,000 queries, 1024-d (target: under 1 s on CPU);
  (b) descriptor extraction of each config's eval forward in vpr_jax (`descriptors.make_embed_fn`:
      jit, bf16 on GPU / float32 on CPU by model.dtype='auto'), on device-resident uint8 batches,
      timed with block_until_ready after warm-up;
  (c) the same forward in PyTorch (torchvision ResNet cropped as the config says + a MixVPR
      module written below; fp16 autocast on GPU, optionally channels_last), when torch is
      installed; uint8 batches already on the device, normalised inside the timed region as
      vpr_jax does;
  (d) peak device memory after each config (jax `memory_stats()['peak_bytes_in_use']`, where
      the backend reports it; configs run in the given order, so list the largest last).

  python scripts/bench_eval.py --tiny                        # CPU smoke run (CI)
  python scripts/bench_eval.py --output bench_eval.json      # seed + MixVPR-paper recipes
  python scripts/bench_eval.py --configs configs/mixvpr.py --batch_size 512 --channels_last

Prints a table (config, batch, vpr_jax img/s, reference img/s, ratio) and writes it, with the
FAISS timings and memory, to --output.
"""

import argparse
import importlib.util
import os
import platform
import sys
import time

_SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_SCRIPTS))
sys.path.insert(0, _SCRIPTS)

# pylint: disable=g-import-not-at-top,wrong-import-position
import bench_common
import jax
import numpy as np

from vpr_jax.evaluation import descriptors

from vpr_jax.evaluation import search
from vpr_jax.models import vpr_model
# pylint: enable=g-import-not-at-top,wrong-import-position

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIGS = ('configs/mixvpr.py', 'configs/mixvpr_r50.py')
SFXS_TEST = (27_191, 1_000, 1024)
TINY_FAISS = (2_000, 100, 64)
FAISS_K = max(search.RECALL_NS)


def load_config(path: str):
  """get_config() of a config file (configs/*.py import `configs.default`)."""
  if _REPO not in sys.path:
    sys.path.insert(0, _REPO)
  full = path if os.path.isabs(path) else os.path.join(_REPO, path)
  if not os.path.isfile(full):
    raise FileNotFoundError(f'config file {path!r} not found (looked at {full})')
  spec = importlib.util.spec_from_file_location(
      f'bench_config_{os.path.splitext(os.path.basename(full))[0]}', full)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ValueError(f'config file {path!r} has no get_config()')
  return module.get_config()


# (a) FAISS.


def random_unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
  x = rng.standard_normal((n, dim)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench_faiss(num_database: int, num_queries: int, dim: int, repeats: int = 3,
                seed: int = 0) -> dict:
  """Best-of-`repeats` wall time of `search.search` (index build + search, k=25)."""
  rng = np.random.default_rng(seed)
  database = random_unit_vectors(rng, num_database, dim)
  queries = random_unit_vectors(rng, num_queries, dim)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    _, predictions = search.search(database, queries, FAISS_K)
    times.append(time.perf_counter() - start)
  if predictions.shape != (num_queries, min(FAISS_K, num_database)):
    raise RuntimeError(f'unexpected FAISS result shape {predictions.shape}')
  return {'problem': f'{num_database}x{num_queries}x{dim}', 'num_database': num_database,
          'num_queries': num_queries, 'dim': dim, 'k': FAISS_K, 'seconds': min(times),
          'seconds_all': times}


# (b) vpr_jax eval forward.


def _time_calls(call, warmup: int, iters: int) -> float:
  """Seconds per call after `warmup` untimed calls; each call's result is waited for."""
  for _ in range(warmup):
    jax.block_until_ready(call())
  start = time.perf_counter()
  outs = [call() for _ in range(iters)]
  jax.block_until_ready(outs)
  return (time.perf_counter() - start) / iters


def bench_vpr_jax(config, batch_size: int, warmup: int, iters: int, seed: int = 0) -> dict:
  """img/s of vpr_jax's jitted eval forward on device-resident uint8 batches."""
  model = vpr_model.build_model(config)
  h, w = (int(s) for s in config.image_size)
  variables = vpr_model.init_variables(model, jax.random.PRNGKey(seed), (h, w))
  embed = descriptors.make_embed_fn(model)
  device = jax.local_devices()[0]
  variables = jax.device_put(variables, device)
  rng = np.random.default_rng(seed)
  batch = jax.device_put(rng.integers(0, 256, (batch_size, h, w, 3), dtype=np.uint8), device)
  seconds = _time_calls(lambda: embed(variables, batch), warmup, iters)
  outputs = np.asarray(embed(variables, batch))
  norms = np.linalg.norm(outputs, axis=1)
  if not np.allclose(norms, 1.0, atol=1e-3):
    raise RuntimeError(f'vpr_jax descriptors are not unit vectors (norms {norms[:4]}...)')
  return {'img_per_s': batch_size / seconds, 'seconds_per_batch': seconds,
          'dtype': str(np.dtype(vpr_model.resolve_dtype(config.model.dtype))),
          'descriptor_dim': int(outputs.shape[1])}


def peak_device_memory() -> int | None:
  """Peak bytes in use on the first device, or None where the backend does not say."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  if not stats:
    return None
  return stats.get('peak_bytes_in_use')


# (c) PyTorch reference (only here, never in the package).


def build_torch_reference(config):
  """torchvision ResNet cropped after the last kept stage + MixVPR, as the PyTorch family."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top

  mc = config.model
  if mc.aggregator != 'mixvpr':
    raise NotImplementedError(f'the reference covers MixVPR only, not {mc.aggregator!r}')

  class FeatureMixerLayer(nn.Module):
    """x + MLP(LayerNorm(x)) over the flattened spatial axis."""

    def __init__(self, in_dim, mlp_ratio):
      super().__init__()
      hidden = int(in_dim * mlp_ratio)
      self.mix = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.ReLU(),
                               nn.Linear(hidden, in_dim))

    def forward(self, x):
      return x + self.mix(x)

  class MixVPR(nn.Module):
    """Feature mixing over H*W, then channel and row projections, flattened and L2-normalised."""

    def __init__(self, in_channels, in_h, in_w, out_channels, mix_depth, mlp_ratio, out_rows):
      super().__init__()
      hw = in_h * in_w
      self.mix = nn.Sequential(*[FeatureMixerLayer(hw, mlp_ratio) for _ in range(mix_depth)])
      self.channel_proj = nn.Linear(in_channels, out_channels)
      self.row_proj = nn.Linear(hw, out_rows)

    def forward(self, x):
      x = self.mix(x.flatten(2))
      x = self.channel_proj(x.permute(0, 2, 1))
      x = self.row_proj(x.permute(0, 2, 1))
      return nn.functional.normalize(x.flatten(1), p=2, dim=-1)

  depth = vpr_model.backbone_depth(mc)
  resnet = getattr(torchvision.models, f'resnet{depth}')(weights=None)
  stages = [resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool]
  crop = set(int(c) for c in mc.layers_to_crop)
  stages += [getattr(resnet, f'layer{i}') for i in range(1, 5) if i not in crop]
  h, w, c = vpr_model.backbone_output_shape(mc, config.image_size)
  aggregator = MixVPR(c, h, w, int(mc.mixvpr_out_channels), int(mc.mixvpr_mix_depth),
                      float(mc.mixvpr_mlp_ratio), int(mc.mixvpr_out_rows))

  class Reference(nn.Module):

    def __init__(self):
      super().__init__()
      self.backbone = nn.Sequential(*stages)
      self.aggregator = aggregator
      self.register_buffer('mean', torch.tensor(vpr_model.IMAGENET_MEAN).view(1, 3, 1, 1))
      self.register_buffer('std', torch.tensor(vpr_model.IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, images_uint8_nchw):
      x = (images_uint8_nchw.float() / 255.0 - self.mean) / self.std
      return self.aggregator(self.backbone(x))

  return Reference()


def bench_torch(config, batch_size: int, warmup: int, iters: int, channels_last: bool,
                seed: int = 0) -> dict:
  """img/s of the PyTorch reference eval forward (fp16 autocast on CUDA, float32 on CPU)."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  model = build_torch_reference(config).to(device).eval()
  h, w = (int(s) for s in config.image_size)
  batch = torch.randint(0, 256, (batch_size, 3, h, w), dtype=torch.uint8, device=device)
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
    batch = batch.contiguous(memory_format=torch.channels_last)
  use_amp = device.type == 'cuda'

  def call():
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16,
                                                enabled=use_amp):
      return model(batch)

  def sync():
    if device.type == 'cuda':
      torch.cuda.synchronize()

  for _ in range(warmup):
    call()
  sync()
  start = time.perf_counter()
  for _ in range(iters):
    out = call()
  sync()
  seconds = (time.perf_counter() - start) / iters
  return {'img_per_s': batch_size / seconds, 'seconds_per_batch': seconds,
          'dtype': 'float16 (autocast)' if use_amp else 'float32',
          'channels_last': bool(channels_last), 'descriptor_dim': int(out.shape[1]),
          'torch': torch.__version__, 'device': str(device)}


# Driver.


def format_table(rows) -> str:
  """config, batch, vpr_jax img/s, reference img/s, ratio."""
  lines = []
  for r in rows:
    ratio = r.get('ratio')
    lines.append((r['config'], str(r['batch']),
                  bench_common.format_rate(r.get('vpr_jax_img_per_s')),
                  bench_common.format_rate(r.get('reference_img_per_s')),
                  f'{ratio:.2f}x' if ratio is not None else 'n/a'))
  return bench_common.format_table(
      ('config', 'batch', 'vpr_jax img/s', 'reference img/s', 'ratio'), lines)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--configs', default=None,
                      help='comma-separated config files (default: the seed and the MixVPR-paper '
                      'recipes; --tiny: the seed only)')
  parser.add_argument('--batch_size', '--batch-size', type=int, default=None,
                      help='images per forward (default 256; --tiny: 4)')
  parser.add_argument('--image_size', '--image-size', type=int, default=None,
                      help='square input size overriding the configs (default: theirs; --tiny: '
                      '64)')
  parser.add_argument('--warmup', type=int, default=None, help='untimed calls (default 3)')
  parser.add_argument('--iters', type=int, default=None, help='timed calls (default 20)')
  parser.add_argument('--tiny', action='store_true',
                      help='CPU smoke run: small images, batch, iterations and FAISS problem')
  parser.add_argument('--faiss_full', '--faiss-full', action='store_true',
                      help='with --tiny: also time the full SF-XS test-sized FAISS problem')
  parser.add_argument('--channels_last', '--channels-last', action='store_true',
                      help='run the PyTorch reference in channels_last memory format')
  parser.add_argument('--no_reference', '--no-reference', action='store_true',
                      help='skip the PyTorch reference even if torch is installed')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--output', default='', help='also write the results to this JSON file')
  args = parser.parse_args(argv)
  tiny = args.tiny
  args.configs = (args.configs.split(',') if args.configs
                  else [DEFAULT_CONFIGS[0]] if tiny else list(DEFAULT_CONFIGS))
  args.batch_size = args.batch_size or (4 if tiny else 256)
  args.image_size = args.image_size or (64 if tiny else None)
  args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
  args.iters = args.iters if args.iters is not None else (2 if tiny else 20)
  if args.batch_size <= 0 or args.iters <= 0 or args.warmup < 0:
    parser.error('--batch_size and --iters must be positive, --warmup non-negative')
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  device = jax.local_devices()[0]
  print(f'JAX {jax.__version__} on {device.platform}: {device.device_kind}', flush=True)

  faiss_problems = [TINY_FAISS] if args.tiny else []
  if not args.tiny or args.faiss_full:
    faiss_problems.append(SFXS_TEST)
  faiss_results = []
  for problem in faiss_problems:
    result = bench_faiss(*problem, repeats=1 if args.tiny else 3, seed=args.seed)
    faiss_results.append(result)
    print(f'FAISS exact search {result["problem"]} (k={FAISS_K}, CPU): '
          f'{result["seconds"]:.3f} s', flush=True)

  have_torch = importlib.util.find_spec('torch') is not None and not args.no_reference
  rows = []
  for path in args.configs:
    config = load_config(path)
    if args.image_size:
      config.image_size = (args.image_size, args.image_size)
    name = os.path.splitext(os.path.basename(path))[0]
    row = {'config': name, 'config_file': path, 'batch': args.batch_size,
           'image_size': list(config.image_size)}
    jax_result = bench_vpr_jax(config, args.batch_size, args.warmup, args.iters, args.seed)
    row.update({'vpr_jax_img_per_s': jax_result['img_per_s'], 'vpr_jax': jax_result})
    row['peak_device_bytes_after'] = peak_device_memory()
    if have_torch:
      try:
        ref = bench_torch(config, args.batch_size, args.warmup, args.iters, args.channels_last,
                          args.seed)
        if ref['descriptor_dim'] != jax_result['descriptor_dim']:
          raise RuntimeError(f'{name}: the reference gives {ref["descriptor_dim"]}-d '
                             f'descriptors, vpr_jax {jax_result["descriptor_dim"]}-d')
        row.update({'reference_img_per_s': ref['img_per_s'], 'reference': ref,
                    'ratio': jax_result['img_per_s'] / ref['img_per_s']})
      except NotImplementedError as e:
        row['reference'] = {'skipped': str(e)}
    rows.append(row)
    rate, reference_rate = (bench_common.format_rate(row['vpr_jax_img_per_s']),
                            bench_common.format_rate(row.get('reference_img_per_s')))
    print(f'{name}: vpr_jax {rate} img/s ({jax_result["dtype"]}), reference {reference_rate} '
          'img/s', flush=True)

  print()
  print(format_table(rows))
  peak = rows[-1]['peak_device_bytes_after'] if rows else None
  print(f'\nPeak device memory (after {rows[-1]["config"] if rows else "-"}): '
        + (f'{peak / 2**30:.2f} GiB' if peak is not None else 'n/a (not reported by '
           f'{device.platform})'))
  results = {
      'jax': jax.__version__, 'platform': device.platform, 'device': device.device_kind,
      'host': platform.node(), 'tiny': args.tiny, 'warmup': args.warmup, 'iters': args.iters,
      'channels_last': args.channels_last, 'faiss': faiss_results, 'rows': rows,
      'peak_device_bytes': peak,
  }
  if args.output:
    bench_common.write_json(args.output, results)
  return results


if __name__ == '__main__':
  main()
