"""DINOv2 vision transformers (ViT-S/14, B/14, L/14, g/14) as torch hub builds them, NHWC input.

The module tree follows the hub model's names so that state dicts convert one to one:
`patch_embed` (hub: `patch_embed.proj`, a 14x14 stride-14 conv), `cls_token`, `pos_embed` (a
37x37 grid + the class position, learned at 518x518), optional `register_tokens`, blocks
`blocks_<i>` (hub: `blocks.<i>`) each holding `norm1`, `attn.qkv`, `attn.proj`, `ls1.gamma`,
`norm2`, `mlp.fc1`, `mlp.fc2` (ViT-g: the SwiGLU `mlp.w12`, `mlp.w3`), `ls2.gamma`, and the final
`norm`. The hub's `mask_token` (used
only by DINOv2's masked pre-training) is not part of the module.

For an input whose patch grid differs from the learned one, the position embeddings are resampled
exactly as the hub's `interpolate_pos_encoding`: torch's bicubic interpolation driven by the scale
factor (grid + interpolate_offset) / M (hub default offset 0.1), or, with offset 0 (the register
models), by the output size, with antialiasing where the model asks for it.

Mixed precision: parameters are float32; matrix products run in `dtype`; the residual stream,
LayerNorms and the attention softmax stay in float32 (as torch autocast keeps them).
"""

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vpr_jax.models import aggregators
from vpr_jax.models import freezing
from vpr_jax.models import torch_resize

# (embed_dim, depth, num_heads, ffn kind) of the hub's dinov2_vit*14 models.
DINOV2_ARCHS = {
    'dinov2_vits14': (384, 12, 6, 'mlp'),
    'dinov2_vitb14': (768, 12, 12, 'mlp'),
    'dinov2_vitl14': (1024, 24, 16, 'mlp'),
    'dinov2_vitg14': (1536, 40, 24, 'swiglu'),
}
PATCH_SIZE = 14
# The hub models are built for 518x518 images: a 37x37 grid of position embeddings.
PRETRAINED_GRID = 37
FFN_KINDS = ('mlp', 'swiglu')
# Top-level parameter names frozen together with the blocks (DINOv2's token embedding).
EMBEDDING_PARAMS = ('patch_embed', 'cls_token', 'pos_embed', 'register_tokens')

# timm's ViT init as DINOv2 uses it: Linear weights trunc_normal(std=0.02), biases zero.
linear_kernel_init = aggregators.mixer_kernel_init


def block_name(index: int) -> str:
  """Flax name of transformer block `index` (the hub's `blocks.<index>`)."""
  return f'blocks_{index}'


def arch_spec(name: str) -> tuple[int, int, int, str]:
  """(embed_dim, depth, num_heads, ffn kind) of a hub model name such as 'dinov2_vitb14'."""
  if name not in DINOV2_ARCHS:
    raise ValueError(f'Unknown DINOv2 model {name!r}; valid choices: {", ".join(DINOV2_ARCHS)}.')
  return DINOV2_ARCHS[name]


def swiglu_hidden_features(embed_dim: int, mlp_ratio: float) -> int:
  """Hidden width of the hub's SwiGLUFFNFused: 2/3 of the MLP width, rounded up to 8."""
  hidden = int(embed_dim * mlp_ratio)
  return (int(hidden * 2 / 3) + 7) // 8 * 8


def patch_grid(image_size, patch_size: int = PATCH_SIZE) -> tuple[int, int]:
  """(h, w) of the patch-token grid for images of `image_size` (H, W), both multiples of 14."""
  h, w = (int(s) for s in image_size)
  if h % patch_size or w % patch_size:
    raise ValueError(f'Image size {(h, w)} is not a multiple of the patch size {patch_size}: '
                     'DINOv2 needs both sides divisible by it (e.g. 224 or 322).')
  return h // patch_size, w // patch_size


def interpolate_pos_embed(pos_embed: jax.Array, image_hw, patch_size: int = PATCH_SIZE,
                          interpolate_offset: float = 0.1,
                          interpolate_antialias: bool = False) -> jax.Array:
  """The hub's `interpolate_pos_encoding`: position embeddings for an image of `image_hw`.

  Args:
    pos_embed: [1, 1 + M*M, D] (class position first).
    image_hw: (H, W) of the input image in pixels.
    patch_size: the patch size.
    interpolate_offset: > 0: resample with scale factors ((h0 + offset) / M, (w0 + offset) / M),
      as the hub does by default (0.1); 0: resample to the size (h0, w0).
    interpolate_antialias: torch's antialias flag (True for the hub's register models).

  Returns:
    float32 [1, 1 + h0*w0, D] (unchanged when the grid is the learned square one and H == W).
  """
  height, width = (int(s) for s in image_hw)
  h0, w0 = height // patch_size, width // patch_size
  num_positions = pos_embed.shape[1] - 1
  grid = int(math.sqrt(num_positions))
  if grid * grid != num_positions:
    raise ValueError(f'pos_embed holds {num_positions} patch positions, not a square grid.')
  pos_embed = pos_embed.astype(jnp.float32)
  if h0 * w0 == num_positions and height == width:
    return pos_embed
  dim = pos_embed.shape[-1]
  patch_pos = pos_embed[:, 1:].reshape(1, grid, grid, dim)
  scale = None
  if interpolate_offset:
    scale = (float(h0 + interpolate_offset) / grid, float(w0 + interpolate_offset) / grid)
  patch_pos = torch_resize.resize_bicubic(patch_pos, (h0, w0), scale, interpolate_antialias)
  return jnp.concatenate([pos_embed[:, :1], patch_pos.reshape(1, h0 * w0, dim)], axis=1)


