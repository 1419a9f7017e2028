"""ResNet backbones laid out exactly as torchvision's, in NHWC, with cropping and freezing.

The module tree mirrors torchvision's names so that checkpoints convert one to one:
`conv1`, `bn1`, `layer1`..`layer4`, each stage holding blocks named '0', '1', ..., each block
holding `conv1`, `bn1`, `conv2`, `bn2` (`conv3`, `bn3` for bottlenecks) and, where the shape
changes, `downsample_conv` + `downsample_bn` (torchvision's `downsample.0` / `downsample.1`).

Stage indices follow the gsv-cities family: stage 0 is the stem (conv1 + bn1), stages 1-4 are
layer1..layer4. `layers_to_crop` removes stages from the end; `layers_to_freeze` = k freezes stages
0..k (-1 freezes nothing).
"""

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# (block kind, blocks per stage) per depth, as torchvision builds them.
RESNET_SPECS = {
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
}
STAGE_NAMES = ('layer1', 'layer2', 'layer3', 'layer4')
# Names of the top-level modules of each freezable stage (0: stem, 1..3: layer1..layer3).
FREEZABLE_STAGES = {0: ('conv1', 'bn1'), 1: ('layer1',), 2: ('layer2',), 3: ('layer3',)}
_STAGE_WIDTHS = (64, 128, 256, 512)
_EXPANSION = {'basic': 1, 'bottleneck': 4}

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu'), an untruncated normal.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _check_depth(depth: int) -> None:
  if depth not in RESNET_SPECS:
    raise ValueError(f'Unsupported ResNet depth {depth!r}; valid depths: {sorted(RESNET_SPECS)}.')


def _check_crop(layers_to_crop: Sequence[int]) -> tuple[int, ...]:
  crop = tuple(sorted(int(i) for i in layers_to_crop))
  if crop not in ((), (4,), (3, 4)):
    raise ValueError(
        f'layers_to_crop={tuple(layers_to_crop)!r} is not supported: use (), (4,) or (3, 4) '
        '(stages are removed from the end of the network).')
  return crop


def kept_stages(layers_to_crop: Sequence[int]) -> tuple[str, ...]:
  """Names of the residual stages kept after cropping, e.g. ('layer1', 'layer2', 'layer3')."""
  crop = _check_crop(layers_to_crop)
  return tuple(name for i, name in enumerate(STAGE_NAMES, start=1) if i not in crop)


def resnet_out_channels(depth: int, layers_to_crop: Sequence[int] = ()) -> int:
  """Channels of the last kept stage.

  Args:
    depth: 18, 34, 50 or 101.
    layers_to_crop: stages removed from the end, () / (4,) / (3, 4).

  Returns:
    The channel count of the backbone output (ResNet-18 with (4,): 256).
  """
  _check_depth(depth)
  block, _ = RESNET_SPECS[depth]
  last = len(kept_stages(layers_to_crop))
  return _STAGE_WIDTHS[last - 1] * _EXPANSION[block]


def _halve(size: int) -> int:
  # Output size of every stride-2 op in the network (7x7 pad 3, 3x3 pad 1): floor((n-1)/2)+1.
  return (size - 1) // 2 + 1


def resnet_out_hw(image_size: Sequence[int], layers_to_crop: Sequence[int] = ()) -> tuple[int, int]:
  """Spatial size of the backbone output for an input of `image_size` (H, W).

  Args:
    image_size: input height and width in pixels.
    layers_to_crop: stages removed from the end.

  Returns:
    (h, w) of the last kept stage (224x224 with (4,): 14x14).
  """
  # conv1, maxpool, then one stride-2 stage per kept stage after layer1.
  num_halvings = 2 + len(kept_stages(layers_to_crop)) - 1
  h, w = (int(s) for s in image_size)
  for _ in range(num_halvings):
    h, w = _halve(h), _halve(w)
  return h, w


