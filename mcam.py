"""Reference-context fusion and the multi-scale coordinate attention module, MCAM (DESIGN.md §1.3).

Reasoning chooses which labeled references the network looks at (retrieve.py); this file turns the
chosen references into a context stream and fuses it into decoder A (model.py):

    ReferenceFusion  at the bottleneck: the scan's tokens attend to the K references' tokens, each
                     reference's attention mass scaled by its retrieval weight -> context (B, C, d, h, w)
    MCAM             at every decoder scale: the context is upsampled and projected, pooled together
                     with the decoder features along X, Y and Z separately, turned into three sigmoid
                     gates whose product gates the context; the gated context is added to the decoder
                     features, then a 3x3x3 convolution. The projected context moves up to the next scale.

MCAM is the CERS paper's multi-scale coordinate attention, a coordinate-attention gate (Hou et al.,
CVPR 2021) taken to three axes; `gated=False` adds the context ungated (the "without MCAM" ablation).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def position_encoding(d, h, w, dim, device):
    """Fixed 3D sinusoidal encoding of a d x h x w token grid, (d*h*w, dim).

    dim // 6 sine/cosine pairs per axis (the remaining channels are zero), wavelengths from 2*pi to
    200*pi tokens: enough to tell apart the positions of a bottleneck grid (7x7x5 for the LA patch).
    Parameter-free, so every patch size gets an encoding."""
    n = dim // 6
    freq = 100.0 ** (-torch.arange(n, device=device) / max(n, 1))                     # (n,)
    grid = torch.meshgrid(*[torch.arange(s, device=device, dtype=torch.float32) for s in (d, h, w)], indexing="ij")
    angles = [axis.reshape(-1, 1) * freq for axis in grid]                             # 3 x (N, n)
    enc = torch.cat([fn(a) for a in angles for fn in (torch.sin, torch.cos)], 1)       # (N, 6n)
    return F.pad(enc, (0, dim - 6 * n))                                                # (N, dim)


def axis_profiles(t):
    """Averages of t (B, C, X, Y, Z) over all spatial axes but one: (B, C, X), (B, C, Y), (B, C, Z)."""
    t_xy = t.mean(4)                                                                   # (B, C, X, Y), shared
    return t_xy.mean(3), t_xy.mean(2), t.mean((2, 3))                                  # (B, C, X), (B, C, Y), (B, C, Z)


class ReferenceFusion(nn.Module):
    """Cross-attention from the scan's bottleneck tokens to the selected references' tokens (§1.3).

    Queries come from x's N tokens, keys and values from all K*N reference tokens. The log retrieval
    weight of reference k is added to the logits of its tokens, so before normalisation each of its
    tokens gets exp(q.k / sqrt(d)) * w_k: uniform weights give plain attention, a zero weight removes
    the reference, and only the weights' ratios matter. Pre-norm (LayerNorm) with a 3D sinusoidal
    position encoding added to queries and keys; the output projection has no residual, because the
    result is the context stream, kept apart from the decoder's own features."""

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

    def forward(self, x, refs, weights):
        """x (B, C, d, h, w) bottleneck; refs (B, K, C, d, h, w) bank features; weights (B, K).

        Returns the context (B, C, d, h, w) in x's memory format, which the context stream keeps up
        the decoder (mixing layouts in MCAM's full-resolution arithmetic costs about 25 % on CPU)."""
        B, C, d, h, w = x.shape
        K, N, H = refs.shape[1], d * h * w, self.heads
        if refs.shape != (B, K, C, d, h, w) or weights.shape != (B, K):
            raise ValueError(f"ReferenceFusion: x {tuple(x.shape)} needs refs (B, K, C, d, h, w) and weights "
                             f"(B, K); got refs {tuple(refs.shape)}, weights {tuple(weights.shape)}")
        pos = position_encoding(d, h, w, C, x.device)                                  # (N, C)
        xq = self.norm_q(x.flatten(2).transpose(1, 2))                                 # (B, N, C)
        kv = self.norm_kv(refs.flatten(3).transpose(2, 3).reshape(B, K * N, C))        # (B, K*N, C), reference-major
        q = self.q(xq + pos).view(B, N, H, C // H).transpose(1, 2)                     # (B, H, N, C/H)
        k = self.k(kv + pos.repeat(K, 1)).view(B, K * N, H, C // H).transpose(1, 2)    # (B, H, K*N, C/H)
        v = self.v(kv).view(B, K * N, H, C // H).transpose(1, 2)                       # (B, H, K*N, C/H)
        # log-weight bias per reference token; a weight of 0 becomes log(1e-30) = -69, i.e. no attention
        bias = weights.float().clamp_min(1e-30).log().repeat_interleave(N, 1)          # (B, K*N)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None, None].to(q.dtype))  # (B, H, N, C/H)
        out = self.out(a.transpose(1, 2).reshape(B, N, C))                             # (B, N, C)
        cl = torch.channels_last_3d
        layout = cl if x.is_contiguous(memory_format=cl) else torch.contiguous_format
        return out.transpose(1, 2).unflatten(2, (d, h, w)).contiguous(memory_format=layout)  # (B, C, d, h, w)


class MCAM(nn.Module):
    """Multi-scale coordinate attention for one scale of decoder A (§1.3; the paper's MCAM).

        c       = upsample(proj(ctx))                                     projected context = ctx_out
        g_a     = sigmoid(conv_a(act(norm(conv_s([pool_a(dec), pool_a(c)])))))     a in X, Y, Z
        dec_out = relu(bn(conv3x3x3(dec + g_X * g_Y * g_Z * c)))          (gated=False: dec + c)

    pool_a averages over the two other axes; the three profiles go through one shared squeeze
    convolution (2C -> max(8, C/4)) concatenated along their line, then split. The squeeze is
    normalised with GroupNorm: it is independent of the batch (B = 1 at inference, 2 + 2 in training)
    and the same in train and eval mode, which BatchNorm over a few pooled profiles would not be; groups
    of several channels keep each channel's overall level, which InstanceNorm would remove, leaving the
    gates only relative positions. The 3x3x3 convolution uses BatchNorm like the rest of the V-Net."""

    def __init__(self, channels, ctx_channels, gated=True):
        super().__init__()
        self.gated = gated
        self.proj = nn.Conv3d(ctx_channels, channels, 1)
        if gated:
            mid = max(8, channels // 4)
            self.squeeze = nn.Sequential(nn.Conv1d(2 * channels, mid, 1),         # shared by the three axes
                                         nn.GroupNorm(math.gcd(mid, 4), mid), nn.SiLU())
            self.gate_x, self.gate_y, self.gate_z = (nn.Conv1d(mid, channels, 1) for _ in range(3))
        self.out = nn.Sequential(nn.Conv3d(channels, channels, 3, padding=1), nn.BatchNorm3d(channels),
                                 nn.ReLU(inplace=True))

    def forward(self, dec, ctx, return_gates=False):
        """dec (B, C, X, Y, Z) decoder features; ctx (B, Cc, x, y, z) context from the scale below.

        Returns (dec_out, ctx_out), both (B, C, X, Y, Z); with return_gates also (g_x, g_y, g_z), shaped
        (B, C, X, 1, 1), (B, C, 1, Y, 1), (B, C, 1, 1, Z) (None when not gated)."""
        B, C, X, Y, Z = dec.shape
        # a 1x1x1 convolution and trilinear interpolation commute exactly (both linear, interpolation
        # weights sum to 1), so project at the coarse size: the same result for 1/8 of the work
        c = self.proj(ctx)                                                             # (B, C, x, y, z)
        c = F.interpolate(c, size=(X, Y, Z), mode="trilinear", align_corners=False)    # (B, C, X, Y, Z)
        gates = None
        if self.gated:
            # pooling the concatenation [dec, c] equals concatenating the pooled parts: no 2C-channel volume
            profiles = [torch.cat(p, 1) for p in zip(axis_profiles(dec), axis_profiles(c))]  # (B, 2C, X|Y|Z)
            s = self.squeeze(torch.cat(profiles, 2))                                   # (B, mid, X+Y+Z)
            sx, sy, sz = s.split((X, Y, Z), 2)                                         # (B, mid, X), (.., Y), (.., Z)
            gx = torch.sigmoid(self.gate_x(sx)).view(B, C, X, 1, 1)                    # (B, C, X, 1, 1)
            gy = torch.sigmoid(self.gate_y(sy)).view(B, C, 1, Y, 1)                    # (B, C, 1, Y, 1)
            gz = torch.sigmoid(self.gate_z(sz)).view(B, C, 1, 1, Z)                    # (B, C, 1, 1, Z)
            gates = (gx, gy, gz)
            fused = dec + c * gx * (gy * gz)                                           # (B, C, X, Y, Z)
        else:
            fused = dec + c                                                            # (B, C, X, Y, Z)
        dec_out = self.out(fused)                                                      # (B, C, X, Y, Z)
        return (dec_out, c, gates) if return_gates else (dec_out, c)
