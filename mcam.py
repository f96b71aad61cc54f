"""Reference fusion and the multi-scale coordinate attention module, MCAM (docs/design.md §8).

Reasoning chooses which labeled references the network looks at (retrieve.py); this file turns them into
decoder A's second stream and gates the two streams against each other (model.py wires them):

    ReferenceFusion  at the bottleneck: the scan's tokens attend to the K references' tokens, each
                     reference's attention mass scaled by its retrieval weight; the scan's features plus
                     the gated attention start the context stream.
    MCAM             at every decoder scale: the context from the scale below is projected and upsampled;
                     both streams are pooled along X, Y and Z, the profiles turned into three sigmoid gates
                     whose product gates the context; the main stream takes the gated context, which is
                     also the context stream's next step.

MCAM is the paper's multi-scale coordinate attention (coordinate attention, Hou et al., CVPR 2021, taken to
three axes); `gated=False` passes the context ungated (the "without MCAM" ablation). Weights start from
Xavier initialisation, as in the public code: the references move decoder A from the first step.
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTN_DROPOUT = 0.1  # dropout on the fusion's attention weights in training


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
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def position_encoding(d, h, w, dim, device):
    """Fixed 3D sinusoidal encoding of a d x h x w token grid, (d*h*w, dim).

    dim // 6 sine/cosine pairs per axis (the remaining channels are zero), wavelengths from 2*pi to
    200*pi tokens: enough to tell apart the positions of a bottleneck grid (7x7x5 for the LA patch).
    Parameter-free, so every patch size gets an encoding."""
    n = dim // 6
    freq = 100.0 ** (-torch.arange(n, device=device) / max(n, 1))                     # (n,)
    axes = [torch.arange(s, device=device, dtype=torch.float32) for s in (d, h, w)]
    grid = torch.meshgrid(*axes, indexing="ij")
    angles = [axis.reshape(-1, 1) * freq for axis in grid]                             # 3 x (N, n)
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
    """Cross-attention from the scan's bottleneck tokens to the selected references' tokens, gated per token
    and channel against the scan's own features.

    Queries come from x's N tokens, keys and values from all K*N reference tokens. The log retrieval
    weight of reference k is added to the logits of its tokens, so before normalisation each of its
    tokens gets exp(q.k / sqrt(d)) * w_k: uniform weights give plain attention, a zero weight removes
    the reference, and only the weights' ratios matter. Pre-norm (LayerNorm) with a 3D sinusoidal
    position encoding added to queries and keys (the bank holds every augmented orientation of its
    patches, so a retrieved reference is laid out like the query). Returns what the references add,
    sigmoid(W [x, a]) * a; the fused map is x plus that term."""

    def __init__(self, channels, heads=4):
        super().__init__()
        if channels % heads:
            raise ValueError(f"ReferenceFusion: channels={channels} is not divisible by heads={heads}")
        self.heads = heads
        self.norm_q = nn.LayerNorm(channels)
        self.norm_kv = nn.LayerNorm(channels)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.out = nn.Linear(channels, channels)
        self.gate = nn.Linear(2 * channels, channels)
        xavier_(self)

    def forward(self, x, refs, weights):
        """x (B, C, d, h, w) bottleneck; refs (B, K, C, d, h, w) bank features; weights (B, K).

        Returns the gated attention term (B, C, d, h, w) in x's memory format."""
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
        # log-weight bias per reference token; a weight of 0 becomes log(1e-30) = -69, i.e. no attention
        bias = weights.float().clamp_min(1e-30).log().repeat_interleave(N, 1)          # (B, K*N)
        attn_bias = bias[:, None, None].to(q.dtype)                                    # (B, 1, 1, K*N)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias,
                                           dropout_p=ATTN_DROPOUT if self.training else 0.0)  # (B,H,N,C/H)
        a = self.out(a.transpose(1, 2).reshape(B, N, C))                               # (B, N, C)
        term = torch.sigmoid(self.gate(torch.cat([xt, a], 2))) * a                     # (B, N, C)
        term = term.transpose(1, 2).unflatten(2, (d, h, w))                           # (B, C, d, h, w)
        return term.contiguous(memory_format=layout(x))


class MCAM(nn.Module):
    """Multi-scale coordinate attention for one scale of decoder A (the paper's MCAM).

        c        = upsample(GELU(BN(proj(ctx))))                       the context stream at this scale
        s        = GELU(GroupNorm(conv_s([pool_a(main), pool_a(c)])))  a in X, Y, Z
        g        = sigmoid(conv_X(s_X)) * sigmoid(conv_Y(s_Y)) * sigmoid(conv_Z(s_Z))
        main_out = main + g * c,  ctx_out = g * c                      (gated=False: g = 1)

    pool_a averages over the two other axes; the three profiles go through one shared squeeze convolution
    concatenated along their line, then split. GroupNorm keeps the squeeze independent of the batch (B = 1
    at inference). Projection, norm and activation run before the upsampling, on an eighth of the voxels."""

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

    def forward(self, main, ctx, return_gates=False):
        """main (B, C, X, Y, Z) decoder A's main stream; ctx (B, Cc, x, y, z) the context from the scale below.

        Returns (main_out, ctx_out), both (B, C, X, Y, Z); with return_gates also (g_x, g_y, g_z), shaped
        (B, C, X, 1, 1), (B, C, 1, Y, 1), (B, C, 1, 1, Z) (None ungated)."""
        B, C, X, Y, Z = main.shape
        c = self.proj(ctx).contiguous(memory_format=layout(main))                      # (B, C, x, y, z)
        c = F.interpolate(c, size=(X, Y, Z), mode="trilinear", align_corners=False)    # (B, C, X, Y, Z)
        gates = None
        if self.gated:
            # pooling the concatenation [main, c] equals concatenating the pooled parts: no 2C-channel volume
            pairs = zip(axis_profiles(main), axis_profiles(c))
            profiles = [torch.cat(p, 1) for p in pairs]                                # (B, 2C, X|Y|Z)
            sx, sy, sz = self.squeeze(torch.cat(profiles, 2)).split((X, Y, Z), 2)      # (B, mid, X|Y|Z)
            gx = torch.sigmoid(self.gate_x(sx)).view(B, C, X, 1, 1)                    # (B, C, X, 1, 1)
            gy = torch.sigmoid(self.gate_y(sy)).view(B, C, 1, Y, 1)                    # (B, C, 1, Y, 1)
            gz = torch.sigmoid(self.gate_z(sz)).view(B, C, 1, 1, Z)                    # (B, C, 1, 1, Z)
            gates = (gx, gy, gz)
            c = c * gx * (gy * gz)                                                     # (B, C, X, Y, Z)
        return (main + c, c, gates) if return_gates else (main + c, c)                 # (B, C, X, Y, Z) x 2
