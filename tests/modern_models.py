"""Small self-written models of modern blocks (issue 16): an MBConv block with a squeeze-excitation gate and
SiLU, a ConvNeXt-like block (depthwise 7x7, LayerNorm over channels, Linear-GELU-Linear, residual) and a
ViT-like encoder block (patch embedding, class token, positional embedding, LayerNorm, attention, GELU MLP)."""
import torch
import torch.nn.functional as F
from torch import nn


class SqueezeExcite(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(c // r, c, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


class MBConv(nn.Module):
    """Expand 1x1 -> depthwise 3x3 -> SE gate -> project 1x1, SiLU activations, BatchNorm, residual."""

    def __init__(self, c=16, expand=4):
        super().__init__()
        h = c * expand
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.SiLU())
        self.expand = nn.Sequential(nn.Conv2d(c, h, 1), nn.BatchNorm2d(h), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(h, h, 3, padding=1, groups=h), nn.BatchNorm2d(h), nn.SiLU())
        self.se = SqueezeExcite(h)
        self.project = nn.Sequential(nn.Conv2d(h, c, 1), nn.BatchNorm2d(c))
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.project(self.se(self.dw(self.expand(x))))
        x = x + self.drop(y)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ConvNeXtBlock(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 4, stride=4)
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1 = nn.Linear(c, 4 * c)
        self.act = nn.GELU()
        self.pw2 = nn.Linear(4 * c, c)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(self.act(self.pw1(self.norm(y)))).permute(0, 3, 1, 2)
        x = x + y
        return self.head(x.mean((2, 3)))


class ViTBlock(nn.Module):
    """Patch embedding, class token, positional embedding, one pre-norm encoder block, head on the class token.
    ``attention='sdpa'`` uses F.scaled_dot_product_attention; ``'matmul'`` spells it with @ and softmax."""

    def __init__(self, dim=32, heads=4, patch=4, image=16, attention="matmul"):
        super().__init__()
        self.heads, self.attention = heads, attention
        n = (image // patch) ** 2
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos_emb = nn.Parameter(torch.randn(1, n + 1, dim) * 0.5)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(0.1)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def attend(self, x):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            a = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
            y = torch.matmul(a.softmax(dim=-1), v)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_emb
        x = x + self.drop(self.attend(self.norm1(x)))
        x = x + self.fc2(self.act(self.fc1(self.norm2(x))))
        return self.head(self.norm(x)[:, 0])


def calibration(shape=(4, 3, 16, 16), n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


class Activations(nn.Module):
    """One conv per activation kind, as modules and as functions, then GroupNorm, softmax over channels and a
    multi-head attention over the pixels: the float islands of issue 16 one after another."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.acts = nn.ModuleList([nn.Hardswish(), nn.Hardsigmoid(), nn.Mish(), nn.PReLU(c), nn.LeakyReLU(0.1),
                                   nn.GELU(approximate="tanh"), nn.ELU(), nn.SiLU(), nn.Tanh()])
        self.convs = nn.ModuleList([nn.Conv2d(c, c, 3, padding=1) for _ in self.acts])
        self.norm = nn.GroupNorm(2, c)
        self.softmax = nn.Softmax(dim=1)
        self.mha = nn.MultiheadAttention(c, 2, batch_first=True)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        for act, conv in zip(self.acts, self.convs):
            x = conv(act(x))
        x = F.hardswish(F.silu(F.gelu(x)))
        x = self.softmax(self.norm(x)) * 4.0
        t = x.flatten(2).transpose(1, 2)
        t = self.mha(t, t, t, need_weights=False)[0]
        return self.head(t.mean(1))
