"""A plain-torch Vision Transformer (timm/DINO layout: conv patch embedding, class token, learned
position embedding, pre-norm blocks, fused qkv projection, ``scaled_dot_product_attention``,
GELU MLP, final LayerNorm, class-token output) for the speed baselines of bench_vit.py.

Random weights: speed does not depend on them. ``VIT_CONFIGS`` holds the sizes benchmarked
(patch, width, depth, heads); :func:`vit_gflop` counts the FLOP of one image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: name -> (patch, width, depth, heads)
VIT_CONFIGS = {
    "ViT-S/16": (16, 384, 12, 6),
    "ViT-B/16": (16, 768, 12, 12),
    "ViT-L/14": (14, 1024, 24, 16),
}


def vit_gflop(name: str, size: int = 224) -> float:
    """FLOP (x 1e9) of one image: patch embedding, qkv/proj/MLP matmuls (12 d^2 per token and
    block, MLP ratio 4) and the two attention matmuls (2 N^2 d per block), 2 FLOP per multiply-add."""
    patch, d, depth, _ = VIT_CONFIGS[name]
    n = (size // patch) ** 2 + 1
    macs = (n - 1) * d * 3 * patch * patch + depth * (12 * n * d * d + 2 * n * n * d)
    return 2 * macs / 1e9


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    def __init__(self, name: str, size: int = 224):
        super().__init__()
        patch, dim, depth, heads = VIT_CONFIGS[name]
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (size // patch) ** 2 + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] float RGB in [0, 255] -> [B, dim] class-token embedding."""
        x = self.patch_embed((x - self.mean) / self.std).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))[:, 0]


def random_vit(name: str, size: int = 224, seed: int = 0) -> ViT:
    torch.manual_seed(seed)
    return ViT(name, size).eval()
