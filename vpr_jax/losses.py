"""Metric-learning losses and miners on a batch of place descriptors.

The losses and miners are those of pytorch-metric-learning (pml), with pml's names, argument names
and results, because the recipes of the GSV-Cities family are written in those terms:

  losses: MultiSimilarityLoss, ContrastiveLoss, TripletMarginLoss;
  miners: MultiSimilarityMiner, PairMarginMiner, TripletMarginMiner (or none);
  distances: DotProductSimilarity, CosineSimilarity, LpDistance (p=2).

pml gathers mined pairs and triplets as index lists of data-dependent length. Here every pair
(i, j) and every triplet (a, p, n) of the batch is a slot in a fixed-shape mask ([N, N] or
[N, N, N]), so a loss is one static-shape function that compiles once per batch size and runs
unchanged under `jax.jit`, `jax.pmap` and sharded `jax.jit` on the gathered global batch. The
reductions reproduce pml's: MultiSimilarityLoss averages over all N anchors (an anchor with nothing
mined contributes 0), ContrastiveLoss and TripletMarginLoss average over their non-zero terms
(ContrastiveLoss does so for positive and negative pairs separately and adds the two), and a pair
loss whose tuples hold at most one positive and one negative pair is 0, as in pml.

Distances follow pml's defaults: every distance L2-normalises the descriptors first, and LpDistance
is the Euclidean distance computed from the Gram matrix, which is what `torch.cdist` does for
batches of more than 25 descriptors (all real training batches).
"""

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from vpr_jax.errors import ConfigError

DISTANCE_NAMES = ('DotProductSimilarity', 'CosineSimilarity', 'LpDistance')
TRIPLET_TYPES = ('semihard', 'hard', 'easy', 'all')

# Defaults are the seed recipe's values (which differ from pml's own defaults in places).
_LOSS_DEFAULTS = {
    'MultiSimilarityLoss': {
        'alpha': 1.0, 'beta': 50.0, 'base': 0.0, 'distance': 'DotProductSimilarity'},
    'ContrastiveLoss': {'pos_margin': 0.0, 'neg_margin': 1.0, 'distance': 'LpDistance'},
    'TripletMarginLoss': {
        'margin': 0.1, 'swap': False, 'smooth_loss': False, 'triplets_per_anchor': 'all',
        'distance': 'LpDistance'},
}
_MINER_DEFAULTS = {
    'MultiSimilarityMiner': {'epsilon': 0.1, 'distance': 'CosineSimilarity'},
    'PairMarginMiner': {'pos_margin': 0.7, 'neg_margin': 0.3, 'distance': 'DotProductSimilarity'},
    'TripletMarginMiner': {
        'margin': 0.1, 'type_of_triplets': 'semihard', 'distance': 'LpDistance'},
}
LOSS_NAMES = tuple(_LOSS_DEFAULTS)
MINER_NAMES = tuple(_MINER_DEFAULTS)
_NO_MINER = (None, '', 'None', 'none')

LossFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


# ---------------------------------------------------------------------------------------------
# Distances.