def _dense(features: int, dtype: Any, name: str, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=linear_kernel_init, bias_init=nn.initializers.zeros, name=name)


def _layer_norm(name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=jnp.float32,
                      param_dtype=jnp.float32, name=name)


class Attention(nn.Module):
  """Multi-head self-attention with a fused `qkv` projection and an output `proj`."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, c = x.shape
    head_dim = c // self.num_heads
    qkv = _dense(3 * c, self.dtype, 'qkv')(x.astype(self.dtype))
    qkv = qkv.reshape(b, n, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) * (head_dim ** -0.5)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(b, n, c)
    return _dense(c, self.dtype, 'proj')(out)


class Mlp(nn.Module):
  """fc1 -> exact GELU -> fc2."""
  hidden_features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    y = _dense(self.hidden_features, self.dtype, 'fc1')(x.astype(self.dtype))
    y = jax.nn.gelu(y.astype(jnp.float32), approximate=False).astype(self.dtype)
    return _dense(c, self.dtype, 'fc2')(y)


class SwiGLUFFN(nn.Module):
  """The hub's SwiGLUFFNFused: w12 -> (silu(x1) * x2) -> w3."""
  hidden_features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    x12 = _dense(2 * self.hidden_features, self.dtype, 'w12')(x.astype(self.dtype))
    x1, x2 = jnp.split(x12.astype(jnp.float32), 2, axis=-1)
    hidden = (jax.nn.silu(x1) * x2).astype(self.dtype)
    return _dense(c, self.dtype, 'w3')(hidden)


class LayerScale(nn.Module):
  """x * gamma, gamma initialised to `init_values`."""
  init_values: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    gamma = self.param('gamma', nn.initializers.constant(self.init_values), (x.shape[-1],),
                       jnp.float32)
    return x.astype(jnp.float32) * gamma


