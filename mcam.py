"""Reference fusion and MCAM, the multi-scale coordinate attention module (docs/design.md §8).

The references retrieve.py chose start decoder A's context stream at the bottleneck x, and an MCAM at every
scale gates that stream into the main stream (model.py wires them; Xavier init, as in the public code):
    ctx      = x + t,  t = sigmoid(W [x, a]) * a   ReferenceFusion; a: x's tokens attend to the K references'
                                                   tokens, reference k's logits plus log w_k (its weight)
    c        = upsample(GELU(BN(proj(ctx))))                        MCAM: the context from the scale below
    s_a      = GELU(GroupNorm(conv_s([pool_a(main), pool_a(c)])))  a in X, Y, Z; pool_a: mean over the others
    g        = sigmoid(conv_X(s_X)) * sigmoid(conv_Y(s_Y)) * sigmoid(conv_Z(s_Z))        (gated=False: g = 1)
    main_out = main + g * c,  ctx_out = g * c"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class References(NamedTuple):
    """What decoder A is given for a batch: the chosen bank entries and what it knows of them."""
    features: torch.Tensor                  # (B, K, C, d, h, w) bank features (teacher encoder's bottleneck)
    weights: torch.Tensor                   # (B, K) retrieval weights, rows sum to 1 (filled slots weigh 0)
    indices: Optional[torch.Tensor] = None  # (B, K) bank entries, for logs and explanations

    def part(self, index):
        """The references of some queries only (e.g. the unlabeled ones: index = slice(n_lab, None))."""
        return References(*(None if t is None else t[index] for t in self))


def xavier_(module):
    """Xavier-uniform weights, zero biases in every convolution and linear layer: the public code's init."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv3d)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return module


def position_encoding(d, h, w, dim, device):
    """Fixed sinusoidal encoding of a d x h x w token grid, (d*h*w, dim): dim // 6 sin/cos pairs per axis."""
    n = dim // 6
    freq = 100.0 ** (-torch.arange(n, device=device) / max(n, 1))                     # (n,)
    axes = [torch.arange(s, device=device, dtype=torch.float32) for s in (d, h, w)]
    angles = [axis.reshape(-1, 1) * freq for axis in torch.meshgrid(*axes, indexing="ij")]   # 3 x (N, n)
    enc = torch.cat([fn(a) for a in angles for fn in (torch.sin, torch.cos)], 1)       # (N, 6n)
    return F.pad(enc, (0, dim - 6 * n))                                                # (N, dim)


def layout(t):
    """t's memory format, which the context stream keeps (a 1x1x1 convolution drops channels-last 3D)."""
    cl = torch.channels_last_3d
    return cl if t.is_contiguous(memory_format=cl) else torch.contiguous_format


def axis_profiles(t):
    """Averages of t (B, C, X, Y, Z) over all spatial axes but one: (B, C, X), (B, C, Y), (B, C, Z)."""
    t_xy = t.mean(4)                                            # (B, C, X, Y), shared
    return t_xy.mean(3), t_xy.mean(2), t.mean((2, 3))           # (B, C, X), (B, C, Y), (B, C, Z)


