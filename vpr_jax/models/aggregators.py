"""Aggregators of the gsv-cities family: AVG, GeM, ConvAP and MixVPR.

Each takes backbone features in NHWC [B, H, W, C] and returns float32 descriptors [B, D] with unit
L2 norm (torch's `F.normalize` semantics). Flattening follows the PyTorch modules, which see NCHW
tensors: channel-major wherever a spatial and a channel axis are flattened together, and
token index h * W + w along the spatial axis.

Parameters are float32; matrix products run in the compute `dtype`; norms, pooling powers and
LayerNorm run in float32.
"""

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vpr_jax.errors import ConfigError

AGGREGATORS = ('avg', 'gem', 'convap', 'mixvpr')


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||_2, eps) along the last axis, in float32 (torch's F.normalize)."""
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def torch_linear_kernel_init(key, shape, dtype=jnp.float32):
  """PyTorch's default Linear/Conv weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  (kaiming_uniform with a=sqrt(5)); fan_in is the product of all kernel dims but the last.
  """
  fan_in = int(np.prod(shape[:-1]))
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_bias_init(fan_in: int):
  """PyTorch's default Linear/Conv bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# trunc_normal_(std=0.02) truncated at +-2 *absolute*, i.e. +-100 standard deviations: the
# truncation removes a probability mass of ~1e-2173, so it is a plain normal. (A truncated sampler
# with bounds of +-100 std draws through erf_inv near +-1 in float32, which is less exact.)
mixer_kernel_init = nn.initializers.normal(stddev=0.02)


def adaptive_avg_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """Averaging matrix [out_size, in_size] of torch's AdaptiveAvgPool along one axis.

  Bin i covers [floor(i * in / out), ceil((i + 1) * in / out)), also when out does not divide in
  (bins then overlap or differ in size).
  """
  matrix = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)
    matrix[i, start:end] = 1.0 / (end - start)
  return matrix


def adaptive_avg_pool(x: jax.Array, output_size: Sequence[int]) -> jax.Array:
  """torch's AdaptiveAvgPool2d on NHWC input, in float32; returns [B, s1, s2, C]."""
  _, h, w, _ = x.shape
  pool_h = jnp.asarray(adaptive_avg_pool_matrix(h, int(output_size[0])))
  pool_w = jnp.asarray(adaptive_avg_pool_matrix(w, int(output_size[1])))
  return jnp.einsum('bhwc,ih,jw->bijc', x.astype(jnp.float32), pool_h, pool_w,
                    precision=jax.lax.Precision.HIGHEST)


class AVG(nn.Module):
  """Global average pooling -> L2 normalisation; D = C."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return l2_normalize(jnp.mean(x.astype(jnp.float32), axis=(1, 2)))


class GeM(nn.Module):
  """Generalised mean pooling with a learnable p (shape [1], as the PyTorch parameter); D = C.

  Attributes:
    p_init: initial p (3 in the family).
    eps: clamp minimum before the power.
  """
  p_init: float = 3.0
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.param('p', nn.initializers.constant(self.p_init), (1,), jnp.float32)
    x = jnp.maximum(x.astype(jnp.float32), self.eps)
    pooled = jnp.mean(jnp.power(x, p), axis=(1, 2))
    return l2_normalize(jnp.power(pooled, 1.0 / p))


class ConvAP(nn.Module):
  """1x1 conv (with bias) -> adaptive average pool (s1, s2) -> channel-major flatten -> L2.

  D = out_channels * s1 * s2.

  Attributes:
    out_channels: conv output channels.
    pool_size: adaptive-average-pool output (s1, s2).
    dtype: compute dtype of the conv.
  """
  out_channels: int = 1024
  pool_size: Sequence[int] = (2, 2)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_channels = x.shape[-1]
    # Every pooling bin averages with weights summing to one, so pooling commutes with the affine
    # 1x1 conv: pool first and run the conv on s1*s2 positions instead of H*W.
    pooled = adaptive_avg_pool(x, self.pool_size)
    conv = nn.Conv(self.out_channels, (1, 1), use_bias=True, dtype=self.dtype,
                   param_dtype=jnp.float32, kernel_init=torch_linear_kernel_init,
                   bias_init=torch_bias_init(in_channels), name='channel_pool')
    y = conv(pooled.astype(self.dtype))
    # NHWC -> NCHW before flattening, as the PyTorch module flattens [B, C, s1, s2].
    y = jnp.transpose(y.astype(jnp.float32), (0, 3, 1, 2))
    return l2_normalize(y.reshape(y.shape[0], -1))


def normalise_rows(x: jax.Array, epsilon: float = 1e-5) -> jax.Array:
  """(x - mean) / sqrt(var + eps) over the last axis in float32 (torch's LayerNorm without its
  affine), returned in x's dtype. Two passes for the variance, as torch."""
  xs = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = jnp.mean(xs, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xs - mean), axis=-1, keepdims=True)
  return ((xs - mean) * jax.lax.rsqrt(var + epsilon)).astype(x.dtype)


