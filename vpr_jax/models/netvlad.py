"""NetVLAD (Arandjelovic et al., CVPR 2016) and its initialisation from k-means of local features.

The module follows the layout of the gsv-cities family / the deep visual geo-localization
benchmark: a bias-free 1x1 conv `conv` (soft-assignment logits) and the cluster `centroids`
[K, C]. On NHWC features [B, H, W, C]:
  x <- x / ||x|| per location (normalize_input); a = softmax_K(conv(x));
  V[k] = sum_n a[n, k] (x_n - c_k); each V[k] L2-normalised (intra-normalisation);
  flatten K-major to [B, K * C]; L2-normalised. 64 clusters on 256 channels: 16,384-d.

The usual initialisation (`init_netvlad`): k-means (faiss) of L2-normalised local features sampled
from the backbone on training images gives the centroids; the conv weights are alpha times the
unit-norm centroids, with alpha = -log(0.01) / mean over descriptors of the gap between the two
largest centroid similarities, so that the soft assignment starts near the hard one.
"""

from typing import Any, Iterable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vpr_jax.models import aggregators

KMEANS_ITERATIONS = 100
DESCRIPTORS_PER_IMAGE = 100
NUM_DESCRIPTORS = 50_000


class NetVLAD(nn.Module):
  """NetVLAD aggregator.

  Attributes:
    num_clusters: K (64).
    normalize_input: L2-normalise each local feature first (True, as the family).
    dtype: compute dtype of the assignment conv.
  """
  num_clusters: int = 64
  normalize_input: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Aggregates [B, H, W, C] features into float32 unit-norm descriptors [B, K * C]."""
    b, h, w, c = x.shape
    x = x.astype(jnp.float32)
    if self.normalize_input:
      x = aggregators.l2_normalize(x)
    logits = nn.Conv(self.num_clusters, (1, 1), use_bias=False, dtype=self.dtype,
                     param_dtype=jnp.float32, kernel_init=aggregators.torch_linear_kernel_init,
                     name='conv')(x.astype(self.dtype))
    # torch.rand: U[0, 1).
    centroids = self.param('centroids', nn.initializers.uniform(1.0), (self.num_clusters, c),
                           jnp.float32)
    assignment = jax.nn.softmax(logits.astype(jnp.float32).reshape(b, h * w, self.num_clusters),
                                axis=-1)
    x = x.reshape(b, h * w, c)
    # sum_n a_nk (x_n - c_k) = (A^T X)_k - (sum_n a_nk) c_k.
    vlad = jnp.einsum('bnk,bnc->bkc', assignment, x, precision=jax.lax.Precision.HIGHEST)
    vlad = vlad - jnp.sum(assignment, axis=1)[:, :, None] * centroids[None]
    vlad = aggregators.l2_normalize(vlad)
    return aggregators.l2_normalize(vlad.reshape(b, -1))


def descriptor_dim(num_clusters: int, in_channels: int) -> int:
  """NetVLAD's descriptor size K * C (64 x 256 = 16,384 on the cropped ResNet-18)."""
  return int(num_clusters) * int(in_channels)


def sample_local_descriptors(feature_batches: Iterable[Any],
                             num_descriptors: int = NUM_DESCRIPTORS,
                             per_image: int = DESCRIPTORS_PER_IMAGE,
                             seed: int = 0) -> np.ndarray:
  """Draws L2-normalised local features, `per_image` random locations from each image.

  Args:
    feature_batches: backbone outputs [B, H, W, C] (numpy or jax arrays), e.g. of a random sample
      of ceil(num_descriptors / per_image) training images.
    num_descriptors: stop once this many are gathered.
    per_image: locations drawn (without replacement) per image; at most H * W.
    seed: numpy seed of the draw.

  Returns:
    float32 [N, C] with N = min(num_descriptors, what the batches hold).
  """
  rng = np.random.default_rng(seed)
  chunks, total = [], 0
  for batch in feature_batches:
    batch = np.asarray(batch, np.float32)
    if batch.ndim != 4:
      raise ValueError(f'Expected backbone features [B, H, W, C], got shape {batch.shape}.')
    b, h, w, c = batch.shape
    flat = batch.reshape(b, h * w, c)
    take = min(per_image, h * w)
    for image in flat:
      chosen = image[rng.choice(h * w, size=take, replace=False)]
      chunks.append(chosen)
      total += take
      if total >= num_descriptors:
        break
    if total >= num_descriptors:
      break
  if not chunks:
    raise ValueError('No backbone features to initialise NetVLAD from.')
  descriptors = np.concatenate(chunks)[:num_descriptors]
  norms = np.linalg.norm(descriptors, axis=1, keepdims=True)
  return (descriptors / np.maximum(norms, 1e-12)).astype(np.float32)


def kmeans_centroids(descriptors: np.ndarray, num_clusters: int,
                     iterations: int = KMEANS_ITERATIONS, seed: int = 0) -> np.ndarray:
  """faiss k-means (L2) of `descriptors` [N, C]; returns float32 centroids [num_clusters, C]."""
  import faiss  # pylint: disable=g-import-not-at-top
  descriptors = np.ascontiguousarray(descriptors, np.float32)
  if descriptors.shape[0] < num_clusters:
    raise ValueError(f'k-means needs at least {num_clusters} descriptors, got '
                     f'{descriptors.shape[0]}.')
  kmeans = faiss.Kmeans(descriptors.shape[1], int(num_clusters), niter=int(iterations),
                        seed=int(seed), verbose=False)
  kmeans.train(descriptors)
  return np.asarray(kmeans.centroids, np.float32)


def params_from_centroids(centroids: np.ndarray, descriptors: np.ndarray) -> dict[str, Any]:
  """NetVLAD params from k-means centroids, as the family's `init_params`.

  Args:
    centroids: [K, C].
    descriptors: [N, C] the (normalised) local features the centroids were fitted to; they set
      alpha.

  Returns:
    {'conv': {'kernel': [1, 1, C, K]}, 'centroids': [K, C]} float32 numpy arrays.
  """
  centroids = np.asarray(centroids, np.float32)
  unit = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
  dots = np.sort(unit @ np.asarray(descriptors, np.float32).T, axis=0)[::-1]
  alpha = float(-np.log(0.01) / np.mean(dots[0] - dots[1]))
  kernel = (alpha * unit).T[None, None]
  return {'conv': {'kernel': kernel.astype(np.float32)}, 'centroids': centroids}


def init_netvlad(feature_batches: Iterable[Any], num_clusters: int = 64,
                 num_descriptors: int = NUM_DESCRIPTORS, per_image: int = DESCRIPTORS_PER_IMAGE,
                 iterations: int = KMEANS_ITERATIONS, seed: int = 0,
                 descriptors: Optional[np.ndarray] = None) -> dict[str, Any]:
  """The usual NetVLAD initialisation from backbone features of training images.

  Args:
    feature_batches: backbone outputs [B, H, W, C] of sampled training images (ignored when
      `descriptors` is given).
    num_clusters: K.
    num_descriptors: local features used (50,000 as the benchmark code).
    per_image: locations per image (100).
    iterations: k-means iterations (100).
    seed: seed of the sampling and of k-means.
    descriptors: already sampled normalised local features [N, C], instead of the batches.

  Returns:
    NetVLAD params ({'conv': {'kernel'}, 'centroids'}) to put under params['aggregator'].
  """
  if descriptors is None:
    descriptors = sample_local_descriptors(feature_batches, num_descriptors, per_image, seed)
  centroids = kmeans_centroids(descriptors, num_clusters, iterations, seed)
  return params_from_centroids(centroids, descriptors)