def conv1x1_output_moments(inputs: jax.Array, kernel: jax.Array, dtype: Any) -> jax.Array:
  """Per-channel mean and mean square of conv1x1(inputs, kernel) over all axes but the first
  and the last, computed from the inputs: mean(y) = mean(x) @ W and mean(y^2)_c =
  sum_ij W_ic W_jc mean(x_i x_j), with the kernel in the conv's compute `dtype`.

  For a stride-1 1x1 convolution with more output than input channels this reads the smaller
  input once (a [C_in, C_in] Gram matrix) instead of the conv's output. The products of the
  compute-dtype values are exact in float32, so the moments are those of the unrounded conv
  output. Returns [2, G, C_out] for inputs [G, ..., C_in], as `BatchNorm` stacks its moments.
  """
  groups, channels = inputs.shape[0], inputs.shape[-1]
  # float32 at least (float64 inputs keep float64).
  stats_dtype = jnp.promote_types(dtype, jnp.float32)
  rows = inputs.reshape(groups, -1, channels)
  weights = kernel.reshape(channels, -1).astype(dtype).astype(stats_dtype)
  mean_inputs = jnp.mean(rows.astype(stats_dtype), axis=1)
  gram = jnp.einsum('gmi,gmj->gij', rows, rows, preferred_element_type=stats_dtype) / rows.shape[1]
  mean = mean_inputs @ weights
  mean_square = jnp.einsum('gij,jc,ic->gc', gram, weights, weights)
  return jnp.stack([mean, mean_square])


