"""Test setup: 8 virtual CPU devices (set before JAX starts) and parsed absl flags for grain."""

import os

# Must happen before jax is imported anywhere: data-parallel tests need several devices.
# The cheaper CPU compiler settings roughly halve compile time, which dominates these tiny tests.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8 '
                      '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from absl import flags  # noqa: E402
import pytest  # noqa: E402

# grain's worker processes read absl flags; tests do not go through absl.app.run.
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope='session')
def synthetic_root(tmp_path_factory):
  """A small synthetic dataset in every layout, generated once per test session."""
  from vpr_jax.data import synthetic
  root = tmp_path_factory.mktemp('vpr_data')
  synthetic.make_synthetic_dataset(str(root), seed=0, num_train_places=24, images_per_place=4,
                                   num_eval_places=8, image_size=(48, 64))
  return root
