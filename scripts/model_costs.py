r"""Parameters and FLOPs per image of the published DINOv2 / BoQ / SALAD / NetVLAD models.

Builds each model at full size with random weights (nothing is downloaded), counts its parameters
from the abstract variables, and reads XLA's cost analysis of the jitted float32 inference forward
(batch 1, CPU) at the model's train and eval image sizes. XLA counts a multiply-add as 2 FLOPs.

Usage:
  python scripts/model_costs.py [--models salad_dinov2,boq_dinov2,boq_r50,netvlad_r18]
"""

import argparse
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vpr_jax.models import boq
from vpr_jax.models import dinov2
from vpr_jax.models import netvlad
from vpr_jax.models import resnet
from vpr_jax.models import salad


class _Model(nn.Module):
  """Backbone + aggregator of one published configuration."""
  name: str

  def setup(self):
    if self.name == 'salad_dinov2':
      self.backbone = dinov2.dinov2('dinov2_vitb14', num_trainable_blocks=4, apply_final_norm=True)
      self.aggregator = salad.SALAD(num_clusters=64, cluster_dim=128, token_dim=256)
    elif self.name == 'boq_dinov2':
      self.backbone = dinov2.dinov2('dinov2_vitb14', num_trainable_blocks=2,
                                    apply_final_norm=False)
      self.aggregator = boq.BoQ(proj_channels=384, num_queries=64, num_layers=2, row_dim=32)
    elif self.name == 'boq_r50':
      self.backbone = resnet.ResNet(depth=50, layers_to_crop=(4,), layers_to_freeze=2)
      self.aggregator = boq.BoQ(proj_channels=512, num_queries=64, num_layers=2, row_dim=32)
    elif self.name == 'netvlad_r18':
      self.backbone = resnet.ResNet(depth=18, layers_to_crop=(4,), layers_to_freeze=2)
      self.aggregator = netvlad.NetVLAD(num_clusters=64)
    else:
      raise ValueError(f'Unknown model {self.name!r}.')

  def __call__(self, x):
    out = self.backbone(x)
    if self.name == 'salad_dinov2':
      return self.aggregator(out['features'], out['class_token'])
    return self.aggregator(out['features'])


# (train size, eval size) of each published recipe.
SIZES = {'salad_dinov2': (224, 322), 'boq_dinov2': (224, 322), 'boq_r50': (320, 384),
         'netvlad_r18': (224, 224)}


def _count(tree) -> int:
  return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


def measure(name: str) -> dict:
  """Parameter counts and forward FLOPs per image of one published model."""
  model = _Model(name=name)
  train_size, eval_size = SIZES[name]
  x = jnp.zeros((1, eval_size, eval_size, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  params = variables['params']
  result = {'model': name, 'params_backbone': _count(params['backbone']),
            'params_aggregator': _count(params['aggregator']), 'params_total': _count(params)}
  descriptor = jax.eval_shape(model.apply, variables, x)
  result['descriptor_dim'] = int(descriptor.shape[-1])
  for label, size in (('train', train_size), ('eval', eval_size)):
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    lowered = jax.jit(model.apply).lower(variables, images)
    cost = lowered.compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    result[f'gflops_{label}_{size}'] = round(float(cost['flops']) / 1e9, 2)
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default=','.join(SIZES))
  args = parser.parse_args()
  for name in args.models.split(','):
    print(json.dumps(measure(name)), flush=True)


if __name__ == '__main__':
  main()