def _safe_sqrt(x):
  """sqrt with a zero (not infinite) derivative at 0, like torch's norm and cdist backward."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _l2_normalize(x):
  """`torch.nn.functional.normalize(x, p=2, dim=1)`: x / max(||x||, 1e-12)."""
  norm = _safe_sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, 1e-12)


@dataclasses.dataclass(frozen=True)
class _Distance:
  """A pml distance with its default settings (normalised embeddings, p=2, power=1)."""
  name: str

  @property
  def is_inverted(self) -> bool:
    """True for similarities, where larger means closer."""
    return self.name != 'LpDistance'

  def matrix(self, x: jax.Array) -> jax.Array:
    """Pairwise [N, N] similarities or distances of the rows of x (float32)."""
    x = _l2_normalize(x)
    # HIGHEST keeps float32 on GPUs that would otherwise use TF32 (10-bit mantissa), which
    # MultiSimilarityLoss's beta=50 would amplify into percent-level errors.
    gram = jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST)
    if self.is_inverted:
      return gram
    # Norms from the Gram diagonal make the distance between identical rows exactly 0.
    squared_norms = jnp.diagonal(gram)
    squared = squared_norms[:, None] + squared_norms[None, :] - 2.0 * gram
    return _safe_sqrt(jnp.maximum(squared, 0.0))

  def margin(self, x, y):
    """How far x is beyond y in the direction of 'farther apart' (pml's `margin`)."""
    return y - x if self.is_inverted else x - y

  def smallest(self, x, y):
    """The elementwise closer of two values (pml's `smallest_dist`)."""
    return jnp.maximum(x, y) if self.is_inverted else jnp.minimum(x, y)


# ---------------------------------------------------------------------------------------------
# Tuples: what miners produce and losses consume, as fixed-shape masks.


@dataclasses.dataclass(frozen=True)
class _Pairs:
  """Positive and negative pairs; entries count how often pml's index lists hold (i, j)."""
  positive: jax.Array  # float32 [N, N]
  negative: jax.Array  # float32 [N, N]


@dataclasses.dataclass(frozen=True)
class _Triplets:
  """Triplets (anchor, positive, negative) as a bool [N, N, N] mask."""
  mask: jax.Array


def _label_masks(labels):
  """All positive pairs (same label, not itself) and all negative pairs, bool [N, N]."""
  same = labels[:, None] == labels[None, :]
  return same & ~jnp.eye(labels.shape[0], dtype=bool), ~same


def _triplets_from_pairs(positive, negative):
  """Every (a, p, n) whose (a, p) is a positive pair and whose (a, n) is a negative pair."""
  return (positive[:, :, None] > 0) & (negative[:, None, :] > 0)


def _as_pairs(tuples) -> _Pairs:
  """pml's `convert_to_pairs`: a triplet (a, p, n) yields the pairs (a, p) and (a, n)."""
  if isinstance(tuples, _Pairs):
    return tuples
  counts = tuples.mask.astype(jnp.float32)
  return _Pairs(positive=counts.sum(axis=2), negative=counts.sum(axis=1))


def _as_triplets(tuples) -> _Triplets:
  """pml's `convert_to_triplets`: a positive and a negative pair sharing an anchor."""
  if isinstance(tuples, _Triplets):
    return tuples
  return _Triplets(mask=_triplets_from_pairs(tuples.positive, tuples.negative))


def _tuple_stats(tuples) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Anchors of pml's first index list (bool [N]) and the miner's counts."""
  if isinstance(tuples, _Pairs):
    anchors = jnp.any(tuples.positive > 0, axis=1)
    counts = {'num_pos_pairs': tuples.positive.sum(), 'num_neg_pairs': tuples.negative.sum()}
  else:
    anchors = jnp.any(tuples.mask, axis=(1, 2))
    counts = {'num_triplets': tuples.mask.sum().astype(jnp.float32)}
  return anchors, counts


# ---------------------------------------------------------------------------------------------
# Miners. They see the descriptors under stop_gradient, as pml mines under torch.no_grad().


def _all_tuples(labels, triplets: bool):
  positive, negative = _label_masks(labels)
  if triplets:
    return _Triplets(mask=_triplets_from_pairs(positive, negative))
  return _Pairs(positive=positive.astype(jnp.float32), negative=negative.astype(jnp.float32))


def _multi_similarity_miner(descriptors, labels, *, epsilon, distance):
  """Positives less similar than the hardest negative (+ epsilon), and vice versa."""
  mat = distance.matrix(descriptors)
  positive, negative = _label_masks(labels)
  # An empty side yields +-inf, so an anchor without positives mines no negatives and an anchor
  # without negatives mines no positives, as with pml's sorting sentinels.
  if distance.is_inverted:
    hardest_negative = jnp.max(jnp.where(negative, mat, -jnp.inf), axis=1, keepdims=True)
    hardest_positive = jnp.min(jnp.where(positive, mat, jnp.inf), axis=1, keepdims=True)
    hard_positive = positive & (mat - epsilon < hardest_negative)
    hard_negative = negative & (mat + epsilon > hardest_positive)
  else:
    hardest_negative = jnp.min(jnp.where(negative, mat, jnp.inf), axis=1, keepdims=True)
    hardest_positive = jnp.max(jnp.where(positive, mat, -jnp.inf), axis=1, keepdims=True)
    hard_positive = positive & (mat + epsilon > hardest_negative)
    hard_negative = negative & (mat - epsilon < hardest_positive)
  return _Pairs(positive=hard_positive.astype(jnp.float32),
                negative=hard_negative.astype(jnp.float32))


def _pair_margin_miner(descriptors, labels, *, pos_margin, neg_margin, distance):
  """Positive pairs farther apart than pos_margin, negative pairs closer than neg_margin."""
  mat = distance.matrix(descriptors)
  positive, negative = _label_masks(labels)
  if distance.is_inverted:
    hard_positive, hard_negative = positive & (mat < pos_margin), negative & (mat > neg_margin)
  else:
    hard_positive, hard_negative = positive & (mat > pos_margin), negative & (mat < neg_margin)
  return _Pairs(positive=hard_positive.astype(jnp.float32),
                negative=hard_negative.astype(jnp.float32))


def _triplet_margin_miner(descriptors, labels, *, margin, type_of_triplets, distance):
  """Triplets by how far the negative is beyond the positive (pml's triplet_margin)."""
  mat = distance.matrix(descriptors)
  positive, negative = _label_masks(labels)
  anchor_positive, anchor_negative = mat[:, :, None], mat[:, None, :]
  triplet_margin = distance.margin(anchor_negative, anchor_positive)
  if type_of_triplets == 'easy':
    keep = triplet_margin > margin
  else:
    keep = triplet_margin <= margin
    if type_of_triplets == 'hard':
      keep &= triplet_margin <= 0
    elif type_of_triplets == 'semihard':
      keep &= triplet_margin > 0
  return _Triplets(mask=_triplets_from_pairs(positive, negative) & keep)


# ---------------------------------------------------------------------------------------------
# Losses.


def _log_one_plus_sum_exp(x, mask):
  """Row-wise log(1 + sum_{mask} exp(x)); 0 for rows with nothing in mask (pml's logsumexp)."""
  masked = jnp.where(mask, x, -jnp.inf)
  # The shift cancels exactly, so it needs no gradient; it includes the added 0 term.
  shift = jax.lax.stop_gradient(jnp.maximum(jnp.max(masked, axis=1, keepdims=True), 0.0))
  total = jnp.exp(-shift) + jnp.sum(jnp.exp(masked - shift), axis=1, keepdims=True)
  out = (shift + jnp.log(total))[:, 0]
  return jnp.where(jnp.any(mask, axis=1), out, 0.0)


def _mean_of_nonzero(losses, weights):
  """pml's AvgNonZeroReducer over weighted terms: mean of the terms > 0, or 0 if there is none."""
  weights = jnp.where(losses > 0, weights, 0.0)
  count = jnp.sum(weights)
  return jnp.where(count > 0, jnp.sum(weights * losses) / jnp.maximum(count, 1.0), 0.0)


def _pair_loss_is_empty(pairs: _Pairs):
  """pml's pair losses return 0 when every index list has at most one element."""
  return (pairs.positive.sum() <= 1) & (pairs.negative.sum() <= 1)


def _multi_similarity_loss(descriptors, tuples, *, alpha, beta, base, distance):
  pairs = _as_pairs(tuples)
  mat = distance.matrix(descriptors)
  positive_loss = _log_one_plus_sum_exp(alpha * distance.margin(mat, base),
                                        pairs.positive > 0) / alpha
  negative_loss = _log_one_plus_sum_exp(beta * distance.margin(base, mat),
                                        pairs.negative > 0) / beta
  loss = jnp.mean(positive_loss + negative_loss)
  return jnp.where(_pair_loss_is_empty(pairs), 0.0, loss)


def _contrastive_loss(descriptors, tuples, *, pos_margin, neg_margin, distance):
  pairs = _as_pairs(tuples)
  mat = distance.matrix(descriptors)
  positive_loss = jax.nn.relu(distance.margin(mat, pos_margin))
  negative_loss = jax.nn.relu(distance.margin(neg_margin, mat))
  loss = (_mean_of_nonzero(positive_loss, pairs.positive)
          + _mean_of_nonzero(negative_loss, pairs.negative))
  return jnp.where(_pair_loss_is_empty(pairs), 0.0, loss)


def _triplet_margin_loss(descriptors, tuples, *, margin, swap, smooth_loss, distance):
  triplets = _as_triplets(tuples)
  mat = distance.matrix(descriptors)
  anchor_positive, anchor_negative = mat[:, :, None], mat[:, None, :]
  if swap:
    positive_negative = mat[None, :, :]
    anchor_negative = distance.smallest(anchor_negative, positive_negative)
  violation = distance.margin(anchor_positive, anchor_negative) + margin
  losses = jax.nn.softplus(violation) if smooth_loss else jax.nn.relu(violation)
  return _mean_of_nonzero(losses, triplets.mask.astype(jnp.float32))


# ---------------------------------------------------------------------------------------------
# Construction from names and parameters.


def _resolve_params(kind: str, name: str, defaults: Mapping[str, Any], params) -> dict[str, Any]:
  """Merges params over defaults, rejecting unknown names and bad values."""
  if params is None:
    params = {}
  elif hasattr(params, 'to_dict'):  # ml_collections.ConfigDict / FrozenConfigDict.
    params = params.to_dict()
  elif not isinstance(params, Mapping):
    raise TypeError(f'{kind} params for {name} must be a mapping, got {type(params).__name__}.')
  unknown = sorted(set(params) - set(defaults))
  if unknown:
    raise ConfigError(f'Unknown {kind} parameter(s) {unknown} for {name}; supported: '
                     f'{sorted(defaults)}.')
  resolved = {**defaults, **params}
  for key, value in resolved.items():
    default = defaults[key]
    where = f'{kind} parameter {name}.{key}'
    if key == 'distance':
      if value not in DISTANCE_NAMES:
        raise ConfigError(f'{where} must be one of {DISTANCE_NAMES}, got {value!r}.')
      resolved[key] = _Distance(value)
    elif key == 'type_of_triplets':
      if value not in TRIPLET_TYPES:
        raise ConfigError(f'{where} must be one of {TRIPLET_TYPES}, got {value!r}.')
    elif key == 'triplets_per_anchor':
      if value != 'all':
        raise ConfigError(f"{where} must be 'all' (every triplet of the batch); sampling a "
                         f'number of random triplets per anchor is not supported, got {value!r}.')
    elif isinstance(default, bool):
      if not isinstance(value, bool):
        raise ConfigError(f'{where} must be a bool, got {value!r}.')
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f'{where} must be a number, got {value!r}.')
    else:
      resolved[key] = float(value)
  for key in ('alpha', 'beta'):
    if key in resolved and resolved[key] <= 0:
      raise ConfigError(f'{kind} parameter {name}.{key} must be > 0, got {resolved[key]}.')
  return resolved


_LOSS_FUNCTIONS = {
    'MultiSimilarityLoss': _multi_similarity_loss,
    'ContrastiveLoss': _contrastive_loss,
    'TripletMarginLoss': _triplet_margin_loss,
}
_MINER_FUNCTIONS = {
    'MultiSimilarityMiner': _multi_similarity_miner,
    'PairMarginMiner': _pair_margin_miner,
    'TripletMarginMiner': _triplet_margin_miner,
}


def make_loss(loss_name: str, loss_params: Mapping[str, Any] | None = None,
              miner_name: str | None = None,
              miner_params: Mapping[str, Any] | None = None) -> LossFn:
  """Builds a pml-equivalent loss, optionally preceded by a miner, as a pure JAX function.

  Args:
    loss_name: one of `LOSS_NAMES` ('MultiSimilarityLoss', 'ContrastiveLoss',
      'TripletMarginLoss').
    loss_params: pml constructor arguments of the loss (dict or ConfigDict); missing ones take the
      seed recipe's values. MultiSimilarityLoss: alpha, beta, base, distance; ContrastiveLoss:
      pos_margin, neg_margin, distance; TripletMarginLoss: margin, swap, smooth_loss,
      triplets_per_anchor (only 'all'), distance. `distance` is a name from `DISTANCE_NAMES`.
    miner_name: one of `MINER_NAMES` ('MultiSimilarityMiner', 'PairMarginMiner',
      'TripletMarginMiner'), or None / '' for no miner (the loss sees every pair or triplet;
      miner_params are then ignored).
    miner_params: pml constructor arguments of the miner. MultiSimilarityMiner: epsilon,
      distance; PairMarginMiner: pos_margin, neg_margin, distance; TripletMarginMiner: margin,
      type_of_triplets ('semihard', 'hard', 'easy' or 'all'), distance.

  Returns:
    `loss_fn(descriptors, labels) -> (loss, metrics)`. descriptors: float array [..., D] (any
    dtype; computed in float32); labels: int array with the same leading shape (e.g. [N] or
    [P, K]). loss: float32 scalar. metrics: float32 scalars 'b_acc' (1 - the fraction of batch
    elements that anchor a mined positive pair or triplet; with no miner, an anchor of any
    positive pair) and the mined counts 'num_pos_pairs' and 'num_neg_pairs' (pair miners and
    pair losses without miner) or 'num_triplets' (triplet miner, triplet loss without miner).

  Raises:
    ValueError: unknown loss, miner or parameter names, or unsupported parameter values.
  """
  if loss_name not in _LOSS_DEFAULTS:
    raise ConfigError(f'Unknown loss.name {loss_name!r}; valid choices: {LOSS_NAMES}.')
  if miner_name not in _NO_MINER and miner_name not in _MINER_DEFAULTS:
    raise ConfigError(f'Unknown loss.miner_name {miner_name!r}; valid choices: {MINER_NAMES} or None.')
  loss_kwargs = _resolve_params('loss', loss_name, _LOSS_DEFAULTS[loss_name], loss_params)
  loss_kwargs.pop('triplets_per_anchor', None)
  loss_impl = _LOSS_FUNCTIONS[loss_name]
  if miner_name in _NO_MINER:
    miner_impl = None  # miner_params are ignored, so a config can switch the miner off alone.
  else:
    miner_kwargs = _resolve_params('miner', miner_name, _MINER_DEFAULTS[miner_name], miner_params)
    miner_impl = _MINER_FUNCTIONS[miner_name]
  uses_triplets = loss_name == 'TripletMarginLoss'

  def loss_fn(descriptors: jax.Array, labels: jax.Array):
    descriptors = jnp.asarray(descriptors)
    labels = jnp.asarray(labels)
    if descriptors.ndim < 2 or descriptors.shape[:-1] != labels.shape:
      raise ValueError(f'descriptors must be [..., D] and labels [...] with the same leading '
                       f'shape; got descriptors {descriptors.shape} and labels {labels.shape}.')
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      raise ValueError(f'labels must be integers, got {labels.dtype}.')
    descriptors = descriptors.reshape(-1, descriptors.shape[-1]).astype(jnp.float32)
    labels = labels.reshape(-1)
    if miner_impl is None:
      tuples = _all_tuples(labels, triplets=uses_triplets)
      positive, _ = _label_masks(labels)
      anchors = jnp.any(positive, axis=1)
      _, counts = _tuple_stats(tuples)
    else:
      tuples = miner_impl(jax.lax.stop_gradient(descriptors), labels, **miner_kwargs)
      anchors, counts = _tuple_stats(tuples)
    loss = loss_impl(descriptors, tuples, **loss_kwargs)
    metrics = {'b_acc': 1.0 - anchors.sum() / labels.shape[0], **counts}
    return loss, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

  return loss_fn


def check_config(loss_config) -> None:
  """Checks `config.loss`: names and parameters of the loss and the miner (ConfigError)."""
  make_loss(loss_config.name, loss_config.params, loss_config.miner_name,
            loss_config.miner_params)
