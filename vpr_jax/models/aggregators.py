"""Aggregators of the gsv-cities family: AVG, GeM, ConvAP and MixVPR.

Each takes backbone features in NHWC [B, H, W, C] and returns float32 descriptors [B, D] with unit
L2 norm (torch's `F.normalize` semantics). Flattening follows the PyTorch modules, which see NCHW
tensors: channel-major wherever a spatial and a channel axis are flattened together, and
token index h * W + w along the spatial axis.

Parameters are float32; matrix products run in the compute `dtype`; norms, pooling powers and
LayerNorm run in float32.
"""

import functools
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


def _layer_norm_stats(x: jax.Array, epsilon: float):
  """x in (at least) float32, its mean and 1 / std over the last axis (two passes, as torch)."""
  xs = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = jnp.mean(xs, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xs - mean), axis=-1, keepdims=True)
  return xs, mean, jax.lax.rsqrt(var + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
  """torch's LayerNorm over the last axis, computed in float32, returned in x's dtype.

  The same values as flax's LayerNorm (use_fast_variance=False). Its gradient is written out:
  the forward keeps only x and the per-row statistics for the backward, which recomputes the
  normalised input, where autodiff of the forward keeps float32 intermediates of x's size
  (1-2% fewer HBM bytes in the compiled MixVPR train steps, docs/performance.md; XLA still
  materialises float32 tensors between the backward's kernels, because the parameter gradients
  reduce over other axes than the statistics).
  """
  return _layer_norm_forward(x, scale, bias, epsilon)[0]


def _layer_norm_forward(x, scale, bias, epsilon):
  xs, mean, rstd = _layer_norm_stats(x, epsilon)
  y = (xs - mean) * (rstd * scale) + bias
  return y.astype(x.dtype), (x, mean, rstd, scale)


def _layer_norm_backward(epsilon, residuals, grad):
  del epsilon
  x, mean, rstd, scale = residuals
  normalised = (x.astype(mean.dtype) - mean) * rstd
  grad = grad.astype(mean.dtype)
  batch_axes = tuple(range(x.ndim - 1))
  grad_scale = jnp.sum(grad * normalised, axis=batch_axes)
  grad_bias = jnp.sum(grad, axis=batch_axes)
  grad_normalised = grad * scale
  grad_x = rstd * (grad_normalised - jnp.mean(grad_normalised, axis=-1, keepdims=True)
                   - normalised * jnp.mean(grad_normalised * normalised, axis=-1, keepdims=True))
  return (grad_x.astype(x.dtype), grad_scale.astype(scale.dtype),
          grad_bias.astype(scale.dtype))


layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


class LayerNorm(nn.Module):
  """torch's nn.LayerNorm over the last axis (parameters 'scale' and 'bias', as flax's).

  Statistics and normalisation in float32; the output in the input's dtype. See `layer_norm`.
  """
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (x.shape[-1],), jnp.float32)
    return layer_norm(x, scale, bias, self.epsilon)


class FeatureMixerLayer(nn.Module):
  """x + Linear2(ReLU(Linear1(LayerNorm(x)))) along the last (H*W) axis.

  x and the output stay in the compute dtype, as the residual stream of the PyTorch module under
  autocast (float16 there); LayerNorm's statistics and normalisation run in float32 and its
  output is stored in the compute dtype, the input dtype of fc1. float32 compute is unchanged.
  """
  mlp_ratio: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_dim = x.shape[-1]
    y = LayerNorm(epsilon=1e-5, name='norm')(x)
    dense = lambda features, name: nn.Dense(
        features, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=mixer_kernel_init,
        bias_init=nn.initializers.zeros, name=name)
    y = nn.relu(dense(int(in_dim * self.mlp_ratio), 'fc1')(y))
    y = dense(in_dim, 'fc2')(y)
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
    # NHWC -> [B, H*W, C] keeps the token order h * W + w; then [B, C, H*W] as torch's flatten(2).
    x = x.astype(self.dtype).reshape(b, h * w, c).transpose(0, 2, 1)
    for i in range(self.mix_depth):
      x = FeatureMixerLayer(mlp_ratio=self.mlp_ratio, dtype=self.dtype, name=f'mix_{i}')(x)
    x = x.transpose(0, 2, 1).astype(self.dtype)
    x = nn.Dense(self.out_channels, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=torch_linear_kernel_init, bias_init=torch_bias_init(c),
                 name='channel_proj')(x)
    x = x.transpose(0, 2, 1)
    x = nn.Dense(self.out_rows, use_bias=self.row_proj_bias, dtype=self.dtype,
                 param_dtype=jnp.float32, kernel_init=torch_linear_kernel_init,
                 bias_init=torch_bias_init(h * w), name='row_proj')(x)
    return l2_normalize(x.reshape(b, -1))


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
