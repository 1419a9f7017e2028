"""vpr_jax.losses against pytorch-metric-learning itself: losses, gradients, mining counts."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vpr_jax import losses

torch = pytest.importorskip('torch', reason='torch is the reference for the loss tests')
pml_losses = pytest.importorskip(
    'pytorch_metric_learning.losses', reason='pytorch-metric-learning is the loss reference')
from pytorch_metric_learning import distances as pml_distances  # noqa: E402
from pytorch_metric_learning import miners as pml_miners  # noqa: E402
from pytorch_metric_learning.utils import loss_and_miner_utils as pml_lmu  # noqa: E402

# The seed recipe's pml objects, written out here (not taken from vpr_jax) so that make_loss's
# defaults are checked too.
SEED_LOSSES = {
    'MultiSimilarityLoss': dict(alpha=1.0, beta=50, base=0.0, distance='DotProductSimilarity'),
    'ContrastiveLoss': dict(pos_margin=0, neg_margin=1),
    'TripletMarginLoss': dict(margin=0.1, swap=False, smooth_loss=False,
                              triplets_per_anchor='all'),
}
SEED_MINERS = {
    None: None,
    'MultiSimilarityMiner': dict(epsilon=0.1, distance='CosineSimilarity'),
    'PairMarginMiner': dict(pos_margin=0.7, neg_margin=0.3, distance='DotProductSimilarity'),
    'TripletMarginMiner': dict(margin=0.1, type_of_triplets='semihard'),
}
ALL_COMBINATIONS = [(loss, miner) for loss in SEED_LOSSES for miner in SEED_MINERS]
SIMILARITY_ONLY = {  # Combinations that use no LpDistance with the seed's parameters.
    ('MultiSimilarityLoss', None), ('MultiSimilarityLoss', 'MultiSimilarityMiner'),
    ('MultiSimilarityLoss', 'PairMarginMiner')}
RTOL, ATOL = 1e-5, 1e-6


def _pml_kwargs(kwargs):
  kwargs = dict(kwargs or {})
  if 'distance' in kwargs:
    kwargs['distance'] = getattr(pml_distances, kwargs['distance'])()
  return kwargs


def _reference(x, labels, loss_name, loss_kwargs, miner_name, miner_kwargs,
               dtype=torch.float32):
  """pml's loss, gradient w.r.t. the descriptors, and miner output (None without a miner)."""
  loss_module = getattr(pml_losses, loss_name)(**_pml_kwargs(loss_kwargs))
  x_t = torch.tensor(np.asarray(x), dtype=dtype, requires_grad=True)
  labels_t = torch.tensor(np.asarray(labels), dtype=torch.long)
  mined = None
  if miner_name is None:
    loss = loss_module(x_t, labels_t)
  else:
    miner = getattr(pml_miners, miner_name)(**_pml_kwargs(miner_kwargs))
    mined = miner(x_t, labels_t)
    loss = loss_module(x_t, labels_t, mined)
  loss.backward()
  return float(loss.detach()), x_t.grad.numpy().astype(np.float64), mined