class ReferenceFusion(nn.Module):
    """Gated cross-attention of the bottleneck's tokens to the references'; log w_k on reference k's logits
    weighs it (w_k = 0, clamped to log 1e-30 = -69, removes it; only ratios matter). Pre-norm; a 3D position
    encoding on queries and keys (the bank holds every orientation: a reference lies like the query)."""

    def __init__(self, channels, heads=4, dropout=0.1):
        super().__init__()
        self.heads, self.dropout = heads, dropout                  # dropout: on attention weights in training
        self.norm_q, self.norm_kv = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.q, self.k, self.v, self.out = (nn.Linear(channels, channels) for _ in range(4))
        self.gate = nn.Linear(2 * channels, channels)
        xavier_(self)

    def forward(self, x, refs, weights):
        """x (B, C, d, h, w) bottleneck; refs (B, K, C, d, h, w); weights (B, K) -> the term t, like x."""
        B, C, d, h, w = x.shape
        K, N, H = refs.shape[1], d * h * w, self.heads
        if refs.shape != (B, K, C, d, h, w) or weights.shape != (B, K):
            raise ValueError(f"ReferenceFusion: x {tuple(x.shape)} needs refs (B, K, C, d, h, w) and weights "
                             f"(B, K); got refs {tuple(refs.shape)}, weights {tuple(weights.shape)}")
        pos = position_encoding(d, h, w, C, x.device)                                  # (N, C)
        xt = x.flatten(2).transpose(1, 2)                                              # (B, N, C)
        kv = self.norm_kv(refs.flatten(3).transpose(2, 3).reshape(B, K * N, C))        # (B, K*N, C), K-major
        q = self.q(self.norm_q(xt) + pos).view(B, N, H, C // H).transpose(1, 2)        # (B, H, N, C/H)
        k = self.k(kv + pos.repeat(K, 1)).view(B, K * N, H, C // H).transpose(1, 2)    # (B, H, K*N, C/H)
        v = self.v(kv).view(B, K * N, H, C // H).transpose(1, 2)                       # (B, H, K*N, C/H)
        bias = weights.float().clamp_min(1e-30).log().repeat_interleave(N, 1)[:, None, None]  # (B, 1, 1, K*N)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                           dropout_p=self.dropout if self.training else 0.0)  # (B,H,N,C/H)
        a = self.out(a.transpose(1, 2).reshape(B, N, C))                               # (B, N, C)
        term = torch.sigmoid(self.gate(torch.cat([xt, a], 2))) * a                     # (B, N, C)
        return term.transpose(1, 2).unflatten(2, (d, h, w)).contiguous(memory_format=layout(x))  # like x


class MCAM(nn.Module):
    """The MCAM at one scale of decoder A; GroupNorm keeps the squeeze independent of the batch (B = 1)."""

    def __init__(self, channels, ctx_channels, gated=True):
        super().__init__()
        self.gated = gated
        self.proj = nn.Sequential(nn.Conv3d(ctx_channels, channels, 1), nn.BatchNorm3d(channels), nn.GELU())
        if gated:
            mid = max(8, channels // 16)
            self.squeeze = nn.Sequential(nn.Conv1d(2 * channels, mid, 1),     # shared by the three axes
                                         nn.GroupNorm(math.gcd(mid, 4), mid), nn.GELU())
            self.gate_x, self.gate_y, self.gate_z = (nn.Conv1d(mid, channels, 1) for _ in range(3))
        xavier_(self)

    def forward(self, main, ctx):
        """main (B, C, X, Y, Z); ctx (B, Cc, x, y, z) from the scale below -> (main_out, ctx_out)."""
        B, C, X, Y, Z = main.shape
        c = self.proj(ctx).contiguous(memory_format=layout(main))                      # (B, C, x, y, z)
        c = F.interpolate(c, size=(X, Y, Z), mode="trilinear", align_corners=False)    # (B, C, X, Y, Z)
        if self.gated:
            # pooling the concatenation [main, c] equals concatenating the pooled parts: no 2C-channel volume
            profiles = [torch.cat(p, 1) for p in zip(axis_profiles(main), axis_profiles(c))]  # (B, 2C, X|Y|Z)
            sx, sy, sz = self.squeeze(torch.cat(profiles, 2)).split((X, Y, Z), 2)      # (B, mid, X|Y|Z)
            gx = torch.sigmoid(self.gate_x(sx)).view(B, C, X, 1, 1)                    # (B, C, X, 1, 1)
            gy = torch.sigmoid(self.gate_y(sy)).view(B, C, 1, Y, 1)                    # (B, C, 1, Y, 1)
            gz = torch.sigmoid(self.gate_z(sz)).view(B, C, 1, 1, Z)                    # (B, C, 1, 1, Z)
            c = c * gx * (gy * gz)                                                     # (B, C, X, Y, Z)
        return main + c, c                                                             # (B, C, X, Y, Z) x 2
