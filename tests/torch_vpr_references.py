"""PyTorch reference modules written from the authors' definitions, for the parity tests.

DINOv2 (facebookresearch/dinov2: dinov2/models/vision_transformer.py and dinov2/layers/*, the parts
torch hub's `dinov2_vit*14` run in inference), SALAD (serizba/salad: models/aggregators/salad.py),
BoQ (amaralibey/Bag-of-Queries: src/boq.py) and NetVLAD (the gsv-cities family / deep visual
geo-localization benchmark layout: `conv` without bias, `centroids`, init from k-means), and the
gsv-cities / MixVPR whole model (main.py's `VPRModel`, models/backbones/resnet.py's `ResNet`; the
aggregators are in tests/test_aggregators.py). Parameter names match the released state dicts.
Only imported by tests (torch is a test oracle).
"""

import math

import numpy as np
from pytorch_metric_learning import distances
from pytorch_metric_learning import losses
from pytorch_metric_learning import miners
import torch
from torch import nn
import torch.nn.functional as F
import torchvision


# ----------------------------------------------------------------------------------------------
# DINOv2.


class Attention(nn.Module):

  def __init__(self, dim, num_heads):
    super().__init__()
    self.num_heads = num_heads
    self.qkv = nn.Linear(dim, dim * 3, bias=True)
    self.proj = nn.Linear(dim, dim, bias=True)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
    q, k, v = torch.unbind(qkv, 2)
    q, k, v = [t.transpose(1, 2) for t in (q, k, v)]
    x = F.scaled_dot_product_attention(q, k, v)
    return self.proj(x.transpose(1, 2).contiguous().view(b, n, c))


class Mlp(nn.Module):

  def __init__(self, in_features, hidden_features):
    super().__init__()
    self.fc1 = nn.Linear(in_features, hidden_features)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(hidden_features, in_features)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFNFused(nn.Module):

  def __init__(self, in_features, hidden_features):
    super().__init__()
    hidden_features = (int(hidden_features * 2 / 3) + 7) // 8 * 8
    self.w12 = nn.Linear(in_features, 2 * hidden_features)
    self.w3 = nn.Linear(hidden_features, in_features)

  def forward(self, x):
    x1, x2 = self.w12(x).chunk(2, dim=-1)
    return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):

  def __init__(self, dim, init_values):
    super().__init__()
    self.gamma = nn.Parameter(init_values * torch.ones(dim))

  def forward(self, x):
    return x * self.gamma


class Block(nn.Module):

  def __init__(self, dim, num_heads, mlp_ratio, ffn_layer, init_values):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, num_heads)
    self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = ffn_layer(dim, int(dim * mlp_ratio))
    self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

  def forward(self, x):
    x = x + self.ls1(self.attn(self.norm1(x)))
    return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):

  def __init__(self, img_size, patch_size, embed_dim):
    super().__init__()
    self.num_patches = (img_size // patch_size) ** 2
    self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class DinoVisionTransformer(nn.Module):
  """The hub ViT (block_chunks=0 as the hub builds it), without the unused head."""

  def __init__(self, img_size=518, patch_size=14, embed_dim=768, depth=12, num_heads=12,
               mlp_ratio=4.0, init_values=1.0, ffn_layer='mlp', num_register_tokens=0,
               interpolate_antialias=False, interpolate_offset=0.1):
    super().__init__()
    self.embed_dim = embed_dim
    self.patch_size = patch_size
    self.num_register_tokens = num_register_tokens
    self.interpolate_antialias = interpolate_antialias
    self.interpolate_offset = interpolate_offset
    self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim)
    num_patches = self.patch_embed.num_patches
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
    self.register_tokens = (nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
                            if num_register_tokens else None)
    ffn = SwiGLUFFNFused if ffn_layer == 'swiglu' else Mlp
    self.blocks = nn.ModuleList(
        [Block(embed_dim, num_heads, mlp_ratio, ffn, init_values) for _ in range(depth)])
    self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
    self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
    nn.init.trunc_normal_(self.pos_embed, std=0.02)
    nn.init.normal_(self.cls_token, std=1e-6)
    if self.register_tokens is not None:
      nn.init.normal_(self.register_tokens, std=1e-6)
    for m in self.modules():
      if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)

  def interpolate_pos_encoding(self, x, w, h):
    previous_dtype = x.dtype
    npatch = x.shape[1] - 1
    n = self.pos_embed.shape[1] - 1
    if npatch == n and w == h:
      return self.pos_embed
    pos_embed = self.pos_embed.float()
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = x.shape[-1]
    w0 = w // self.patch_size
    h0 = h // self.patch_size
    m = int(math.sqrt(n))
    kwargs = {}
    if self.interpolate_offset:
      sx = float(w0 + self.interpolate_offset) / m
      sy = float(h0 + self.interpolate_offset) / m
      kwargs['scale_factor'] = (sx, sy)
    else:
      kwargs['size'] = (w0, h0)
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, m, m, dim).permute(0, 3, 1, 2), mode='bicubic',
        antialias=self.interpolate_antialias, **kwargs)
    assert (w0, h0) == patch_pos_embed.shape[-2:]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)

  def prepare_tokens_with_masks(self, x):
    _, _, w, h = x.shape
    x = self.patch_embed(x)
    x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    x = x + self.interpolate_pos_encoding(x, w, h)
    if self.register_tokens is not None:
      x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
    return x

  def forward_features(self, x):
    x = self.prepare_tokens_with_masks(x)
    for blk in self.blocks:
      x = blk(x)
    x_norm = self.norm(x)
    return {
        'x_norm_clstoken': x_norm[:, 0],
        'x_norm_regtokens': x_norm[:, 1:self.num_register_tokens + 1],
        'x_norm_patchtokens': x_norm[:, self.num_register_tokens + 1:],
        'x_prenorm': x,
    }


