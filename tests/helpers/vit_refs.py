"""Plain-torch reference ViTs for the parity tests, written from the authors' sources.

``style="timm"`` follows timm's ``VisionTransformer`` (``_pos_embed``: ``no_embed_class`` or a
position entry per prefix token, ``resample_abs_pos_embed`` = bicubic with antialias; ``GluMlp``
for ``SwiGLUPacked``; ``LayerScale.gamma``; ``reg_token``). ``style="hub"`` follows
facebookresearch/dinov2 ``DinoVisionTransformer`` (and DINO v1 when ``offset=0.1`` and no
LayerScale): position entry for the class token only, ``interpolate_pos_encoding`` with
``scale_factor=(g + offset) / M`` or ``size=`` and ``antialias``, registers inserted after the
position embedding, SwiGLU as ``mlp.w12``/``mlp.w3``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, dim, heads, hidden, swiglu, init_values, eps, hub):
        super().__init__()
        self.heads, self.swiglu, self.hub = heads, swiglu, hub
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Module()
        fc1, fc2 = ("w12", "w3") if (hub and swiglu) else ("fc1", "fc2")
        setattr(self.mlp, fc1, nn.Linear(dim, 2 * hidden if swiglu else hidden))
        setattr(self.mlp, fc2, nn.Linear(hidden, dim))
        self._fc = (fc1, fc2)
        self.ls = init_values is not None
        if self.ls:
            self.ls1, self.ls2 = nn.Module(), nn.Module()
            self.ls1.gamma = nn.Parameter(init_values * torch.ones(dim))
            self.ls2.gamma = nn.Parameter(init_values * torch.ones(dim))

    def _attn(self, x):
        b, n, c = x.shape
        qkv = self.attn.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.attn.proj(out.transpose(1, 2).reshape(b, n, c))

    def _mlp(self, x):
        x = getattr(self.mlp, self._fc[0])(x)
        if self.swiglu:
            x1, x2 = x.chunk(2, dim=-1)
            x = F.silu(x1) * x2
        else:
            x = F.gelu(x)
        return getattr(self.mlp, self._fc[1])(x)

    def forward(self, x):
        y = self._attn(self.norm1(x))
        x = x + (y * self.ls1.gamma if self.ls else y)
        y = self._mlp(self.norm2(x))
        return x + (y * self.ls2.gamma if self.ls else y)


class RefViT(nn.Module):
    def __init__(self, *, patch, dim, depth, heads, hidden, img_size=224, swiglu=False, reg=0,
                 no_embed_class=False, init_values=None, eps=1e-6, style="timm", offset=0.0, antialias=True,
                 pool="cls"):
        super().__init__()
        self.patch, self.style, self.offset, self.antialias, self.pool, self.reg = patch, style, offset, antialias, pool, reg
        self.no_embed_class = no_embed_class
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        if reg:
            if style == "hub":
                self.register_tokens = nn.Parameter(torch.randn(1, reg, dim) * 0.02)
            else:
                self.reg_token = nn.Parameter(torch.randn(1, reg, dim) * 0.02)
        grid = img_size // patch
        prefix = 1 if style == "hub" else (0 if no_embed_class else 1 + reg)
        self.prefix = prefix
        self.pos_embed = nn.Parameter(torch.randn(1, prefix + grid * grid, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, hidden, swiglu, init_values, eps, style == "hub")
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps)

    def _resample(self, pos, gh, gw):
        """The patch part of the position embedding at a (gh, gw) grid, as each reference does it."""
        m = int(math.sqrt(pos.shape[1]))
        if (gh, gw) == (m, m):
            return pos
        grid = pos.reshape(1, m, m, -1).permute(0, 3, 1, 2)
        if self.style == "hub" and self.offset:
            grid = F.interpolate(grid, scale_factor=((gh + self.offset) / m, (gw + self.offset) / m),
                                 mode="bicubic", antialias=self.antialias)
        else:
            grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", antialias=self.antialias)
        return grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)

    def forward_tokens(self, x):
        x = self.patch_embed.proj(x)
        b, c, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)
        pos = torch.cat([self.pos_embed[:, :self.prefix], self._resample(self.pos_embed[:, self.prefix:], gh, gw)], 1)
        cls = self.cls_token.expand(b, -1, -1)
        if self.style == "hub":
            x = torch.cat([cls, x], 1) + pos
            if self.reg:
                x = torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]], 1)
        else:
            prefix = [cls] + ([self.reg_token.expand(b, -1, -1)] if self.reg else [])
            if self.no_embed_class:
                x = torch.cat(prefix + [x + pos], 1)
            else:
                x = torch.cat(prefix + [x], 1) + pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, x):
        tokens = self.forward_tokens(x)
        if self.pool == "cls_mean":  # Virchow2's model card
            return torch.cat([tokens[:, 0], tokens[:, 1 + self.reg:].mean(1)], dim=-1)
        return tokens[:, 0]


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb every parameter (norm scales around 1) so that any mis-mapped tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * 0.05
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "layernorm.weight",
                              "layernorm_before.weight", "layernorm_after.weight", "gamma", "lambda1")):
                param.copy_(1.0 + noise)
            else:
                param.copy_(param * 0.5 + noise)
    return model.eval()
