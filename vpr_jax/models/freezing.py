"""Which parameters are frozen: a boolean pytree from the names of the frozen modules."""

from typing import Any, Collection

import jax


def frozen_mask(params: Any, frozen_modules: Collection[str]) -> Any:
  """True for every parameter under a frozen module of the backbone.

  Args:
    params: the backbone's params, or the whole model's (then only those under 'backbone' can
      be frozen).
    frozen_modules: names of the backbone's top-level modules that are frozen.

  Returns:
    A pytree of bools with the structure of `params`.
  """
  frozen_modules = set(frozen_modules)
  has_backbone = 'backbone' in params

  def is_frozen(path):
    keys = [getattr(k, 'key', getattr(k, 'name', k)) for k in path]
    if has_backbone:
      if not keys or keys[0] != 'backbone':
        return False
      keys = keys[1:]
    return bool(keys) and keys[0] in frozen_modules

  return jax.tree_util.tree_map_with_path(lambda path, _: is_frozen(path), params)
