"""Reference-context fusion and the multi-scale coordinate attention module, MCAM (docs/design.md §8).

Reasoning chooses which labeled references the network looks at (retrieve.py); this file turns the
chosen references into a context stream and fuses it into decoder A (model.py):

    ReferenceFusion  at the bottleneck: the scan's tokens attend to the K references' tokens, each
                     reference's attention mass scaled by its retrieval weight; the result joins the
                     scan's own features through a gate: context = x + gate * attention (B, C, d, h, w).
                     With the references' masks (ref_masks), every attention head also reads the
                     references' foreground share: a label transferred to each scan token (B, H, d, h, w).
    MCAM             at every decoder scale: the context is projected and upsampled (the stream that
                     climbs to the next scale), joined by the label maps (transferred labels and the
                     references' weighted mask at this scale), pooled together with the decoder features
                     along X, Y and Z separately, turned into three sigmoid gates whose product gates
                     it; a 1x1x1 convolution adds the gated context to the decoder features.

The last convolution of every MCAM starts at zero, so decoder A with references is exactly decoder A
without them until training gives the reference path weight: references can be switched on at any
iteration without a jump in decoder A's output (no "switch shock"), and the finest MCAM feeds the
head directly, so the network can use or ignore the references voxel by voxel.

MCAM is the CERS paper's multi-scale coordinate attention, a coordinate-attention gate (Hou et al.,
CVPR 2021) taken to three axes; `gated=False` adds the context ungated (the "without MCAM" ablation).
Reading the references' masks is an extension beyond the paper (an ablation row, `ref_masks`).
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class References(NamedTuple):
    """What decoder A is given for a batch: the chosen bank entries and what it knows of them."""
    features: torch.Tensor                  # (B, K, C, d, h, w) bank features (teacher encoder's bottleneck)
    weights: torch.Tensor                   # (B, K) retrieval weights, rows sum to 1 (filled slots weigh 0)
    masks: Optional[torch.Tensor] = None    # (B, K, X, Y, Z) float {0, 1} ground truth (ref_masks), else None
    indices: Optional[torch.Tensor] = None  # (B, K) bank entries, for logs and explanations

    def part(self, index):
        """The references of some queries only (e.g. the unlabeled ones: index = slice(n_lab, None))."""
        return References(*(None if t is None else t[index] for t in self))


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


def axis_profiles(t):
    """Averages of t (B, C, X, Y, Z) over all spatial axes but one: (B, C, X), (B, C, Y), (B, C, Z)."""
    t_xy = t.mean(4)                                            # (B, C, X, Y), shared
    return t_xy.mean(3), t_xy.mean(2), t.mean((2, 3))           # (B, C, X), (B, C, Y), (B, C, Z)


def weighted_mask(masks, weights):
    """The references' masks (B, K, X, Y, Z) averaged with their retrieval weights (B, K): (B, 1, X, Y, Z),
    each voxel the weighted share of references that have the target there."""
    return torch.einsum("bk,bkxyz->bxyz", weights.to(masks.dtype), masks)[:, None]


class ReferenceFusion(nn.Module):
    """Cross-attention from the scan's bottleneck tokens to the selected references' tokens, joined to the
    scan's own features by a gate (§1.3).

    Queries come from x's N tokens, keys and values from all K*N reference tokens. The log retrieval
    weight of reference k is added to the logits of its tokens, so before normalisation each of its
    tokens gets exp(q.k / sqrt(d)) * w_k: uniform weights give plain attention, a zero weight removes
    the reference, and only the weights' ratios matter. Pre-norm (LayerNorm) with a 3D sinusoidal
    position encoding added to queries and keys (the bank holds every augmented orientation of its
    patches, so a retrieved reference is laid out like the query). The output stays beside the scan:
    context = x + sigmoid(W [norm(x), a]) * a, per token and channel.

    With `masks`, each head's values carry one more channel, the reference token's foreground share:
    the head's output there is the label its attention transfers to the scan token (B, H, d, h, w)."""

    def __init__(self, channels, heads=4, masks=False):
        super().__init__()
        if channels % heads:
            raise ValueError(f"ReferenceFusion: channels={channels} is not divisible by heads={heads}")
        self.heads, self.masks = heads, masks
        self.norm_q = nn.LayerNorm(channels)
        self.norm_kv = nn.LayerNorm(channels)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.out = nn.Linear(channels, channels)
        self.gate = nn.Linear(2 * channels, channels)

    def forward(self, x, refs, weights, masks=None):
        """x (B, C, d, h, w) bottleneck; refs (B, K, C, d, h, w) bank features; weights (B, K); masks
        (B, K, X, Y, Z) the references' ground truth when built with masks.

        Returns the context (B, C, d, h, w) in x's memory format, which the context stream keeps up
        the decoder (MCAM's full-resolution arithmetic runs slower on mixed layouts on the CPU,
        docs/results.md §3.4), and the transferred labels (B, H, d, h, w) float32 (None without masks)."""
        B, C, d, h, w = x.shape
        K, N, H = refs.shape[1], d * h * w, self.heads
        if refs.shape != (B, K, C, d, h, w) or weights.shape != (B, K):
            raise ValueError(f"ReferenceFusion: x {tuple(x.shape)} needs refs (B, K, C, d, h, w) and weights "
                             f"(B, K); got refs {tuple(refs.shape)}, weights {tuple(weights.shape)}")
        if self.masks != (masks is not None) or (masks is not None and masks.shape[:2] != (B, K)):
            raise ValueError(f"ReferenceFusion built with masks={self.masks}: got masks "
                             f"{None if masks is None else tuple(masks.shape)} for refs {tuple(refs.shape)}")
        pos = position_encoding(d, h, w, C, x.device)                                  # (N, C)
        xq = self.norm_q(x.flatten(2).transpose(1, 2))                                 # (B, N, C)
        kv = self.norm_kv(refs.flatten(3).transpose(2, 3).reshape(B, K * N, C))        # (B, K*N, C), K-major
        q = self.q(xq + pos).view(B, N, H, C // H).transpose(1, 2)                     # (B, H, N, C/H)
        k = self.k(kv + pos.repeat(K, 1)).view(B, K * N, H, C // H).transpose(1, 2)    # (B, H, K*N, C/H)
        v = self.v(kv).view(B, K * N, H, C // H).transpose(1, 2)                       # (B, H, K*N, C/H)
        if masks is not None:                   # each reference token's foreground share, a value channel
            per_ref = masks.flatten(0, 1)[:, None].float()                             # (B*K, 1, X, Y, Z)
            share = F.adaptive_avg_pool3d(per_ref, (d, h, w))                          # (B*K, 1, d, h, w)
            share = share.reshape(B, 1, K * N, 1).expand(B, H, K * N, 1)               # (B, H, K*N, 1)
            v = torch.cat([v, share.to(v.dtype)], 3)                                   # (B, H, K*N, C/H + 1)
        # log-weight bias per reference token; a weight of 0 becomes log(1e-30) = -69, i.e. no attention
        bias = weights.float().clamp_min(1e-30).log().repeat_interleave(N, 1)          # (B, K*N)
        attn_bias = bias[:, None, None].to(q.dtype)                                    # (B, 1, 1, K*N)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)               # (B, H, N, C/H [+1])
        labels = None
        if masks is not None:
            a, labels = a[..., :-1], a[..., -1]                                        # (B,H,N,C/H), (B,H,N)
            labels = labels.float().unflatten(2, (d, h, w))                            # (B, H, d, h, w)
        a = self.out(a.transpose(1, 2).reshape(B, N, C))                               # (B, N, C)
        xt = x.flatten(2).transpose(1, 2)                                              # (B, N, C)
        gate = torch.sigmoid(self.gate(torch.cat([xq, a], 2)))                         # (B, N, C)
        context = xt + gate * a                                                        # (B, N, C)
        cl = torch.channels_last_3d
        layout = cl if x.is_contiguous(memory_format=cl) else torch.contiguous_format
        context = context.transpose(1, 2).unflatten(2, (d, h, w)).contiguous(memory_format=layout)
        return context, labels                                     # (B, C, d, h, w), (B, H, d, h, w) or None


class MCAM(nn.Module):
    """Multi-scale coordinate attention for one scale of decoder A (§1.3; the paper's MCAM).

        c       = upsample(proj(ctx))                                       the stream: ctx_out = c
        m       = [c, upsample(labels), pool(mask)]                         label maps with ref_masks only
                                                                            (ref_mask_detail: [c, pool(mask)])
        g_a     = sigmoid(conv_a(act(norm(conv_s([pool_a(dec), pool_a(m)])))))     a in X, Y, Z
        dec_out = dec + inject(g_X * g_Y * g_Z * m)                         (gated=False: dec + inject(m))

    pool_a averages over the two other axes; the three profiles go through one shared squeeze
    convolution concatenated along their line, then split. The squeeze is normalised with GroupNorm:
    it is independent of the batch (B = 1 at inference, 2 + 2 in training) and the same in train and
    eval mode, which BatchNorm over a few pooled profiles would not be; groups of several channels
    keep each channel's overall level, which InstanceNorm would remove, leaving the gates only relative
    positions. `inject` is a 1x1x1 convolution that starts at zero: an untrained MCAM leaves decoder A
    exactly as it would be without references."""

    def __init__(self, channels, ctx_channels, label_channels=0, gated=True):
        super().__init__()
        self.gated, self.label_channels = gated, label_channels
        width = channels + label_channels                                              # what the gates weigh
        self.proj = nn.Conv3d(ctx_channels, channels, 1)
        if gated:
            mid = max(8, width // 4)
            self.squeeze = nn.Sequential(nn.Conv1d(channels + width, mid, 1),     # shared by the three axes
                                         nn.GroupNorm(math.gcd(mid, 4), mid), nn.SiLU())
            self.gate_x, self.gate_y, self.gate_z = (nn.Conv1d(mid, width, 1) for _ in range(3))
        self.inject = nn.Conv3d(width, channels, 1)
        nn.init.zeros_(self.inject.weight)
        nn.init.zeros_(self.inject.bias)

    def forward(self, dec, ctx, labels=None, mask=None, return_gates=False):
        """dec (B, C, X, Y, Z) decoder features; ctx (B, Cc, x, y, z) context from the scale below; with
        ref_masks, labels (B, H, d, h, w) transferred at the bottleneck and mask (B, 1, X', Y', Z') the
        references' weighted mask at full resolution (pooled here to this scale); with ref_mask_detail, at
        1/4 and 1/2 of the patch, the mask alone (label_channels 1).

        Returns (dec_out, ctx_out), both (B, C, X, Y, Z); with return_gates also (g_x, g_y, g_z), shaped
        (B, W, X, 1, 1), (B, W, 1, Y, 1), (B, W, 1, 1, Z) for the W = C + label channels (None ungated)."""
        B, C, X, Y, Z = dec.shape
        # a 1x1x1 convolution and trilinear interpolation commute exactly (both linear, interpolation
        # weights sum to 1), so project at the coarse size: the same result for 1/8 of the work
        c = self.proj(ctx)                                                             # (B, C, x, y, z)
        c = F.interpolate(c, size=(X, Y, Z), mode="trilinear", align_corners=False)    # (B, C, X, Y, Z)
        maps = []
        if labels is not None:
            maps.append(F.interpolate(labels, size=(X, Y, Z), mode="trilinear", align_corners=False))
        if mask is not None:
            maps.append(F.adaptive_avg_pool3d(mask, (X, Y, Z)))                        # exact block means
        if sum(m.shape[1] for m in maps) != self.label_channels:
            raise ValueError(f"MCAM expects {self.label_channels} label channels (ref_masks), got "
                             f"{[tuple(m.shape) for m in maps]}")
        m = torch.cat([c, *[t.to(c.dtype) for t in maps]], 1) if maps else c           # (B, W, X, Y, Z)
        gates = None
        if self.gated:
            # pooling the concatenation [dec, m] equals concatenating the pooled parts: no 2C-channel volume
            pairs = zip(axis_profiles(dec), axis_profiles(m))
            profiles = [torch.cat(p, 1) for p in pairs]                                # (B, C + W, X|Y|Z)
            s = self.squeeze(torch.cat(profiles, 2))                                   # (B, mid, X+Y+Z)
            sx, sy, sz = s.split((X, Y, Z), 2)                                         # (B, mid, X|Y|Z)
            W = m.shape[1]
            gx = torch.sigmoid(self.gate_x(sx)).view(B, W, X, 1, 1)                    # (B, W, X, 1, 1)
            gy = torch.sigmoid(self.gate_y(sy)).view(B, W, 1, Y, 1)                    # (B, W, 1, Y, 1)
            gz = torch.sigmoid(self.gate_z(sz)).view(B, W, 1, 1, Z)                    # (B, W, 1, 1, Z)
            gates = (gx, gy, gz)
            m = m * gx * (gy * gz)                                                     # (B, W, X, Y, Z)
        dec_out = dec + self.inject(m)                                                 # (B, C, X, Y, Z)
        return (dec_out, c, gates) if return_gates else (dec_out, c)
