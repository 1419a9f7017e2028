"""Whole training steps against the gsv-cities family's own training code.

The oracle is the family's Lightning `VPRModel` (amaralibey/gsv-cities and amaralibey/MixVPR,
main.py; mldl24-vpr has the same methods), its methods written out below as PyTorch +
pytorch-metric-learning code and run step by step as Lightning runs them:
  - `training_step`: places [P, K, 3, H, W] -> images [P*K, ...], labels [P*K]; descriptors =
    aggregator(backbone(images)); `loss_function`: miner(descriptors, labels), then
    loss(descriptors, labels, miner_outputs), the losses and miners of `utils/losses.py`;
  - `configure_optimizers`: SGD(lr, weight_decay, momentum) for 'sgd', AdamW(lr, weight_decay)
    for 'adamw' and for 'adam', and MultiStepLR(milestones, gamma=lr_mult), which Lightning steps
    once at the end of every epoch;
  - `optimizer_step`: while global_step < warmup, every group's lr = min(1, (global_step + 1) /
    warmup) * lr, then optimizer.step();
  - the backbone is `models/backbones/resnet.py`'s `ResNet` on its pretrained path: conv1 + bn1
    and layer1..layer{layers_to_freeze} frozen with requires_grad_(False), cropped layers set to
    None, BatchNorm in train mode everywhere (frozen stages still normalise with batch statistics
    and update their running statistics); the aggregators are the family's modules
    (tests/test_aggregators.py).
vpr_jax starts from the same weights (converted with `mapping.family_checkpoint_to_flax`) and
trains the same batch of real photos with its compiled train step (`programs.get_programs`).

Tolerances are not picked: the same steps run by torch in float64 are the truth, and vpr_jax
(float32) must be within twice torch float32's own distance from it (the largest of five float32
runs that differ only in the order of the batch, `FLOAT32_ORDER_SEEDS`), for the losses of the
steps (largest over the steps) and for the evaluation descriptors of unseen real photos after the
last step. The optimisers, warm-ups and milestones are chosen so that a wrong schedule step, SGD's
weight decay left out or Nesterov momentum, and L2 weight decay for 'adam' each move these numbers
far beyond that tolerance.
"""

import copy
import dataclasses
from pathlib import Path

import jax
import numpy as np
from PIL import Image
import pytest

from tests.test_aggregators import torch_reference_modules
from tests.test_resnet import randomised_torchvision_resnet
from tests.torch_vpr_references import GsvCitiesResNet
from vpr_jax.configs import default
from vpr_jax.configs import mixvpr_contrastive
from vpr_jax.configs import mixvpr_triplet
from vpr_jax.conversion import mapping
from vpr_jax.models import vpr_model
from vpr_jax.training import programs
from vpr_jax.training import state as train_state

torch = pytest.importorskip('torch', reason='torch is the reference implementation')
pml_losses = pytest.importorskip('pytorch_metric_learning.losses',
                                 reason='pytorch-metric-learning is the reference of the losses')
from pytorch_metric_learning import miners as pml_miners  # noqa: E402
from pytorch_metric_learning import distances as pml_distances  # noqa: E402

_REAL = Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'real'
_SF_XS_MINI = _REAL / 'sf_xs_mini'
_TOY = _REAL / 'toy_dataset'
pytestmark = pytest.mark.skipif(
    not (_SF_XS_MINI.is_dir() and _TOY.is_dir()),
    reason=f'the real test photos are not in {_REAL} (../shared/data/real)')

IMAGE_SIZE = (64, 64)
PLACES = 8
IMAGES_PER_PLACE = 4
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# Real photos: P places x K images (two years of one SF-XS place, each whole and cropped).


def _resized(path, box=None):
  with Image.open(path) as img:
    img = img.convert('RGB')
    if box is not None:
      w, h = img.size
      img = img.crop(tuple(int(round(f * s)) for f, s in zip(box, (w, h, w, h))))
    return np.asarray(img.resize(IMAGE_SIZE[::-1], Image.BILINEAR))


def _utm(path):
  east, north = path.name.split('@')[1:3]
  return float(east), float(north)


def real_batch():
  """uint8 [P*K, H, W, 3] (place-major, as the family's `places.view(BS*N, ...)`), labels [P*K]."""
  database = sorted((_SF_XS_MINI / 'database').glob('*.jpg'))[:PLACES]
  queries = sorted((_SF_XS_MINI / 'queries').glob('*.jpg'))[:PLACES]
  images, labels = [], []
  for place, (db, q) in enumerate(zip(database, queries)):
    assert np.hypot(*np.subtract(_utm(db), _utm(q))) <= 25.0, (db, q)  # one place, two years
    for view in (db, q):
      images += [_resized(view), _resized(view, box=(0.1, 0.1, 0.9, 0.9))]
    labels += [place] * IMAGES_PER_PLACE
  return np.stack(images), np.asarray(labels, np.int32)