class BatchNorm(nn.Module):
  """BatchNorm2d with torchvision semantics over the N, H, W axes of NHWC inputs.

  Unlike flax.linen.BatchNorm, the running variance is updated with the unbiased batch variance
  (as torch does); statistics are float32 whatever the compute dtype. float32 (and float64)
  inputs get the variance in two passes, as before; bfloat16 / float16 inputs get the mean and
  the mean square in one pass (one read of the activation less, and under data parallelism one
  collective for both): the inputs are exact in float32, and the cancellation error of
  E[x^2] - E[x]^2 in float32 (~1e-7 relative times mean^2 / var) stays far below the input's own
  rounding (2^-8).

  Attributes:
    momentum: running-statistics decay in flax terms (0.9 == torch momentum 0.1).
    epsilon: added to the variance.
    dtype: output dtype.
    use_running_stats_in_train: normalise with (and keep) the running statistics in train mode.
    axis_name: pmap axis to average batch statistics over (None under jit, where XLA's SPMD
      partitioner already reduces over the global batch).
    sync: True: statistics of the global batch (every device normalises alike, the one-device
      result). False: each device normalises with the statistics of its own images, as PyTorch
      DDP without SyncBatchNorm; the running statistics then move by the mean over devices of
      the per-device statistics.
    groups: under jit with sync=False, the number of devices: the batch is split into this many
      consecutive groups (the devices' shards) normalised separately.
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  use_running_stats_in_train: bool = False
  axis_name: Optional[str] = None
  sync: bool = True
  groups: int = 1

  def _batch_stats(self, x: Optional[jax.Array], conv_input=None) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean and biased variance over all axes but the first and the last.

    x: the grouped input [G, N / G, ..., C], or None with conv_input.
    conv_input: (grouped input, kernel) of the stride-1 1x1 conv whose output is normalised:
      the moments come from that input (`conv1x1_output_moments`).
    """
    synced = self.axis_name if self.sync else None
    if conv_input is not None:
      moments = conv1x1_output_moments(*conv_input, conv_input[0].dtype)
    elif jnp.finfo(x.dtype).bits < 32:
      xs, axes = x.astype(jnp.float32), tuple(range(1, x.ndim - 1))
      moments = jnp.stack([jnp.mean(xs, axis=axes), jnp.mean(jnp.square(xs), axis=axes)])
    else:
      return self._two_pass_stats(x, synced)
    if synced is not None:
      moments = jax.lax.pmean(moments, synced)
    mean, mean_square = moments[0], moments[1]
    return mean, jnp.maximum(mean_square - jnp.square(mean), 0.0)

  def _two_pass_stats(self, x: jax.Array, synced: Optional[str]) -> tuple[jax.Array, jax.Array]:
    """Mean, then the variance around it (float32 / float64 inputs, as torch)."""
    xs = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    axes = tuple(range(1, x.ndim - 1))
    mean = jnp.mean(xs, axis=axes, keepdims=True)
    if synced is not None:
      mean = jax.lax.pmean(mean, synced)
    var = jnp.mean(jnp.square(xs - mean), axis=axes)
    if synced is not None:
      var = jax.lax.pmean(var, synced)
    return jnp.squeeze(mean, axes), var

  def _update_running_stats(self, running, mean, var, count) -> None:
    """Moves the running statistics (mean, var variables) towards the batch's (torch's unbiased
    running variance)."""
    ra_mean, ra_var = running
    if self.axis_name is not None and self.sync:
      count = count * jax.lax.psum(1, self.axis_name)
    # torch tracks the unbiased variance while normalising with the biased one.
    unbiased = var * (count / jnp.maximum(count - 1, 1))
    new_mean, new_var = jnp.mean(mean, axis=0), jnp.mean(unbiased, axis=0)
    if self.axis_name is not None and not self.sync:
      new_mean, new_var = jax.lax.pmean((new_mean, new_var), self.axis_name)
    ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * new_mean
    ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * new_var

  @nn.compact
  def __call__(self, x: Optional[jax.Array], train: bool, conv_input=None):
    """Normalises x [N, ..., C].

    Args:
      x: the input; None with conv_input, to get the normalisation itself (see below).
      train: batch statistics (and running-statistics updates) when True.
      conv_input: with x None, (input [N, ..., C_in], kernel [1, 1, C_in, C]) of the stride-1
        1x1 convolution whose output is normalised: the batch statistics come from that input
        (`conv1x1_output_moments`), without the output being computed.

    Returns:
      The normalised x in `dtype`; with x None, (multiplier [G, C], shift [G, C]) such that
      the BatchNorm of the conv's output is conv(input) * multiplier + shift (G groups).
    """
    if (x is None) == (conv_input is None):
      raise ValueError('BatchNorm takes either x or conv_input.')
    values = x if x is not None else conv_input[0]
    features = x.shape[-1] if x is not None else conv_input[1].shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    # Groups matter only for batch statistics (initialisation runs on a batch of one).
    per_device = not self.sync and train and not self.use_running_stats_in_train
    groups = self.groups if per_device and not self.is_initializing() else 1
    if values.shape[0] % groups:
      raise ValueError(f'A batch of {values.shape[0]} does not split into {groups} BatchNorm '
                       'groups.')
    # [G, N / G, ...]: statistics per group (G = 1: the whole batch).
    split = lambda a: a.reshape((groups, a.shape[0] // groups) + a.shape[1:])
    grouped = split(x) if x is not None else None

    if train and not self.use_running_stats_in_train:
      if conv_input is not None:
        conv_input = (split(conv_input[0]), conv_input[1])
      mean, var = self._batch_stats(grouped, conv_input)
      if not self.is_initializing():
        # Positions per group: a stride-1 1x1 conv keeps its input's.
        self._update_running_stats((ra_mean, ra_var), mean, var,
                                   split(values)[0].size // values.shape[-1])
    else:
      mean, var = ra_mean.value[None], ra_var.value[None]

    # One per-channel multiply-add (folded in float32) instead of four elementwise passes.
    multiplier = scale * jax.lax.rsqrt(var + self.epsilon)
    shift = bias - mean * multiplier
    if x is None:
      return multiplier, shift
    expand = lambda v: v.reshape((v.shape[0],) + (1,) * (x.ndim - 1) + (features,))
    # In at least float32 (float64 inputs keep float64).
    y = grouped.astype(jnp.promote_types(x.dtype, jnp.float32)) * expand(multiplier) + expand(shift)
    return y.reshape(x.shape).astype(self.dtype)


def _conv(features: int, kernel: int, stride: int, padding: int, dtype: Any, name: str):
  return nn.Conv(
      features, (kernel, kernel), strides=(stride, stride),
      padding=((padding, padding), (padding, padding)), use_bias=False, dtype=dtype,
      param_dtype=jnp.float32, kernel_init=conv_kernel_init, name=name)


def _block_batch_norm(block: nn.Module, name: str) -> BatchNorm:
  """A BatchNorm of a residual block, with the block's dtype, freezing and pmap axis."""
  return BatchNorm(dtype=block.dtype, use_running_stats_in_train=block.frozen_bn,
                   axis_name=block.bn_axis_name, sync=block.bn_sync, groups=block.bn_groups,
                   name=name)


class BasicBlock(nn.Module):
  """torchvision BasicBlock: 3x3 (stride) -> 3x3, identity or 1x1 downsample shortcut."""
  features: int
  stride: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32
  frozen_bn: bool = False
  bn_axis_name: Optional[str] = None
  bn_sync: bool = True
  bn_groups: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = functools.partial(_block_batch_norm, self)
    y = _conv(self.features, 3, self.stride, 1, self.dtype, 'conv1')(x)
    y = nn.relu(bn('bn1')(y, train))
    y = _conv(self.features, 3, 1, 1, self.dtype, 'conv2')(y)
    y = bn('bn2')(y, train)
    shortcut = x
    if self.downsample:
      shortcut = _conv(self.features, 1, self.stride, 0, self.dtype, 'downsample_conv')(x)
      shortcut = bn('downsample_bn')(shortcut, train)
    return nn.relu(y + shortcut)


class ConvKernel(nn.Module):
  """The kernel of a bias-free nn.Conv ('kernel' [kh, kw, C_in, C_out], the same init)."""
  features: int
  kernel_size: int = 1

  @nn.compact
  def __call__(self, in_features: int) -> jax.Array:
    shape = (self.kernel_size, self.kernel_size, in_features, self.features)
    return self.param('kernel', conv_kernel_init, shape, jnp.float32)


class Bottleneck(nn.Module):
  """torchvision Bottleneck (v1.5): 1x1 -> 3x3 (stride) -> 1x1 (x4), 1x1 downsample shortcut.

  fold_batch_norm: in train mode with batch statistics, the BatchNorms after the stride-1 1x1
  convolutions that widen (conv3; layer1's downsample) are folded into them: statistics from
  the convolution's input (a [C_in, C_in] Gram matrix, `conv1x1_output_moments`), then one
  convolution with the kernel scaled per output channel, plus the shift. The same function and
  gradient; the 4x wider output is never normalised in a pass of its own (nor read for its
  statistics, nor for their gradient). None (default): for bf16 / f16 compute only (float32
  keeps torch's order of operations); with per-device statistics under jit (bn_groups > 1)
  never.
  """
  features: int
  stride: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32
  frozen_bn: bool = False
  bn_axis_name: Optional[str] = None
  bn_sync: bool = True
  bn_groups: int = 1
  fold_batch_norm: Optional[bool] = None

  def _folds(self, inputs: jax.Array, features: int, stride: int, train: bool) -> bool:
    """Whether conv (1x1, stride) -> BatchNorm is folded here (see the class docstring)."""
    wanted = (jnp.finfo(self.dtype).bits < 32 if self.fold_batch_norm is None
              else self.fold_batch_norm)
    return (wanted and train and not self.frozen_bn and stride == 1
            and inputs.shape[-1] < features and (self.bn_sync or self.bn_groups == 1))

  def _conv1x1_bn(self, inputs, features, stride, train, conv_name, bn_name):
    """BatchNorm(conv1x1(inputs)), folded into one convolution where `_folds`."""
    batch_norm = _block_batch_norm(self, bn_name)
    if not self._folds(inputs, features, stride, train):
      return batch_norm(_conv(features, 1, stride, 0, self.dtype, conv_name)(inputs), train)
    kernel = ConvKernel(features, name=conv_name)(inputs.shape[-1])
    multiplier, shift = batch_norm(None, train, conv_input=(inputs, kernel))
    y = jax.lax.conv_general_dilated(
        inputs.astype(self.dtype), (kernel * multiplier[0]).astype(self.dtype), (1, 1),
        'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y + shift[0].astype(self.dtype)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = functools.partial(_block_batch_norm, self)
    out_features = self.features * _EXPANSION['bottleneck']
    y = _conv(self.features, 1, 1, 0, self.dtype, 'conv1')(x)
    y = nn.relu(bn('bn1')(y, train))
    y = _conv(self.features, 3, self.stride, 1, self.dtype, 'conv2')(y)
    y = nn.relu(bn('bn2')(y, train))
    y = self._conv1x1_bn(y, out_features, 1, train, 'conv3', 'bn3')
    shortcut = x
    if self.downsample:
      shortcut = self._conv1x1_bn(x, out_features, self.stride, train, 'downsample_conv',
                                  'downsample_bn')
    return nn.relu(y + shortcut)


class ResNetStage(nn.Module):
  """One torchvision `layerN`: blocks named '0', '1', ...; the first one strides/downsamples."""
  block: str
  num_blocks: int
  features: int
  stride: int
  in_features: int
  dtype: Any = jnp.float32
  frozen_bn: bool = False
  bn_axis_name: Optional[str] = None
  bn_sync: bool = True
  bn_groups: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    block_cls = BasicBlock if self.block == 'basic' else Bottleneck
    out_features = self.features * _EXPANSION[self.block]
    for i in range(self.num_blocks):
      first = i == 0
      x = block_cls(
          features=self.features,
          stride=self.stride if first else 1,
          downsample=first and (self.stride != 1 or self.in_features != out_features),
          dtype=self.dtype, frozen_bn=self.frozen_bn, bn_axis_name=self.bn_axis_name,
          bn_sync=self.bn_sync, bn_groups=self.bn_groups, name=str(i))(x, train)
    return x


class ResNet(nn.Module):
  """torchvision ResNet-18/34/50/101 without avgpool/fc, NHWC, returning every stage's output.

  Attributes:
    depth: 18, 34, 50 or 101.
    layers_to_crop: stages removed from the end: (), (4,) or (3, 4).
    layers_to_freeze: -1 (none) or k in 0..3: stages 0..k get no gradient
      (`jax.lax.stop_gradient` on the output of stage k, so no backward pass runs through them).
      Their parameters must also be masked out of the optimizer (see `frozen_param_mask`).
    freeze_bn_stats: frozen stages' BatchNorms use and keep their running statistics in train mode
      (default False, as the gsv-cities family: they use batch statistics and update the running
      ones).
    dtype: compute dtype (parameters and BatchNorm statistics stay float32).
    bn_axis_name: pmap axis name for cross-device batch statistics (None under jit).
    bn_sync: BatchNorm statistics of the global batch (True) or of each device's images.
    bn_groups: with bn_sync=False under jit, the number of devices (see `BatchNorm.groups`).
  """
  depth: int = 18
  layers_to_crop: Sequence[int] = ()
  layers_to_freeze: int = -1
  freeze_bn_stats: bool = False
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None
  bn_sync: bool = True
  bn_groups: int = 1

  def frozen_bn_stages(self) -> tuple[str, ...]:
    """Top-level module names whose BatchNorms run on running statistics in train mode."""
    if not self.freeze_bn_stats:
      return ()
    names = []
    for stage in range(self.layers_to_freeze + 1):
      names.extend(FREEZABLE_STAGES[stage])
    return tuple(names)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """Runs the backbone.

    Args:
      x: normalised images [B, H, W, 3].
      train: batch statistics (and running-stat updates) in BatchNorm when True.

    Returns:
      Dict with 'stem' (after conv1/bn1/relu/maxpool), each kept 'layerN', and 'features'
      (the last kept stage).
    """
    _check_depth(self.depth)
    stages = kept_stages(self.layers_to_crop)
    if not -1 <= self.layers_to_freeze <= 3:
      raise ValueError(f'layers_to_freeze must be in -1..3, got {self.layers_to_freeze!r}.')
    frozen_bn = set(self.frozen_bn_stages())
    block, blocks_per_stage = RESNET_SPECS[self.depth]

    # Freezing a cropped stage freezes everything that is kept (only the aggregator trains).
    last_frozen = min(self.layers_to_freeze, len(stages))

    def freeze_point(stage_index, y):
      return jax.lax.stop_gradient(y) if stage_index == last_frozen else y

    x = x.astype(self.dtype)
    x = _conv(64, 7, 2, 3, self.dtype, 'conv1')(x)
    x = BatchNorm(dtype=self.dtype, use_running_stats_in_train='bn1' in frozen_bn,
                  axis_name=self.bn_axis_name, sync=self.bn_sync, groups=self.bn_groups,
                  name='bn1')(x, train)
    x = nn.relu(x)
    # flax pads max_pool with -inf, as torch's MaxPool2d(3, 2, padding=1) does.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    x = freeze_point(0, x)
    outputs = {'stem': x}
    in_features = 64
    for i, name in enumerate(stages):
      x = ResNetStage(
          block=block, num_blocks=blocks_per_stage[i], features=_STAGE_WIDTHS[i],
          stride=1 if i == 0 else 2, in_features=in_features, dtype=self.dtype,
          frozen_bn=name in frozen_bn, bn_axis_name=self.bn_axis_name, bn_sync=self.bn_sync,
          bn_groups=self.bn_groups, name=name)(x, train)
      x = freeze_point(i + 1, x)
      outputs[name] = x
      in_features = _STAGE_WIDTHS[i] * _EXPANSION[block]
    outputs['features'] = x
    return outputs
