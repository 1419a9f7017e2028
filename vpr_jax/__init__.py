"""vpr_jax: Visual Place Recognition training and evaluation in JAX/Flax."""

__version__ = '0.1.0'
