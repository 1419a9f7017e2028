"""The PyTorch reference train step that `bench_train_compute.py` compares vpr_jax's with.

torchvision ResNet cropped as configured + the MixVPR module of scripts/bench_eval.py,
pytorch-metric-learning MultiSimilarityLoss + MultiSimilarityMiner, AdamW, fp16 autocast +
GradScaler on CUDA (Lightning's 16-mixed precision), as the PyTorch family trains. It lives only
in the benchmark scripts, never in the package; without torch, torchvision or
pytorch-metric-learning the compute mode skips it with a note. Not a script of its own.
"""

import importlib.util
import os
import sys
import time

_SCRIPTS = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_SCRIPTS)
for _path in (_REPO, _SCRIPTS):
  if _path not in sys.path:
    sys.path.insert(0, _path)

# pylint: disable=g-import-not-at-top,wrong-import-position
import bench_eval
import bench_train_common
# pylint: enable=g-import-not-at-top,wrong-import-position

REFERENCE_VARIANTS = bench_train_common.REFERENCE_VARIANTS
# Frozen stage -> positions in the reference backbone nn.Sequential(conv1, bn1, relu, maxpool,
# layer1, layer2, layer3, layer4).
_TORCH_FROZEN_MODULES = {0: (0, 1), 1: (4,), 2: (5,), 3: (6,)}


def reference_available() -> tuple[bool, str]:
  """(True, '') when torch, torchvision and pytorch-metric-learning import; else why not."""
  for name in ('torch', 'torchvision', 'pytorch_metric_learning'):
    if importlib.util.find_spec(name) is None:
      return False, f'{name} is not installed'
  return True, ''


def reference_variants(args) -> list[str]:
  """The variants --reference asks for (default: all three on CUDA, eager on CPU)."""
  if args.reference is not None:
    return [v for v in args.reference if v != 'none']
  import torch  # pylint: disable=g-import-not-at-top
  return list(REFERENCE_VARIANTS) if torch.cuda.is_available() else ['eager']


def _check_recipe(config, variant: str) -> None:
  """Refuses what the reference does not implement (it covers the seed's loss and optimiser)."""
  if variant not in REFERENCE_VARIANTS:
    raise ValueError(f'unknown reference variant {variant!r}; valid: {REFERENCE_VARIANTS}')
  if (config.loss.name, config.loss.miner_name) != ('MultiSimilarityLoss',
                                                    'MultiSimilarityMiner'):
    raise NotImplementedError(f'the reference step covers MultiSimilarityLoss + '
                              f'MultiSimilarityMiner, not {config.loss.name} + '
                              f'{config.loss.miner_name}')
  if config.optim.optimizer != 'adamw':
    raise NotImplementedError(f'the reference step uses AdamW, not {config.optim.optimizer}')