class LayerNormParams(nn.Module):
  """The parameters of torch's nn.LayerNorm ('scale' and 'bias', as flax's LayerNorm)."""

  @nn.compact
  def __call__(self, features: int) -> tuple[jax.Array, jax.Array]:
    return (self.param('scale', nn.initializers.ones, (features,), jnp.float32),
            self.param('bias', nn.initializers.zeros, (features,), jnp.float32))


class DenseParams(nn.Module):
  """The parameters of a Dense layer ('kernel' [in, out] and 'bias', as flax's nn.Dense);
  the bias is None without one."""
  features: int
  use_bias: bool = True
  kernel_init: Any = mixer_kernel_init
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, in_features: int) -> tuple[jax.Array, Optional[jax.Array]]:
    kernel = self.param('kernel', self.kernel_init, (in_features, self.features), jnp.float32)
    if not self.use_bias:
      return kernel, None
    return kernel, self.param('bias', self.bias_init, (self.features,), jnp.float32)


class FeatureMixerLayer(nn.Module):
  """x + Linear2(ReLU(Linear1(LayerNorm(x)))) along the last (H*W) axis of 2-D rows [R, H*W].

  The LayerNorm's affine is folded into fc1: Linear1(n * scale + bias) = n @ (scale[:, None] *
  W1) + (b1 + bias @ W1) for the normalised rows n, the same function (float32 results differ
  by rounding only). The backward then has no reduction over the rows for the LayerNorm
  parameters (their gradients come from fc1's, parameter-sized), which kept a float32 tensor of
  the mixer's size in HBM per layer. Parameters keep the names of the PyTorch module's layers
  ('norm', 'fc1', 'fc2'). x and the output stay in the compute dtype, as the residual stream of
  the PyTorch module under autocast (float16 there); the statistics run in float32.
  """
  mlp_ratio: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_dim = x.shape[-1]
    hidden = int(in_dim * self.mlp_ratio)
    scale, bias = LayerNormParams(name='norm')(in_dim)
    kernel1, bias1 = DenseParams(hidden, name='fc1')(in_dim)
    kernel2, bias2 = DenseParams(in_dim, name='fc2')(hidden)
    folded_kernel = (scale[:, None] * kernel1).astype(self.dtype)
    folded_bias = (bias1 + bias @ kernel1).astype(self.dtype)
    y = jnp.dot(normalise_rows(x).astype(self.dtype), folded_kernel) + folded_bias
    y = jnp.dot(nn.relu(y), kernel2.astype(self.dtype)) + bias2.astype(self.dtype)
    return x + y.astype(x.dtype)