def _ours(x, labels, loss_name, loss_params=None, miner_name=None, miner_params=None):
  loss_fn = losses.make_loss(loss_name, loss_params, miner_name, miner_params)
  (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(
      jnp.asarray(x, jnp.float32), jnp.asarray(labels, jnp.int32))
  return float(loss), np.asarray(grad, np.float64), jax.tree.map(float, metrics)


def _batch(places, per_place, dim=8, seed=0, spread=0.8):
  """Clustered descriptors with norms far from 1, shuffled, non-contiguous place ids."""
  rng = np.random.default_rng(seed)
  place = np.repeat(np.arange(places), per_place)
  centers = rng.normal(size=(places, dim))
  x = centers[place] + spread * rng.normal(size=(place.size, dim))
  x *= rng.uniform(0.3, 3.0, size=(place.size, 1))
  order = rng.permutation(place.size)
  return x[order].astype(np.float32), (7 * place[order] + 3).astype(np.int32)


def _assert_matches(x, labels, loss_name, miner_name, loss_kwargs=None, miner_kwargs=None,
                    rtol=RTOL, atol=ATOL, reference_dtype=torch.float32, seed_defaults=True):
  """Our loss and gradient equal pml's; returns pml's loss and miner output."""
  if seed_defaults:
    loss_kwargs, miner_kwargs = SEED_LOSSES[loss_name], SEED_MINERS[miner_name]
    ours = _ours(x, labels, loss_name, None, miner_name, None)
  else:
    ours = _ours(x, labels, loss_name, loss_kwargs, miner_name, miner_kwargs)
  ref_loss, ref_grad, mined = _reference(x, labels, loss_name, loss_kwargs, miner_name,
                                         miner_kwargs, reference_dtype)
  loss, grad, metrics = ours
  np.testing.assert_allclose(loss, ref_loss, rtol=rtol, atol=atol, err_msg='loss')
  np.testing.assert_allclose(grad, ref_grad, rtol=rtol, atol=atol, err_msg='gradient')
  return ref_loss, mined, metrics


@pytest.mark.parametrize('shape', [(4, 2), (8, 4), (5, 3)], ids=lambda s: f'{s[0]}x{s[1]}')
@pytest.mark.parametrize('loss_name,miner_name', ALL_COMBINATIONS)
def test_seed_parameters_match_pml(loss_name, miner_name, shape):
  x, labels = _batch(*shape, seed=shape[0])
  ref_loss, _, _ = _assert_matches(x, labels, loss_name, miner_name)
  if shape == (8, 4):  # Guards against a vacuous comparison of two zeros.
    assert ref_loss > 0


@pytest.mark.parametrize('type_of_triplets', losses.TRIPLET_TYPES)
@pytest.mark.parametrize('loss_name', ['TripletMarginLoss', 'MultiSimilarityLoss',
                                       'ContrastiveLoss'])
def test_triplet_miner_types_match_pml(loss_name, type_of_triplets):
  x, labels = _batch(8, 4, seed=1)
  miner_kwargs = dict(margin=0.1, type_of_triplets=type_of_triplets)
  _, mined, metrics = _assert_matches(x, labels, loss_name, 'TripletMarginMiner',
                                      SEED_LOSSES[loss_name], miner_kwargs, seed_defaults=False)
  assert metrics['num_triplets'] == len(mined[0]) > 0


# Each parameter that the seed sets differently from pml's default is given explicitly.
NON_DEFAULT_CASES = [
    ('MultiSimilarityLoss', dict(alpha=2.0, beta=40.0, base=0.5, distance='CosineSimilarity'),
     'MultiSimilarityMiner', dict(epsilon=0.05, distance='DotProductSimilarity')),
    ('MultiSimilarityLoss', dict(alpha=2.0, beta=10.0, base=0.8, distance='LpDistance'),
     'MultiSimilarityMiner', dict(epsilon=0.2, distance='LpDistance')),
    ('MultiSimilarityLoss', dict(alpha=0.5, beta=20.0, base=0.3), None, None),
    ('ContrastiveLoss', dict(pos_margin=0.1, neg_margin=0.8),
     'PairMarginMiner', dict(pos_margin=0.2, neg_margin=0.8, distance='LpDistance')),
    ('ContrastiveLoss', dict(pos_margin=0.9, neg_margin=0.2, distance='DotProductSimilarity'),
     'PairMarginMiner', dict(pos_margin=0.8, neg_margin=0.1, distance='DotProductSimilarity')),
    ('ContrastiveLoss', dict(pos_margin=0.2, neg_margin=1.2), 'MultiSimilarityMiner',
     dict(epsilon=0.3)),
    ('TripletMarginLoss', dict(margin=0.3, swap=True), 'TripletMarginMiner',
     dict(margin=0.3, type_of_triplets='all')),
    ('TripletMarginLoss', dict(margin=0.2, smooth_loss=True), None, None),
    ('TripletMarginLoss', dict(margin=0.2, swap=True, smooth_loss=True,
                               distance='DotProductSimilarity'),
     'TripletMarginMiner', dict(margin=0.2, type_of_triplets='all',
                                distance='DotProductSimilarity')),
    ('TripletMarginLoss', dict(margin=0.1), 'MultiSimilarityMiner', dict(epsilon=0.1)),
    ('TripletMarginLoss', dict(margin=0.1), 'PairMarginMiner',
     dict(pos_margin=0.7, neg_margin=0.3, distance='DotProductSimilarity')),
]


@pytest.mark.parametrize('case', NON_DEFAULT_CASES, ids=lambda c: f'{c[0]}-{c[2]}')
def test_non_default_parameters_match_pml(case):
  loss_name, loss_kwargs, miner_name, miner_kwargs = case
  x, labels = _batch(8, 4, seed=2)
  ref_loss, _, _ = _assert_matches(x, labels, loss_name, miner_name, loss_kwargs, miner_kwargs,
                                   seed_defaults=False)
  assert ref_loss > 0


@pytest.mark.parametrize('loss_name,miner_name', ALL_COMBINATIONS)
def test_place_with_a_single_image_matches_pml(loss_name, miner_name):
  x, labels = _batch(5, 3, seed=3)
  labels[0] = 1000  # A place of its own; the place it left keeps two images.
  _assert_matches(x, labels, loss_name, miner_name)


@pytest.mark.parametrize('loss_name,miner_name', ALL_COMBINATIONS)
def test_near_duplicate_descriptors_match_pml(loss_name, miner_name):
  x, labels = _batch(8, 4, seed=4, spread=0.01)
  if (loss_name, miner_name) in SIMILARITY_ONLY:
    _assert_matches(x, labels, loss_name, miner_name)
  else:
    # A float32 distance of ~1e-2 computed from similarities near 1 (as torch.cdist does for
    # more than 25 rows) carries ~1e-5 absolute error in any implementation, so compare with
    # pml in float64 at a tolerance that this conditioning allows.
    _assert_matches(x, labels, loss_name, miner_name, SEED_LOSSES[loss_name],
                    SEED_MINERS[miner_name], rtol=2e-3, atol=2e-5,
                    reference_dtype=torch.float64, seed_defaults=False)


# Batch sizes are those of the other tests: every new size costs a compilation of each operation.
@pytest.mark.parametrize('labels', [np.zeros(8, np.int32), np.arange(8, dtype=np.int32)],
                         ids=['one_place', 'no_positive_pair'])
@pytest.mark.parametrize('loss_name,miner_name', ALL_COMBINATIONS)
def test_degenerate_batches_match_pml(loss_name, miner_name, labels):
  x, _ = _batch(4, 2, seed=5)
  _assert_matches(x, labels, loss_name, miner_name)


@pytest.mark.parametrize('loss_name,miner_name', [
    ('MultiSimilarityLoss', 'MultiSimilarityMiner'), ('ContrastiveLoss', 'MultiSimilarityMiner'),
    ('MultiSimilarityLoss', 'TripletMarginMiner'), ('ContrastiveLoss', 'TripletMarginMiner'),
    ('TripletMarginLoss', 'TripletMarginMiner')])
def test_a_single_mined_tuple_matches_pml(loss_name, miner_name):
  # In this batch the seed's miners find one triplet, or one positive and one negative pair:
  # pml's pair losses then return 0, its triplet loss does not.
  x, labels = _batch(4, 2, seed=8)
  ref_loss, mined, metrics = _assert_matches(x, labels, loss_name, miner_name)
  assert all(len(indices) == 1 for indices in mined)
  assert (ref_loss > 0) == (loss_name == 'TripletMarginLoss')


@pytest.mark.parametrize('miner_name', list(SEED_MINERS))
def test_b_acc_and_counts_match_pml_miner_output(miner_name):
  x, labels = _batch(8, 4, seed=6)
  labels[:3] = 1000 + np.arange(3)  # Three places with a single image: never anchors.
  _, _, metrics = _ours(x, labels, 'MultiSimilarityLoss', None, miner_name, None)
  labels_t = torch.tensor(labels, dtype=torch.long)
  if miner_name is None:
    mined = pml_lmu.get_all_pairs_indices(labels_t)
  else:
    miner = getattr(pml_miners, miner_name)(**_pml_kwargs(SEED_MINERS[miner_name]))
    mined = miner(torch.tensor(x), labels_t)
  expected = 1.0 - len(set(mined[0].numpy().tolist())) / len(labels)
  assert 0.0 < expected < 1.0
  np.testing.assert_allclose(metrics['b_acc'], expected, rtol=1e-6)
  if len(mined) == 4:
    assert metrics['num_pos_pairs'] == len(mined[0])
    assert metrics['num_neg_pairs'] == len(mined[2])
  else:
    assert metrics['num_triplets'] == len(mined[0])


@pytest.mark.parametrize('loss_name,miner_name', ALL_COMBINATIONS)
def test_identical_descriptors_are_finite_and_match_pml(loss_name, miner_name):
  labels = np.repeat(np.arange(4), 2).astype(np.int32)
  x = np.tile(np.linspace(-1.0, 2.0, 8, dtype=np.float32), (8, 1))
  loss, grad, metrics = _ours(x, labels, loss_name, None, miner_name, None)
  assert np.isfinite(loss) and np.all(np.isfinite(grad))
  assert all(np.isfinite(v) for v in metrics.values())
  _assert_matches(x, labels, loss_name, miner_name, atol=1e-5)


def test_zero_descriptor_has_finite_gradient():
  x, labels = _batch(4, 2, seed=7)
  x[0] = 0.0
  for loss_name, miner_name in ALL_COMBINATIONS:
    loss, grad, _ = _ours(x, labels, loss_name, None, miner_name, None)
    assert np.isfinite(loss) and np.all(np.isfinite(grad)), (loss_name, miner_name)


def test_seed_config_gives_the_defaults_and_accepts_place_shaped_batches():
  path = pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'default.py'
  spec = importlib.util.spec_from_file_location('default_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config().loss
  from_config = losses.make_loss(cfg.name, cfg.params, cfg.miner_name, cfg.miner_params)
  x, labels = _batch(8, 4, seed=8)
  expected, _ = losses.make_loss('MultiSimilarityLoss', None, 'MultiSimilarityMiner')(x, labels)
  order = np.argsort(labels, kind='stable')
  x_pk = jnp.asarray(x[order].reshape(8, 4, -1), jnp.bfloat16)
  loss, _ = from_config(x_pk, labels[order].reshape(8, 4))
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, expected, rtol=2e-2)  # bfloat16 input.


def test_jit_does_not_retrace_for_the_same_shape():
  traces = []
  loss_fn = losses.make_loss('TripletMarginLoss', None, 'TripletMarginMiner')

  @jax.jit
  def step(x, labels):
    traces.append(None)
    return jax.value_and_grad(loss_fn, has_aux=True)(x, labels)

  for seed in range(3):
    x, labels = _batch(8, 4, seed=seed)
    jax.block_until_ready(step(x, labels))
  assert len(traces) == 1


@pytest.mark.parametrize('loss_name,miner_name', [('MultiSimilarityLoss', 'MultiSimilarityMiner'),
                                                  ('TripletMarginLoss', 'TripletMarginMiner')])
def test_pmap_with_all_gather_equals_unsharded(loss_name, miner_name):
  devices = jax.local_devices()
  if len(devices) < 8:
    pytest.skip('needs 8 devices (tests/conftest.py sets 8 virtual CPU devices)')
  loss_fn = losses.make_loss(loss_name, None, miner_name)
  x, labels = _batch(8, 4, seed=9)
  expected, expected_metrics = jax.jit(loss_fn)(x, labels)

  def sharded(x_local, labels_local):
    x_all = jax.lax.all_gather(x_local, 'batch', tiled=True)
    labels_all = jax.lax.all_gather(labels_local, 'batch', tiled=True)
    return loss_fn(x_all, labels_all)

  loss, metrics = jax.pmap(sharded, axis_name='batch')(x.reshape(8, 4, -1), labels.reshape(8, 4))
  np.testing.assert_allclose(np.asarray(loss), np.full(8, expected), rtol=1e-6)
  np.testing.assert_allclose(metrics['b_acc'], np.full(8, expected_metrics['b_acc']))


def test_bad_names_and_parameters_raise_clear_errors():
  with pytest.raises(ValueError, match='valid choices.*MultiSimilarityLoss'):
    losses.make_loss('CircleLoss')
  with pytest.raises(ValueError, match='valid choices.*PairMarginMiner'):
    losses.make_loss('ContrastiveLoss', None, 'BatchHardMiner')
  with pytest.raises(ValueError, match=r"Unknown loss parameter.*\['alpha'\].*ContrastiveLoss"):
    losses.make_loss('ContrastiveLoss', {'alpha': 1.0})
  with pytest.raises(ValueError, match='distance.*LpDistance'):
    losses.make_loss('ContrastiveLoss', {'distance': 'SNRDistance'})
  with pytest.raises(ValueError, match='triplets_per_anchor'):
    losses.make_loss('TripletMarginLoss', {'triplets_per_anchor': 10})
  with pytest.raises(ValueError, match='type_of_triplets.*semihard'):
    losses.make_loss('TripletMarginLoss', None, 'TripletMarginMiner',
                     {'type_of_triplets': 'medium'})
  with pytest.raises(ValueError, match='swap.*bool'):
    losses.make_loss('TripletMarginLoss', {'swap': 'yes'})
  with pytest.raises(ValueError, match='beta.*> 0'):
    losses.make_loss('MultiSimilarityLoss', {'beta': 0})
  loss_fn = losses.make_loss('MultiSimilarityLoss')
  with pytest.raises(ValueError, match='same leading shape'):
    loss_fn(jnp.zeros((4, 8)), jnp.zeros((5,), jnp.int32))