class SaladDINOv2(nn.Module):
  """serizba/salad's backbone wrapper (`self.model` is the hub ViT)."""

  def __init__(self, model, num_trainable_blocks=4, norm_layer=True, return_token=True):
    super().__init__()
    self.model = model
    self.num_channels = model.embed_dim
    self.num_trainable_blocks = num_trainable_blocks
    self.norm_layer = norm_layer
    self.return_token = return_token

  def forward(self, x):
    b, _, h, w = x.shape
    x = self.model.prepare_tokens_with_masks(x)
    with torch.no_grad():
      for blk in self.model.blocks[:-self.num_trainable_blocks]:
        x = blk(x)
    x = x.detach()
    for blk in self.model.blocks[-self.num_trainable_blocks:]:
      x = blk(x)
    if self.norm_layer:
      x = self.model.norm(x)
    t = x[:, 0]
    f = x[:, 1:]
    p = self.model.patch_size
    f = f.reshape((b, h // p, w // p, self.num_channels)).permute(0, 3, 1, 2)
    if self.return_token:
      return f, t
    return f


class BoQDinoV2(nn.Module):
  """amaralibey/Bag-of-Queries' DinoV2 backbone wrapper (`self.dino` is the hub ViT)."""

  def __init__(self, dino, unfreeze_n_blocks=2):
    super().__init__()
    self.dino = dino
    self.unfreeze_n_blocks = unfreeze_n_blocks
    for param in self.dino.parameters():
      param.requires_grad = False
    for block in self.dino.blocks[-unfreeze_n_blocks:]:
      for param in block.parameters():
        param.requires_grad = True
    self.out_channels = self.dino.embed_dim

  def forward(self, x):
    b, _, h, w = x.shape
    with torch.no_grad():
      x = self.dino.prepare_tokens_with_masks(x)
      for blk in self.dino.blocks[:-self.unfreeze_n_blocks]:
        x = blk(x)
    for blk in self.dino.blocks[-self.unfreeze_n_blocks:]:
      x = blk(x)
    x = x[:, 1:]
    _, _, c = x.shape
    p = self.dino.patch_size
    return x.permute(0, 2, 1).view(b, c, h // p, w // p)


class BoQResNet(nn.Module):
  """amaralibey/Bag-of-Queries' ResNet backbone (src/backbones.py): `net` Sequential."""

  def __init__(self, resnet, crop_last_block=True):
    super().__init__()
    self.net = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
                             resnet.layer1, resnet.layer2, resnet.layer3,
                             *([] if crop_last_block else [resnet.layer4]))
    last = resnet.layer3[-1]
    self.out_channels = (last.conv3 if hasattr(last, 'conv3') else last.conv2).out_channels

  def forward(self, x):
    return self.net(x)


# ----------------------------------------------------------------------------------------------
# SALAD.


def log_otp_solver(log_a, log_b, m, num_iters=20, reg=1.0):
  m = m / reg
  u, v = torch.zeros_like(log_a), torch.zeros_like(log_b)
  for _ in range(num_iters):
    u = log_a - torch.logsumexp(m + v.unsqueeze(1), dim=2).squeeze()
    v = log_b - torch.logsumexp(m + u.unsqueeze(2), dim=1).squeeze()
  return m + u.unsqueeze(2) + v.unsqueeze(1)


def get_matching_probs(s, dustbin_score=1.0, num_iters=3, reg=1.0):
  batch_size, m, n = s.size()
  s_aug = torch.empty(batch_size, m + 1, n, dtype=s.dtype, device=s.device)
  s_aug[:, :m, :n] = s
  s_aug[:, m, :] = dustbin_score
  norm = -torch.tensor(math.log(n + m), device=s.device)
  log_a, log_b = norm.expand(m + 1).contiguous(), norm.expand(n).contiguous()
  log_a[-1] = log_a[-1] + math.log(n - m)
  log_a, log_b = log_a.expand(batch_size, -1), log_b.expand(batch_size, -1)
  log_p = log_otp_solver(log_a, log_b, s_aug, num_iters=num_iters, reg=reg)
  return log_p - norm


class SALAD(nn.Module):

  def __init__(self, num_channels=1536, num_clusters=64, cluster_dim=128, token_dim=256,
               dropout=0.3):
    super().__init__()
    self.num_channels = num_channels
    self.num_clusters = num_clusters
    self.cluster_dim = cluster_dim
    self.token_dim = token_dim
    dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
    self.token_features = nn.Sequential(
        nn.Linear(self.num_channels, 512), nn.ReLU(), nn.Linear(512, self.token_dim))
    self.cluster_features = nn.Sequential(
        nn.Conv2d(self.num_channels, 512, 1), dropout, nn.ReLU(),
        nn.Conv2d(512, self.cluster_dim, 1))
    self.score = nn.Sequential(
        nn.Conv2d(self.num_channels, 512, 1), dropout, nn.ReLU(),
        nn.Conv2d(512, self.num_clusters, 1))
    self.dust_bin = nn.Parameter(torch.tensor(1.))

  def forward(self, x):
    x, t = x
    f = self.cluster_features(x).flatten(2)
    p = self.score(x).flatten(2)
    t = self.token_features(t)
    p = get_matching_probs(p, self.dust_bin, 3)
    p = torch.exp(p)
    p = p[:, :-1, :]
    p = p.unsqueeze(1).repeat(1, self.cluster_dim, 1, 1)
    f = f.unsqueeze(2).repeat(1, 1, self.num_clusters, 1)
    f = torch.cat([
        F.normalize(t, p=2, dim=-1),
        F.normalize((f * p).sum(dim=-1), p=2, dim=1).flatten(1)
    ], dim=-1)
    return F.normalize(f, p=2, dim=-1)


# ----------------------------------------------------------------------------------------------
# BoQ.


class BoQBlock(nn.Module):

  def __init__(self, in_dim, num_queries, nheads=8):
    super().__init__()
    self.encoder = nn.TransformerEncoderLayer(d_model=in_dim, nhead=nheads,
                                              dim_feedforward=4 * in_dim, batch_first=True,
                                              dropout=0.)
    self.queries = nn.Parameter(torch.randn(1, num_queries, in_dim))
    self.self_attn = nn.MultiheadAttention(in_dim, num_heads=nheads, batch_first=True)
    self.norm_q = nn.LayerNorm(in_dim)
    self.cross_attn = nn.MultiheadAttention(in_dim, num_heads=nheads, batch_first=True)
    self.norm_out = nn.LayerNorm(in_dim)

  def forward(self, x):
    b = x.size(0)
    x = self.encoder(x)
    q = self.queries.repeat(b, 1, 1)
    q = q + self.self_attn(q, q, q)[0]
    q = self.norm_q(q)
    out, attn = self.cross_attn(q, x, x)
    out = self.norm_out(out)
    return x, out, attn.detach()


class BoQ(nn.Module):

  def __init__(self, in_channels=1024, proj_channels=512, num_queries=32, num_layers=2,
               row_dim=32):
    super().__init__()
    self.proj_c = nn.Conv2d(in_channels, proj_channels, kernel_size=3, padding=1)
    self.norm_input = nn.LayerNorm(proj_channels)
    in_dim = proj_channels
    self.boqs = nn.ModuleList([
        BoQBlock(in_dim, num_queries, nheads=in_dim // 64) for _ in range(num_layers)])
    self.fc = nn.Linear(num_layers * num_queries, row_dim)

  def forward(self, x):
    x = self.proj_c(x)
    x = x.flatten(2).permute(0, 2, 1)
    x = self.norm_input(x)
    outs = []
    attns = []
    for i in range(len(self.boqs)):
      x, out, attn = self.boqs[i](x)
      outs.append(out)
      attns.append(attn)
    out = torch.cat(outs, dim=1)
    out = self.fc(out.permute(0, 2, 1))
    out = out.flatten(1)
    out = F.normalize(out, p=2, dim=-1)
    return out, attns


# ----------------------------------------------------------------------------------------------
# NetVLAD.


class NetVLAD(nn.Module):

  def __init__(self, clusters_num=64, dim=128, normalize_input=True):
    super().__init__()
    self.clusters_num = clusters_num
    self.dim = dim
    self.normalize_input = normalize_input
    self.conv = nn.Conv2d(dim, clusters_num, kernel_size=(1, 1), bias=False)
    self.centroids = nn.Parameter(torch.rand(clusters_num, dim))

  def init_params(self, centroids, descriptors):
    centroids_assign = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    dots = np.dot(centroids_assign, descriptors.T)
    dots.sort(0)
    dots = dots[::-1, :]
    self.alpha = (-np.log(0.01) / np.mean(dots[0, :] - dots[1, :])).item()
    self.centroids = nn.Parameter(torch.from_numpy(centroids))
    self.conv.weight = nn.Parameter(
        torch.from_numpy(self.alpha * centroids_assign).unsqueeze(2).unsqueeze(3))
    self.conv.bias = None

  def forward(self, x):
    n, d = x.shape[:2]
    if self.normalize_input:
      x = F.normalize(x, p=2, dim=1)
    x_flatten = x.view(n, d, -1)
    soft_assign = self.conv(x).view(n, self.clusters_num, -1)
    soft_assign = F.softmax(soft_assign, dim=1)
    vlad = torch.zeros([n, self.clusters_num, d], dtype=x_flatten.dtype, device=x_flatten.device)
    for k in range(self.clusters_num):
      centroid = self.centroids[k:k + 1, :].expand(x_flatten.size(-1), -1, -1)
      residual = x_flatten.unsqueeze(0).permute(1, 0, 2, 3) - centroid.permute(1, 2, 0).unsqueeze(0)
      residual = residual * soft_assign[:, k:k + 1, :].unsqueeze(2)
      vlad[:, k:k + 1, :] = residual.sum(dim=-1)
    vlad = F.normalize(vlad, p=2, dim=2)
    vlad = vlad.view(n, -1)
    return F.normalize(vlad, p=2, dim=1)


class VPRModel(nn.Module):
  """backbone + aggregator, the attribute names of the released whole-model state dicts."""

  def __init__(self, backbone, aggregator):
    super().__init__()
    self.backbone = backbone
    self.aggregator = aggregator

  def forward(self, x):
    out = self.aggregator(self.backbone(x))
    return out[0] if isinstance(out, tuple) else out


class GsvCitiesResNet(nn.Module):
  """gsv-cities / MixVPR models/backbones/resnet.py `ResNet`.

  By default its pretrained=False path (a new torchvision model, nothing frozen). Given `net` (a
  torchvision ResNet standing for the pretrained one), its pretrained path: conv1, bn1 and
  layer1..layer`layers_to_freeze` get `requires_grad_(False)`, as the family freezes them.
  """

  def __init__(self, model_name='resnet50', layers_to_crop=(), net=None, layers_to_freeze=-1):
    super().__init__()
    self.model = getattr(torchvision.models, model_name)(weights=None) if net is None else net
    if net is not None and layers_to_freeze >= 0:
      self.model.conv1.requires_grad_(False)
      self.model.bn1.requires_grad_(False)
    for i in range(1, 4):
      if net is not None and layers_to_freeze >= i:
        getattr(self.model, f'layer{i}').requires_grad_(False)
    self.model.avgpool = None
    self.model.fc = None
    if 4 in layers_to_crop:
      self.model.layer4 = None
    if 3 in layers_to_crop:
      self.model.layer3 = None

  def forward(self, x):
    m = self.model
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    x = m.layer2(m.layer1(x))
    if m.layer3 is not None:
      x = m.layer3(x)
    if m.layer4 is not None:
      x = m.layer4(x)
    return x


class GsvCitiesVPRModel(nn.Module):
  """gsv-cities / MixVPR main.py `VPRModel` as a plain nn.Module (Lightning adds no state):
  `backbone`, `aggregator`, and the loss and miner modules of pytorch-metric-learning, which
  hold no state but are attributes of the authors' model, so a strict load sees them."""

  def __init__(self, backbone, aggregator):
    super().__init__()
    self.loss_fn = losses.MultiSimilarityLoss(alpha=1.0, beta=50, base=0.0,
                                              distance=distances.DotProductSimilarity())
    self.miner = miners.MultiSimilarityMiner(epsilon=0.1, distance=distances.CosineSimilarity())
    self.backbone = backbone
    self.aggregator = aggregator

  def forward(self, x):
    return self.aggregator(self.backbone(x))


def numpy_state_dict(module: nn.Module) -> dict:
  """The module's state dict as float32 numpy arrays."""
  return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def perturb_(module: nn.Module, scale: float = 0.1, seed: int = 0) -> nn.Module:
  """Adds N(0, scale) noise to every floating parameter and buffer, so that no value is trivial."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for tensor in list(module.parameters()) + list(module.buffers()):
      if tensor.is_floating_point():
        tensor.add_(scale * torch.randn(tensor.shape, generator=generator))
  return module