class ReferenceStep:
  """One PyTorch train step of a config: forward, miner and loss, scaled backward, AdamW."""

  def __init__(self, config, variant: str, device):
    # Optional: only imported when the reference runs. pylint: disable=g-import-not-at-top
    import torch
    from pytorch_metric_learning import distances as pml_distances
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning import miners as pml_miners
    # pylint: enable=g-import-not-at-top

    self.device = device
    model = bench_eval.build_torch_reference(config).to(device).train()
    # As the family freezes stages: no gradient, BatchNorm still in train mode.
    for stage in range(int(config.model.layers_to_freeze) + 1):
      for position in _TORCH_FROZEN_MODULES[stage]:
        if position < len(model.backbone):
          model.backbone[position].requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    self.optimizer = torch.optim.AdamW(params, lr=float(config.optim.learning_rate),
                                       weight_decay=float(config.optim.weight_decay))
    loss_params = dict(config.loss.params)
    self.loss_fn = pml_losses.MultiSimilarityLoss(
        alpha=float(loss_params.get('alpha', 1.0)), beta=float(loss_params.get('beta', 50.0)),
        base=float(loss_params.get('base', 0.0)), distance=pml_distances.DotProductSimilarity())
    self.miner = pml_miners.MultiSimilarityMiner(
        epsilon=float(dict(config.loss.miner_params).get('epsilon', 0.1)),
        distance=pml_distances.CosineSimilarity())
    self.use_amp = device.type == 'cuda'
    self.scaler = torch.amp.GradScaler(device.type, enabled=self.use_amp)
    self.channels_last = variant in ('channels_last', 'compile')
    if self.channels_last:
      model = model.to(memory_format=torch.channels_last)
    self.model = model
    self.forward = torch.compile(model) if variant == 'compile' else model

  def __call__(self, images, labels):
    """One step on a uint8 NCHW batch; returns the loss (on the device, not synchronised)."""
    import torch  # pylint: disable=g-import-not-at-top
    self.optimizer.zero_grad(set_to_none=True)
    # Lightning's 16-mixed precision: forward, miner and loss under autocast, scaled backward.
    with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
      descriptors = self.forward(images)
      pairs = self.miner(descriptors, labels)
      loss = self.loss_fn(descriptors, labels, pairs)
    self.scaler.scale(loss).backward()
    self.scaler.step(self.optimizer)
    self.scaler.update()
    return loss

  def sync(self):
    """Waits for the device (CUDA runs asynchronously)."""
    import torch  # pylint: disable=g-import-not-at-top
    if self.device.type == 'cuda':
      torch.cuda.synchronize()


def random_batches(config, device, seed: int, channels_last: bool):
  """Two uint8 NCHW batches of random images (alternated: nothing reused) and their labels."""
  import torch  # pylint: disable=g-import-not-at-top
  p, k = int(config.data.places_per_batch), int(config.data.images_per_place)
  h, w = (int(s) for s in config.image_size)
  generator = torch.Generator(device=device).manual_seed(seed)
  batches = []
  for _ in range(2):
    images = torch.randint(0, 256, (p * k, 3, h, w), dtype=torch.uint8, device=device,
                           generator=generator)
    if channels_last:
      images = images.contiguous(memory_format=torch.channels_last)
    batches.append(images)
  return batches, torch.arange(p, device=device).repeat_interleave(k)


def bench_torch_step(config, variant: str, warmup: int, steps: int, seed: int = 0) -> dict:
  """img/s of the PyTorch family's train step: fp16 AMP on CUDA (float32 on CPU).

  Args:
    config: the (overridden) config; the seed's loss and miner (MultiSimilarity) only.
    variant: 'eager', 'channels_last' or 'compile' (channels_last + torch.compile).
    warmup: untimed steps (the first compiles, for 'compile').
    steps: timed steps.
    seed: torch seed.

  Returns:
    A dict with img_per_s, seconds_per_step, peak memory on CUDA, versions.
  """
  import torch  # pylint: disable=g-import-not-at-top
  _check_recipe(config, variant)
  torch.manual_seed(seed)
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  step = ReferenceStep(config, variant, device)
  batches, labels = random_batches(config, device, seed, step.channels_last)
  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  start = time.perf_counter()
  step(batches[0], labels)
  step.sync()
  first_step_seconds = time.perf_counter() - start
  for i in range(warmup):
    step(batches[i % 2], labels)
  step.sync()
  start = time.perf_counter()
  for i in range(steps):
    loss = step(batches[i % 2], labels)
  step.sync()
  seconds = time.perf_counter() - start
  images = bench_train_common.batch_images(config)
  result = {
      'variant': variant,
      'img_per_s': images * steps / seconds,
      'seconds_per_step': seconds / steps,
      'first_step_seconds': first_step_seconds,
      'dtype': 'float16 (autocast) + GradScaler' if step.use_amp else 'float32',
      'channels_last': step.channels_last,
      'compiled': variant == 'compile',
      'loss': float(loss.detach().float().cpu()),
      'torch': torch.__version__,
      'device': torch.cuda.get_device_name() if step.use_amp else 'cpu',
  }
  if device.type == 'cuda':
    result['peak_device_bytes'] = int(torch.cuda.max_memory_allocated())
  del step, batches
  if device.type == 'cuda':
    torch.cuda.empty_cache()
  return result
