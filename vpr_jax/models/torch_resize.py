"""torch's bicubic F.interpolate on JAX arrays, with the weights of `data.bicubic_weights`."""

import jax
import jax.numpy as jnp

from vpr_jax.data.imaging import bicubic_weights

def resize_bicubic(x: jax.Array, out_hw: tuple[int, int], scale_factor=None,
                   antialias: bool = False) -> jax.Array:
  """torch's `F.interpolate(mode='bicubic', align_corners=False)` on the H, W axes of NHWC input.

  Args:
    x: [B, H, W, C] (any float dtype; computed in float32).
    out_hw: output (H, W).
    scale_factor: None, or the (sh, sw) scale factors torch was given (they set the sampling step).
    antialias: torch's antialias flag.

  Returns:
    float32 [B, out_h, out_w, C].
  """
  _, h, w, _ = x.shape
  sh, sw = (None, None) if scale_factor is None else scale_factor
  mh = jnp.asarray(bicubic_weights.bicubic_matrix(h, int(out_hw[0]), sh, antialias))
  mw = jnp.asarray(bicubic_weights.bicubic_matrix(w, int(out_hw[1]), sw, antialias))
  return jnp.einsum('bhwc,ih,jw->bijc', x.astype(jnp.float32), mh, mw,
                    precision=jax.lax.Precision.HIGHEST)