class MixVPR(nn.Module):
  """MixVPR: feature mixers on the flattened spatial axis, channel and row projections.

  As the PyTorch module: x [B, C, H*W] -> `mix_depth` FeatureMixerLayers (acting on H*W) ->
  channel_proj (C -> out_channels) -> row_proj (H*W -> out_rows) -> flatten [B, out_channels *
  out_rows] (channel-major) -> L2.

  Attributes:
    out_channels: channel projection width.
    mix_depth: number of mixer blocks.
    mlp_ratio: mixer hidden width = int(H * W * mlp_ratio).
    out_rows: row projection width.
    in_hw: expected (H, W) of the input, checked when given (the mixer width depends on it).
    row_proj_bias: whether row_proj has a bias; the MixVPR repository's (nn.Linear(hw,
      out_rows)) and mldl24-vpr's have one. False serves checkpoints saved without it.
    dtype: compute dtype of the Linear layers.
  """
  out_channels: int = 256
  mix_depth: int = 5
  mlp_ratio: float = 1.0
  out_rows: int = 4
  in_hw: Optional[Sequence[int]] = None
  row_proj_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    if self.in_hw is not None and (h, w) != tuple(self.in_hw):
      raise ValueError(f'MixVPR was built for {tuple(self.in_hw)} feature maps but got {(h, w)}: '
                       'its mixer width is H*W, so the image size must match the config.')
    # NHWC -> [B, H*W, C] keeps the token order h * W + w; then [B, C, H*W] as torch's flatten(2),
    # as 2-D rows [B * C, H*W] for the mixers: with the 3-D stream XLA chose transposed layouts
    # in the backward (docs/performance.md).
    x = x.astype(self.dtype).reshape(b, h * w, c).transpose(0, 2, 1).reshape(b * c, h * w)
    for i in range(self.mix_depth):
      x = FeatureMixerLayer(mlp_ratio=self.mlp_ratio, dtype=self.dtype, name=f'mix_{i}')(x)
    channel_kernel, channel_bias = DenseParams(
        self.out_channels, kernel_init=torch_linear_kernel_init, bias_init=torch_bias_init(c),
        name='channel_proj')(c)
    row_kernel, row_bias = DenseParams(
        self.out_rows, use_bias=self.row_proj_bias, kernel_init=torch_linear_kernel_init,
        bias_init=torch_bias_init(h * w), name='row_proj')(h * w)
    # channel_proj and row_proj are affine maps of different axes, so they commute: project the
    # rows first (H*W -> out_rows) and the channels of a tensor H*W / out_rows times smaller,
    # instead of the channels of the whole stream. The same function (float32 results differ
    # by rounding only); the bias becomes channel_bias x sum_n row_kernel[n] + row_bias.
    # In the compute dtype, as the other Linear layers (a float32 result would make the
    # gradient of the whole [B * C, H*W] stream float32); the small channel product in float32.
    rows = jnp.dot(x, row_kernel.astype(self.dtype)).astype(jnp.float32)
    y = jnp.einsum('bcr,cd->bdr', rows.reshape(b, c, self.out_rows), channel_kernel)
    bias = channel_bias[:, None] * jnp.sum(row_kernel, axis=0)[None, :]
    if row_bias is not None:
      bias = bias + row_bias[None, :]
    return l2_normalize((y + bias).reshape(b, -1))


def aggregator_name(model_config) -> str:
  """The configured aggregator's name in lower case; ConfigError for an unknown one."""
  name = str(model_config.aggregator).lower()
  if name not in AGGREGATORS:
    raise ConfigError(f'Unknown aggregator {model_config.aggregator!r}; valid choices: '
                     f'{", ".join(AGGREGATORS)}.')
  return name


def make_aggregator(model_config, in_hw: Sequence[int], dtype: Any = jnp.float32) -> nn.Module:
  """Builds the aggregator named by `model_config.aggregator`.

  Args:
    model_config: the `config.model` ConfigDict.
    in_hw: (H, W) of the backbone output (channels are inferred from the input by flax).
    dtype: compute dtype.

  Returns:
    A flax module mapping [B, H, W, C] features to float32 unit-norm [B, D] descriptors.
  """
  name = aggregator_name(model_config)
  if name == 'avg':
    return AVG()
  if name == 'gem':
    return GeM(p_init=float(model_config.gem_p), eps=float(model_config.gem_eps))
  if name == 'convap':
    return ConvAP(out_channels=int(model_config.convap_out_channels),
                  pool_size=tuple(int(s) for s in model_config.convap_pool_size),
                  dtype=dtype)
  return MixVPR(out_channels=int(model_config.mixvpr_out_channels),
                mix_depth=int(model_config.mixvpr_mix_depth),
                mlp_ratio=model_config.mixvpr_mlp_ratio,
                out_rows=int(model_config.mixvpr_out_rows),
                in_hw=tuple(int(s) for s in in_hw),
                row_proj_bias=bool(model_config.get('mixvpr_row_proj_bias', True)),
                dtype=dtype)


def descriptor_dim(model_config, in_channels: int, in_hw: Sequence[int]) -> int:
  """Length D of the descriptors the configured aggregator produces.

  Args:
    model_config: the `config.model` ConfigDict.
    in_channels: channels of the backbone output.
    in_hw: (H, W) of the backbone output.

  Returns:
    D (e.g. 1024 for the seed's MixVPR: 256 channels x 4 rows).
  """
  del in_hw
  name = aggregator_name(model_config)
  if name in ('avg', 'gem'):
    return int(in_channels)
  if name == 'convap':
    s1, s2 = model_config.convap_pool_size
    return int(model_config.convap_out_channels) * int(s1) * int(s2)
  return int(model_config.mixvpr_out_channels) * int(model_config.mixvpr_out_rows)
