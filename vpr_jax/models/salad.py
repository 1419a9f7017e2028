"""SALAD (Izquierdo & Civera, CVPR 2024): optimal-transport aggregation of DINOv2 tokens.

As the authors' module: from patch tokens f_i (NHWC [B, H, W, C]) and the class token t ([B, C]),
* cluster features: 1x1 conv C -> 512, dropout, ReLU, 1x1 conv 512 -> l (`cluster_features.{0,3}`);
* scores: 1x1 conv C -> 512, dropout, ReLU, 1x1 conv 512 -> m (`score.{0,3}`);
* global token: Linear C -> 512, ReLU, Linear 512 -> g (`token_features.{0,2}`);
* a dustbin row of constant score z (`dust_bin`, learned) is appended to the m x n score matrix and
  `sinkhorn_iterations` (3) log-domain Sinkhorn iterations give the transport plan, with mass
  1 / (n + m) per cluster, (n - m) / (n + m) for the dustbin and 1 / (n + m) per token;
* the plan's m cluster rows (rescaled by n + m) weight the cluster features: [B, l, m], each
  cluster's l-vector L2-normalised, flattened l-major;
* descriptor: L2(concat(L2(global token), clusters)), of size g + l * m (8,448 for 256 + 128 x 64).

Every computation after the convolutions runs in float32.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vpr_jax.models import aggregators

SINKHORN_ITERATIONS = 3  # The authors' `get_matching_probs(p, self.dust_bin, 3)`.
HIDDEN_FEATURES = 512


def log_optimal_transport(scores: jax.Array, dustbin: jax.Array,
                          num_iterations: int = SINKHORN_ITERATIONS) -> jax.Array:
  """Log transport plan with a dustbin row, as SALAD's `get_matching_probs` (regularisation 1).

  Args:
    scores: [B, m, n] cluster-token scores (m clusters, n tokens, n > m).
    dustbin: scalar score of the dustbin row.
    num_iterations: Sinkhorn iterations.

  Returns:
    float32 [B, m + 1, n]: log of the transport plan times (n + m); the last row is the dustbin.
  """
  b, m, n = scores.shape
  if n <= m:
    raise ValueError(f'SALAD needs more tokens than clusters (the dustbin holds n - m of the mass) '
                     f'but got {n} tokens for {m} clusters: use a larger image or fewer clusters.')
  scores = scores.astype(jnp.float32)
  bins = jnp.broadcast_to(jnp.asarray(dustbin, jnp.float32), (b, 1, n))
  couplings = jnp.concatenate([scores, bins], axis=1)
  norm = -math.log(n + m)
  log_a = jnp.full((m + 1,), norm, jnp.float32).at[m].add(math.log(n - m))
  log_b = jnp.full((n,), norm, jnp.float32)
  u = jnp.zeros((b, m + 1), jnp.float32)
  v = jnp.zeros((b, n), jnp.float32)
  for _ in range(num_iterations):
    u = log_a - jax.nn.logsumexp(couplings + v[:, None, :], axis=2)
    v = log_b - jax.nn.logsumexp(couplings + u[:, :, None], axis=1)
  return couplings + u[:, :, None] + v[:, None, :] - norm


class _PointwiseMLP(nn.Module):
  """1x1 conv -> dropout -> ReLU -> 1x1 conv, torch's Sequential indices 0 and 3."""
  hidden: int
  features: int
  dropout_rate: float
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    in_channels = x.shape[-1]
    conv = lambda features, fan_in, name: nn.Conv(
        features, (1, 1), dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=aggregators.torch_linear_kernel_init,
        bias_init=aggregators.torch_bias_init(fan_in), name=name)
    y = conv(self.hidden, in_channels, '0')(x.astype(self.dtype))
    if self.dropout_rate > 0:
      y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = nn.relu(y)
    return conv(self.features, self.hidden, '3')(y)


class _TokenMLP(nn.Module):
  """Linear -> ReLU -> Linear, torch's Sequential indices 0 and 2."""
  hidden: int
  features: int
  dtype: Any

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    in_features = t.shape[-1]
    dense = lambda features, fan_in, name: nn.Dense(
        features, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=aggregators.torch_linear_kernel_init,
        bias_init=aggregators.torch_bias_init(fan_in), name=name)
    y = nn.relu(dense(self.hidden, in_features, '0')(t.astype(self.dtype)))
    return dense(self.features, self.hidden, '2')(y)


class SALAD(nn.Module):
  """SALAD aggregator.

  Attributes:
    num_clusters: m (64).
    cluster_dim: l (128).
    token_dim: g (256).
    dropout_rate: dropout after the first conv of both per-token MLPs in training (the authors'
      default 0.3; OpenVPRLab's config 0). Needs a 'dropout' rng when train=True and > 0.
    sinkhorn_iterations: 3.
    dtype: compute dtype of the convolutions and Linears.
  """
  num_clusters: int = 64
  cluster_dim: int = 128
  token_dim: int = 256
  dropout_rate: float = 0.3
  sinkhorn_iterations: int = SINKHORN_ITERATIONS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, class_token: jax.Array,
               train: bool = False) -> jax.Array:
    """Aggregates DINOv2 tokens.

    Args:
      features: patch tokens [B, H, W, C].
      class_token: [B, C].
      train: enables dropout.

    Returns:
      float32 [B, token_dim + cluster_dim * num_clusters] descriptors with unit L2 norm.
    """
    b, h, w, _ = features.shape
    n = h * w
    cluster_features = _PointwiseMLP(HIDDEN_FEATURES, self.cluster_dim, self.dropout_rate,
                                     self.dtype, name='cluster_features')(features, train)
    scores = _PointwiseMLP(HIDDEN_FEATURES, self.num_clusters, self.dropout_rate, self.dtype,
                           name='score')(features, train)
    token = _TokenMLP(HIDDEN_FEATURES, self.token_dim, self.dtype,
                      name='token_features')(class_token)
    dustbin = self.param('dust_bin', nn.initializers.constant(1.0), (), jnp.float32)

    # [B, n, m] -> [B, m, n], tokens in row-major (h * W + w) order as torch's flatten(2).
    scores = scores.astype(jnp.float32).reshape(b, n, self.num_clusters).transpose(0, 2, 1)
    plan = jnp.exp(log_optimal_transport(scores, dustbin, self.sinkhorn_iterations))
    plan = plan[:, :self.num_clusters]
    cluster_features = cluster_features.astype(jnp.float32).reshape(b, n, self.cluster_dim)
    # sum_n f[b, n, l] * p[b, m, n] -> [B, l, m]; each cluster normalised over l, l-major flatten.
    clusters = jnp.einsum('bnl,bmn->blm', cluster_features, plan,
                          precision=jax.lax.Precision.HIGHEST)
    norms = jnp.sqrt(jnp.sum(jnp.square(clusters), axis=1, keepdims=True))
    clusters = clusters / jnp.maximum(norms, 1e-12)
    descriptor = jnp.concatenate(
        [aggregators.l2_normalize(token), clusters.reshape(b, -1)], axis=-1)
    return aggregators.l2_normalize(descriptor)


def descriptor_dim(num_clusters: int, cluster_dim: int, token_dim: int) -> int:
  """SALAD's descriptor size g + l * m (8,448 for 64 x 128 + 256)."""
  return int(token_dim) + int(cluster_dim) * int(num_clusters)