def real_eval_images():
  """The toy dataset's 22 street photos, unseen in training."""
  paths = sorted(_TOY.glob('*/*.jpg'))
  return np.stack([_resized(p) for p in paths])


# ----------------------------------------------------------------------------------------------
# The family's training code (gsv-cities / MixVPR main.py, models/, utils/losses.py).


class FamilyVPRModel(torch.nn.Module):
  """main.py `VPRModel`: backbone + aggregator (the attribute names of the checkpoints)."""

  def __init__(self, backbone, aggregator):
    super().__init__()
    self.backbone = backbone
    self.aggregator = aggregator

  def forward(self, x):
    return self.aggregator(self.backbone(x))


def family_loss(loss_name):
  """utils/losses.py `get_loss`."""
  if loss_name == 'MultiSimilarityLoss':
    return pml_losses.MultiSimilarityLoss(alpha=1.0, beta=50, base=0.0,
                                          distance=pml_distances.DotProductSimilarity())
  if loss_name == 'ContrastiveLoss':
    return pml_losses.ContrastiveLoss(pos_margin=0, neg_margin=1)
  assert loss_name == 'TripletMarginLoss', loss_name
  return pml_losses.TripletMarginLoss(margin=0.1, swap=False, smooth_loss=False,
                                      triplets_per_anchor='all')


def family_miner(miner_name, margin=0.1):
  """utils/losses.py `get_miner` (VPRModel's miner_margin defaults to 0.1)."""
  if miner_name == 'TripletMarginMiner':
    return pml_miners.TripletMarginMiner(margin=margin, type_of_triplets='semihard')
  if miner_name == 'MultiSimilarityMiner':
    return pml_miners.MultiSimilarityMiner(epsilon=margin,
                                           distance=pml_distances.CosineSimilarity())
  assert miner_name == 'PairMarginMiner', miner_name
  return pml_miners.PairMarginMiner(pos_margin=0.7, neg_margin=0.3,
                                    distance=pml_distances.DotProductSimilarity())


@dataclasses.dataclass(frozen=True)
class Recipe:
  """The VPRModel hyper-parameters of a case (main.py's argument names in comments)."""
  aggregator: str
  layers_to_freeze: int
  layers_to_crop: tuple
  loss_name: str
  miner_name: str
  optimizer: str
  lr: float
  weight_decay: float
  momentum: float
  warmup_steps: int         # warmpup_steps
  milestones: tuple
  gamma: float              # lr_mult
  steps_per_epoch: int
  num_steps: int


def configure_optimizers(model, recipe):
  """main.py `VPRModel.configure_optimizers`."""
  if recipe.optimizer.lower() == 'sgd':
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr,
                                weight_decay=recipe.weight_decay, momentum=recipe.momentum)
  elif recipe.optimizer.lower() == 'adamw':
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr,
                                  weight_decay=recipe.weight_decay)
  elif recipe.optimizer.lower() == 'adam':
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr,
                                  weight_decay=recipe.weight_decay)
  else:
    raise ValueError(f'Optimizer {recipe.optimizer} has not been added to "configure_optimizers()"')
  scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(recipe.milestones),
                                                   gamma=recipe.gamma)
  return optimizer, scheduler


def family_training(model, recipe, images, labels, eval_images, dtype):
  """Lightning's fit loop over the VPRModel methods, the same batch every step.

  Returns:
    (loss of every step, eval-mode descriptors of `eval_images` after the last step).
  """
  to_input = lambda x: ((torch.from_numpy(x).permute(0, 3, 1, 2).to(dtype) / 255.0 -
                         torch.tensor(IMAGENET_MEAN, dtype=dtype).view(1, 3, 1, 1)) /
                        torch.tensor(IMAGENET_STD, dtype=dtype).view(1, 3, 1, 1))
  loss_fn, miner = family_loss(recipe.loss_name), family_miner(recipe.miner_name)
  optimizer, scheduler = configure_optimizers(model, recipe)
  places = to_input(images).view(PLACES, IMAGES_PER_PLACE, 3, *IMAGE_SIZE)
  place_labels = torch.from_numpy(labels.astype(np.int64)).view(PLACES, IMAGES_PER_PLACE)
  model.train()
  losses = []
  for global_step in range(recipe.num_steps):
    # training_step + loss_function
    bs, n, ch, h, w = places.shape
    descriptors = model(places.view(bs * n, ch, h, w))
    flat_labels = place_labels.view(-1)
    loss = loss_fn(descriptors, flat_labels, miner(descriptors, flat_labels))
    losses.append(loss.item())
    optimizer.zero_grad()
    loss.backward()
    # optimizer_step
    if global_step < recipe.warmup_steps:
      lr_scale = min(1., float(global_step + 1) / recipe.warmup_steps)
      for pg in optimizer.param_groups:
        pg['lr'] = lr_scale * recipe.lr
    optimizer.step()
    if (global_step + 1) % recipe.steps_per_epoch == 0:  # the end of an epoch
      scheduler.step()
  model.eval()
  with torch.no_grad():
    descriptors = model(to_input(eval_images)).numpy()
  return np.asarray(losses), descriptors


