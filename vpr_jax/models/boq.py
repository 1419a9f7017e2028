"""BoQ (Ali-bey et al., CVPR 2024): a bag of learned queries aggregating backbone features.

As the authors' module, on NHWC features [B, H, W, C] (DINOv2 patch tokens as a grid, or a
ResNet's layer3):
* `proj_c`: 3x3 conv (padding 1) C -> P, then tokens [B, H*W, P] and LayerNorm `norm_input`;
* `boqs_<i>` (torch `boqs.<i>`), each: a post-norm TransformerEncoderLayer `encoder` (ReLU FFN of
  width 4P, dropout 0), learned `queries` [1, Q, P], `q = norm_q(q + self_attn(q, q, q))`,
  `out = norm_out(cross_attn(q, x, x))`; x flows to the next block;
* the blocks' outputs concatenated [B, L*Q, P], `fc` Linear(L*Q -> row_dim) along the query axis,
  flattened P-major to [B, P * row_dim], L2-normalised (DINOv2: 384 x 32 = 12,288; ResNet-50:
  512 x 32 = 16,384).
Attention heads: P // 64. LayerNorm eps 1e-5. Each block's cross-attention weights (averaged over
heads, [B, Q, H*W]) are sown as 'intermediates' / 'attention'.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vpr_jax.models import aggregators


def _layer_norm(name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=jnp.float32,
                      param_dtype=jnp.float32, name=name)


def _torch_dense(features: int, fan_in: int, dtype: Any, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=aggregators.torch_linear_kernel_init,
                  bias_init=aggregators.torch_bias_init(fan_in), name=name)


class MultiheadAttention(nn.Module):
  """torch.nn.MultiheadAttention (batch_first, no dropout) with its parameter layout.

  `in_proj_kernel` [E, 3E] is torch's `in_proj_weight` transposed (q, k, v stacked along the
  output axis); `out_proj` is a Linear.

  Attributes:
    num_heads: heads; E must divide evenly.
    dtype: compute dtype of the projections.
  """
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query: jax.Array, key: jax.Array,
               value: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns (output [B, Lq, E] float32, attention weights averaged over heads [B, Lq, Lk])."""
    e = query.shape[-1]
    if e % self.num_heads:
      raise ValueError(f'Embedding width {e} is not divisible by {self.num_heads} heads.')
    head_dim = e // self.num_heads
    # torch: xavier_uniform_ on [3E, E], the same bound as on the transposed kernel.
    kernel = self.param('in_proj_kernel', nn.initializers.xavier_uniform(), (e, 3 * e),
                        jnp.float32)
    bias = self.param('in_proj_bias', nn.initializers.zeros, (3 * e,), jnp.float32)
    kernel = kernel.astype(self.dtype)

    def project(x, index):
      y = jnp.dot(x.astype(self.dtype), kernel[:, index * e:(index + 1) * e])
      y = y + bias[index * e:(index + 1) * e].astype(self.dtype)
      return y.reshape(*x.shape[:-1], self.num_heads, head_dim)

    q, k, v = project(query, 0), project(key, 1), project(value, 2)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) * (head_dim ** -0.5)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights.astype(self.dtype), v)
    out = out.reshape(*query.shape[:-1], e)
    out = nn.Dense(e, dtype=self.dtype, param_dtype=jnp.float32,
                   kernel_init=aggregators.torch_linear_kernel_init,
                   bias_init=nn.initializers.zeros, name='out_proj')(out)
    return out.astype(jnp.float32), jnp.mean(weights, axis=1)


class TransformerEncoderLayer(nn.Module):
  """torch.nn.TransformerEncoderLayer(norm_first=False, activation=relu, dropout=0)."""
  num_heads: int
  dim_feedforward: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    e = x.shape[-1]
    x = x.astype(jnp.float32)
    attended, _ = MultiheadAttention(self.num_heads, self.dtype, name='self_attn')(x, x, x)
    x = _layer_norm('norm1')(x + attended)
    y = nn.relu(_torch_dense(self.dim_feedforward, e, self.dtype, 'linear1')(x.astype(self.dtype)))
    y = _torch_dense(e, self.dim_feedforward, self.dtype, 'linear2')(y)
    return _layer_norm('norm2')(x + y.astype(jnp.float32))


class BoQBlock(nn.Module):
  """Encoder layer on the features, then learned queries cross-attending to them."""
  num_queries: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns (refined features [B, N, E], query outputs [B, Q, E]), both float32."""
    b, _, e = x.shape
    x = TransformerEncoderLayer(self.num_heads, 4 * e, self.dtype, name='encoder')(x)
    queries = self.param('queries', nn.initializers.normal(1.0), (1, self.num_queries, e),
                         jnp.float32)
    q = jnp.broadcast_to(queries, (b, self.num_queries, e))
    q = q + MultiheadAttention(self.num_heads, self.dtype, name='self_attn')(q, q, q)[0]
    q = _layer_norm('norm_q')(q)
    out, attention = MultiheadAttention(self.num_heads, self.dtype, name='cross_attn')(q, x, x)
    self.sow('intermediates', 'attention', attention)
    return x, _layer_norm('norm_out')(out)


class BoQ(nn.Module):
  """BoQ aggregator.

  Attributes:
    proj_channels: P (DINOv2: 384, ResNet-50: 512); heads P // 64.
    num_queries: Q per block (64).
    num_layers: L blocks (2).
    row_dim: output rows (32).
    dtype: compute dtype of convolutions, projections and Linears.
  """
  proj_channels: int = 512
  num_queries: int = 64
  num_layers: int = 2
  row_dim: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Aggregates features [B, H, W, C] into float32 unit-norm descriptors [B, P * row_dim]."""
    b, h, w, c = x.shape
    num_heads = self.proj_channels // 64
    if num_heads < 1:
      raise ValueError(f'BoQ uses proj_channels // 64 attention heads: proj_channels must be at '
                       f'least 64, got {self.proj_channels}.')
    x = nn.Conv(self.proj_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                param_dtype=jnp.float32, kernel_init=aggregators.torch_linear_kernel_init,
                bias_init=aggregators.torch_bias_init(9 * c), name='proj_c')(x.astype(self.dtype))
    x = _layer_norm('norm_input')(x.reshape(b, h * w, self.proj_channels))
    outputs = []
    for i in range(self.num_layers):
      x, out = BoQBlock(self.num_queries, num_heads, self.dtype, name=f'boqs_{i}')(x)
      outputs.append(out)
    out = jnp.concatenate(outputs, axis=1).transpose(0, 2, 1)  # [B, P, L*Q]
    out = _torch_dense(self.row_dim, self.num_layers * self.num_queries, self.dtype,
                       'fc')(out.astype(self.dtype))
    return aggregators.l2_normalize(out.reshape(b, -1))


def descriptor_dim(proj_channels: int, row_dim: int) -> int:
  """BoQ's descriptor size P * row_dim (12,288 for 384 x 32; 16,384 for 512 x 32)."""
  return int(proj_channels) * int(row_dim)