class Block(nn.Module):
  """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""
  num_heads: int
  mlp_ratio: float = 4.0
  ffn: str = 'mlp'
  layer_scale_init: Optional[float] = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    y = Attention(self.num_heads, self.dtype, name='attn')(_layer_norm('norm1')(x))
    if self.layer_scale_init:
      y = LayerScale(self.layer_scale_init, name='ls1')(y)
    x = x + y.astype(jnp.float32)
    if self.ffn == 'swiglu':
      ffn = SwiGLUFFN(swiglu_hidden_features(c, self.mlp_ratio), self.dtype, name='mlp')
    else:
      ffn = Mlp(int(c * self.mlp_ratio), self.dtype, name='mlp')
    y = ffn(_layer_norm('norm2')(x))
    if self.layer_scale_init:
      y = LayerScale(self.layer_scale_init, name='ls2')(y)
    return x + y.astype(jnp.float32)


class DinoV2(nn.Module):
  """DINOv2 ViT backbone on NHWC images, returning its patch tokens and class token.

  Attributes:
    embed_dim: token width (ViT-S 384, B 768, L 1024, g 1536).
    depth: number of blocks.
    num_heads: attention heads.
    mlp_ratio: MLP width / embed_dim.
    ffn: 'mlp' (GELU MLP) or 'swiglu' (ViT-g).
    patch_size: 14.
    pretrained_grid: side M of the learned position-embedding grid (37 for the hub's 518 px).
    num_register_tokens: 0, or 4 for the hub's `*_reg` models.
    interpolate_offset: 0.1 (hub default) or 0.0 (register models); see `interpolate_pos_embed`.
    interpolate_antialias: False (hub default) or True (register models).
    layer_scale_init: LayerScale init (the hub builds 1.0); None for no LayerScale.
    apply_final_norm: apply the final LayerNorm to the returned tokens (SALAD: yes, BoQ: no).
    num_trainable_blocks: -1 trains everything; N in 0..depth trains only the last N blocks (and
      the final norm): the tokens entering block depth - N are cut from the gradient, and
      `frozen_param_mask` lists the parameters to keep out of the optimizer.
    dtype: compute dtype of the matrix products.
  """
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  ffn: str = 'mlp'
  patch_size: int = PATCH_SIZE
  pretrained_grid: int = PRETRAINED_GRID
  num_register_tokens: int = 0
  interpolate_offset: float = 0.1
  interpolate_antialias: bool = False
  layer_scale_init: Optional[float] = 1.0
  apply_final_norm: bool = True
  num_trainable_blocks: int = -1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """Runs the backbone.

    Args:
      x: normalised images [B, H, W, 3], H and W multiples of the patch size.
      train: unused (no dropout or batch statistics); kept for the backbones' common signature.

    Returns:
      Dict with 'features' (patch tokens as a grid [B, H/14, W/14, D], float32), 'class_token'
      ([B, D]) and, with registers, 'register_tokens' ([B, R, D]); all after the final norm when
      `apply_final_norm`.
    """
    del train
    if self.ffn not in FFN_KINDS:
      raise ValueError(f'Unknown ffn {self.ffn!r}; valid choices: {", ".join(FFN_KINDS)}.')
    if not -1 <= self.num_trainable_blocks <= self.depth:
      raise ValueError(f'num_trainable_blocks must be in -1..{self.depth}, got '
                       f'{self.num_trainable_blocks!r}.')
    b, height, width, _ = x.shape
    h0, w0 = patch_grid((height, width), self.patch_size)
    dim = self.embed_dim

    tokens = nn.Conv(dim, (self.patch_size, self.patch_size),
                     strides=(self.patch_size, self.patch_size), padding='VALID',
                     dtype=self.dtype, param_dtype=jnp.float32,
                     kernel_init=aggregators.torch_linear_kernel_init,
                     bias_init=aggregators.torch_bias_init(3 * self.patch_size ** 2),
                     name='patch_embed')(x.astype(self.dtype))
    tokens = tokens.reshape(b, h0 * w0, dim).astype(jnp.float32)
    cls_token = self.param('cls_token', nn.initializers.normal(1e-6), (1, 1, dim), jnp.float32)
    pos_embed = self.param('pos_embed', linear_kernel_init,
                           (1, self.pretrained_grid ** 2 + 1, dim), jnp.float32)
    tokens = jnp.concatenate([jnp.broadcast_to(cls_token, (b, 1, dim)), tokens], axis=1)
    tokens = tokens + interpolate_pos_embed(pos_embed, (height, width), self.patch_size,
                                            self.interpolate_offset, self.interpolate_antialias)
    num_prefix = 1 + self.num_register_tokens
    if self.num_register_tokens:
      registers = self.param('register_tokens', nn.initializers.normal(1e-6),
                             (1, self.num_register_tokens, dim), jnp.float32)
      tokens = jnp.concatenate(
          [tokens[:, :1], jnp.broadcast_to(registers, (b, self.num_register_tokens, dim)),
           tokens[:, 1:]], axis=1)

    first_trainable = 0 if self.num_trainable_blocks < 0 else self.depth - self.num_trainable_blocks
    for i in range(self.depth):
      if i == first_trainable and self.num_trainable_blocks >= 0:
        tokens = jax.lax.stop_gradient(tokens)
      tokens = Block(self.num_heads, self.mlp_ratio, self.ffn, self.layer_scale_init, self.dtype,
                     name=block_name(i))(tokens)
    if self.num_trainable_blocks == 0:
      tokens = jax.lax.stop_gradient(tokens)
    if self.apply_final_norm:
      tokens = _layer_norm('norm')(tokens)

    outputs = {
        'features': tokens[:, num_prefix:].reshape(b, h0, w0, dim),
        'class_token': tokens[:, 0],
    }
    if self.num_register_tokens:
      outputs['register_tokens'] = tokens[:, 1:num_prefix]
    return outputs


def dinov2(name: str = 'dinov2_vitb14', **kwargs) -> DinoV2:
  """The hub model `name` ('dinov2_vits14', ..., 'dinov2_vitg14'); kwargs override attributes."""
  embed_dim, depth, num_heads, ffn = arch_spec(name)
  attributes = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, ffn=ffn)
  attributes.update(kwargs)
  return DinoV2(**attributes)


def frozen_param_mask(params: Any, num_trainable_blocks: int, depth: int) -> Any:
  """Pytree of bools, True for the DINOv2 parameters that do not train.

  As SALAD and BoQ train DINOv2: with N = num_trainable_blocks >= 0, the token embedding
  (patch_embed, cls_token, pos_embed, register_tokens) and blocks 0 .. depth - N - 1 are frozen;
  the last N blocks and the final norm train. -1 freezes nothing.

  Args:
    params: the model's params (top level 'backbone' / 'aggregator'), or the backbone's params.
    num_trainable_blocks: -1 or 0..depth.
    depth: number of blocks of the backbone.

  Returns:
    A pytree with the structure of `params` (usable as an optax mask after negation).
  """
  n = int(num_trainable_blocks)
  if not -1 <= n <= depth:
    raise ValueError(f'num_trainable_blocks must be in -1..{depth}, got {num_trainable_blocks!r}.')
  frozen = set()
  if n >= 0:
    frozen.update(EMBEDDING_PARAMS)
    frozen.update(block_name(i) for i in range(depth - n))
  return freezing.frozen_mask(params, frozen)