def family_model(recipe, config, seed=0):
  """The family's model for `recipe`, float32, with random (non-trivial) weights."""
  depth_name = str(config.model.backbone)
  net = randomised_torchvision_resnet(depth_name, seed)
  backbone = GsvCitiesResNet(layers_to_crop=recipe.layers_to_crop, net=net,
                             layers_to_freeze=recipe.layers_to_freeze)
  h, w, c = vpr_model.backbone_output_shape(config.model, config.image_size)
  ref = torch_reference_modules()
  torch.manual_seed(seed)
  mc = config.model
  if recipe.aggregator == 'gem':
    aggregator = ref.GeMPool(p=3)
  elif recipe.aggregator == 'convap':
    s1, s2 = mc.convap_pool_size
    aggregator = ref.ConvAP(c, mc.convap_out_channels, s1, s2)
  else:
    aggregator = ref.MixVPR(c, h, w, mc.mixvpr_out_channels, mc.mixvpr_mix_depth,
                            mc.mixvpr_mlp_ratio, mc.mixvpr_out_rows)
  return FamilyVPRModel(backbone, aggregator)


# ----------------------------------------------------------------------------------------------
# vpr_jax on the same recipe.


def vpr_jax_config(recipe, optimizer=None):
  """The vpr_jax config of `recipe`; the loss sections are the packaged recipe configs'."""
  config = default.get_config()
  config.image_size = IMAGE_SIZE
  config.data.places_per_batch = PLACES
  config.data.images_per_place = IMAGES_PER_PLACE
  config.data.augment = 'none'
  config.model.dtype = 'float32'
  config.model.layers_to_freeze = recipe.layers_to_freeze
  config.model.layers_to_crop = recipe.layers_to_crop
  config.model.aggregator = recipe.aggregator
  config.model.convap_out_channels = 64
  config.model.mixvpr_out_channels = 64
  config.model.mixvpr_mix_depth = 2
  loss_configs = {'MultiSimilarityLoss': default, 'ContrastiveLoss': mixvpr_contrastive,
                  'TripletMarginLoss': mixvpr_triplet}
  config.loss = loss_configs[recipe.loss_name].get_config().loss
  assert config.loss.miner_name == recipe.miner_name
  config.optim.optimizer = optimizer or recipe.optimizer
  config.optim.learning_rate = recipe.lr
  config.optim.weight_decay = recipe.weight_decay
  config.optim.momentum = recipe.momentum
  config.optim.warmup_steps = recipe.warmup_steps
  config.optim.schedule = 'multistep'
  config.optim.milestones = recipe.milestones
  config.optim.gamma = recipe.gamma
  config.num_epochs = -(-recipe.num_steps // recipe.steps_per_epoch)
  return config


def vpr_jax_training(config, recipe, state_dict, images, labels, eval_images):
  """vpr_jax's compiled train step from the converted weights, the same batch every step."""
  variables = mapping.family_checkpoint_to_flax(state_dict, config)
  progs = programs.get_programs(config, recipe.steps_per_epoch, devices=jax.devices()[:1])
  state = train_state.create_train_state(config, progs.model, None, tx=progs.tx,
                                         variables=variables)
  state = progs.dp.replicate(jax.device_get(state))
  batch = progs.dp.shard_batch({'images': images, 'labels': labels})
  losses = []
  for _ in range(recipe.num_steps):
    state, metrics = progs.train_step(state, batch, jax.random.PRNGKey(0))
    losses.append(float(metrics['loss']))
    assert float(metrics['finite']) == 1.0
  host = progs.dp.to_host(state)
  outputs = jax.jit(progs.eval_model.apply)(
      {'params': host.params, 'batch_stats': host.batch_stats}, eval_images)
  return np.asarray(losses), np.asarray(outputs['descriptors'])


# ----------------------------------------------------------------------------------------------
# The cases: every optimiser name, loss + miner and aggregator of the family once.

CASES = {
    # The seed's recipe made small (ResNet-18 frozen to layer2, MixVPR, MS loss + miner, AdamW),
    # cropped after layer2 to compile fast; the warm-up ends at step 1, the milestone passes at
    # step 2.
    'mixvpr_ms_adamw': Recipe(
        aggregator='mixvpr', layers_to_freeze=2, layers_to_crop=(3, 4),
        loss_name='MultiSimilarityLoss', miner_name='MultiSimilarityMiner', optimizer='adamw',
        lr=5e-4, weight_decay=1e-4, momentum=0.9, warmup_steps=2, milestones=(2,), gamma=0.3,
        steps_per_epoch=1, num_steps=4),
    # gsv-cities' SGD defaults (lr 0.03, weight decay 1e-3, momentum 0.9), ConvAP, triplets;
    # layer1 and layer2 train; the milestone passes at step 2 (two steps per epoch).
    'convap_triplet_sgd': Recipe(
        aggregator='convap', layers_to_freeze=1, layers_to_crop=(3, 4),
        loss_name='TripletMarginLoss', miner_name='TripletMarginMiner', optimizer='sgd',
        lr=0.03, weight_decay=1e-3, momentum=0.9, warmup_steps=1, milestones=(1,), gamma=0.3,
        steps_per_epoch=2, num_steps=4),
    # The family's optimizer='adam' (AdamW), GeM, contrastive loss + pair-margin miner; a weight
    # decay at which L2 and decoupled decay part within the four steps.
    'gem_contrastive_adam': Recipe(
        aggregator='gem', layers_to_freeze=0, layers_to_crop=(3, 4),
        loss_name='ContrastiveLoss', miner_name='PairMarginMiner', optimizer='adam',
        lr=1e-3, weight_decay=1e-2, momentum=0.9, warmup_steps=0, milestones=(3,), gamma=0.3,
        steps_per_epoch=1, num_steps=4),
}


@pytest.fixture(scope='module')
def real_data():
  images, labels = real_batch()
  return images, labels, real_eval_images()


# torch's float32 runs: the batch as loaded and in shuffled orders (places and the images of a
# place), the same computation (mining, losses and BatchNorm statistics do not depend on the
# order) rounded differently. Their largest distance from float64 is torch float32's own error:
# one run alone is a single draw of a rounding error that varies several-fold from draw to draw.
FLOAT32_ORDER_SEEDS = (None, 1, 2, 3, 4)


def _batch_order(seed):
  """Indices into the place-major batch: places shuffled, and the images within each place."""
  if seed is None:
    return np.arange(PLACES * IMAGES_PER_PLACE)
  rng = np.random.default_rng(seed)
  return np.concatenate([IMAGES_PER_PLACE * p + rng.permutation(IMAGES_PER_PLACE)
                         for p in rng.permutation(PLACES)])


def family_runs(recipe, config, real_data):
  """(initial state dict, torch float32 runs (one per batch order), torch float64 run).

  Each run is (losses, descriptors). torch runs on one thread: its float32 results depend on
  the thread count, and one thread is also the fastest on a shared machine.
  """
  images, labels, eval_images = real_data
  model = family_model(recipe, config)
  state_dict = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    run64 = family_training(copy.deepcopy(model).double(), recipe, images, labels, eval_images,
                            torch.float64)
    runs32 = []
    for seed in FLOAT32_ORDER_SEEDS:
      order = _batch_order(seed)
      runs32.append(family_training(copy.deepcopy(model), recipe, images[order], labels[order],
                                    eval_images, torch.float32))
  finally:
    torch.set_num_threads(threads)
  return state_dict, runs32, run64


def _distances(run, truth):
  return [float(np.max(np.abs(got - want))) for got, want in zip(run, truth)]


@pytest.mark.parametrize('case', sorted(CASES))
def test_training_steps_match_the_family(case, real_data):
  recipe = CASES[case]
  config = vpr_jax_config(recipe)
  state_dict, runs32, run64 = family_runs(recipe, config, real_data)
  ours = vpr_jax_training(config, recipe, state_dict, *real_data)
  loss_err, desc_err = _distances(ours, run64)
  # torch float32's own distance from float64: the largest over the batch orders.
  torch_loss_err, torch_desc_err = np.max([_distances(run, run64) for run in runs32], axis=0)
  print(f'{case}: losses {np.round(ours[0], 6)} (float64 {np.round(run64[0], 6)}); '
        f'max |loss - float64| vpr_jax {loss_err:.2e}, torch float32 {torch_loss_err:.2e}; '
        f'descriptors vpr_jax {desc_err:.2e}, torch float32 {torch_desc_err:.2e}')
  # The steps did something: the loss moved far beyond the rounding noise.
  assert np.max(np.abs(np.diff(run64[0]))) > 100 * torch_loss_err
  assert loss_err <= 2 * torch_loss_err, (ours[0], run64[0])
  assert desc_err <= 2 * torch_desc_err
