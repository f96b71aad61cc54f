"""The dual-decoder V-Net and the losses of training (docs/design.md §8, §9).

A V-Net encoder (16 base filters, batch norm, dropout, as UA-MT / MC-Net set it up for LA) feeds decoder A
(transposed convolutions) and decoder B (trilinear upsampling, always plain: it drives the reference query);
their disagreement is a training signal. With references, decoder A is wired as the public CERS code wires
it: a context stream from x + fusion(x, refs) at the bottleneck x, gated into the main stream by an MCAM per
scale (mcam.py), the head reading both streams. Built without references it is the plain mean teacher."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import mcam


def conv_stage(c_in, c_out, n_convs):
    """n_convs x (3x3x3 convolution, batch norm, ReLU)."""
    return nn.Sequential(*[m for i in range(n_convs) for m in (
        nn.Conv3d(c_out if i else c_in, c_out, 3, padding=1), nn.BatchNorm3d(c_out), nn.ReLU(inplace=True))])


def up(c_in, c_out, mode):
    """Double the resolution: 'deconv' (transposed convolution) or 'trilinear' (interpolation + conv)."""
    first = (nn.ConvTranspose3d(c_in, c_out, 2, stride=2) if mode == "deconv" else
             nn.Sequential(nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
                           nn.Conv3d(c_in, c_out, 3, padding=1)))
    return nn.Sequential(first, nn.BatchNorm3d(c_out), nn.ReLU(inplace=True))


class Encoder(nn.Module):
    """Five stages (1, 2, 3, 3, 3 convolutions); channels f, 2f, 4f, 8f, 16f at scales 1 .. 1/16."""

    def __init__(self, in_channels=1, f=16, dropout=0.5):
        super().__init__()
        ch = [f, 2 * f, 4 * f, 8 * f, 16 * f]
        self.stages = nn.ModuleList([conv_stage(in_channels, ch[0], 1)] +
                                    [conv_stage(ch[i], ch[i], n) for i, n in zip(range(1, 5), (2, 3, 3, 3))])
        self.downs = nn.ModuleList([nn.Sequential(   # stride-2 2x2x2 convolutions halve the resolution
            nn.Conv3d(ch[i], ch[i + 1], 2, stride=2), nn.BatchNorm3d(ch[i + 1]), nn.ReLU(inplace=True))
            for i in range(4)])
        self.dropout = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):                            # (B, 1, X, Y, Z)
        feats = [self.stages[0](x)]                  # (B, f, X, Y, Z)
        for stage, down in zip(self.stages[1:], self.downs):
            feats.append(stage(down(feats[-1])))     # (B, 2f, X/2, ..) .. (B, 16f, X/16, Y/16, Z/16)
        feats[-1] = self.dropout(feats[-1])
        return feats


class Decoder(nn.Module):
    """Four up-stages adding skip features (V-Net style), a 1x1x1 head; take_context() adds A's context."""

    def __init__(self, f=16, n_classes=2, mode="deconv", dropout=0.5):
        super().__init__()
        ch = [f, 2 * f, 4 * f, 8 * f, 16 * f]
        self.ups = nn.ModuleList([up(ch[i + 1], ch[i], mode) for i in reversed(range(4))])
        self.stages = nn.ModuleList([conv_stage(c, c, n) for c, n in zip(ch[3::-1], (3, 3, 2, 1))])
        self.dropout = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Conv3d(f, n_classes, 1)
        self.mcams = None

    def take_context(self, gated=True):
        """Add the MCAMs (one per scale, coarse to fine) and a head over both streams, Xavier-initialised."""
        f = self.head.in_channels
        self.mcams = nn.ModuleList([mcam.MCAM(2**i * f, 2**(i + 1) * f, gated) for i in (3, 2, 1, 0)])
        self.head = mcam.xavier_(nn.Conv3d(2 * f, self.head.out_channels, 1))

    def forward(self, feats, context=None):
        """feats: the encoder's five scales; context: the fused bottleneck map, iff take_context() ran."""
        x = feats[-1]                                # (B, 16f, X/16, Y/16, Z/16)
        for i, (up_, stage) in enumerate(zip(self.ups, self.stages)):
            x = up_(x) + feats[-2 - i]               # (B, 8f, X/8, ..) .. (B, f, X, Y, Z)
            if context is not None:                  # the main stream takes the gated context
                x, context = self.mcams[i](x, context)
            x = stage(x)
        if context is not None:
            x = torch.cat([x, context], 1)           # (B, 2f, X, Y, Z): both streams
        return self.head(self.dropout(x))            # (B, n_classes, X, Y, Z)


class DualDecoderVNet(nn.Module):
    """Shared encoder; decoder A (deconv; two streams with references) and decoder B (trilinear, plain)."""

    def __init__(self, in_channels=1, n_classes=2, base_filters=16, dropout=0.5, references=False,
                 gated=True):
        super().__init__()
        self.encoder = Encoder(in_channels, base_filters, dropout)
        self.decoder_a = Decoder(base_filters, n_classes, "deconv", dropout)
        self.decoder_b = Decoder(base_filters, n_classes, "trilinear", dropout)
        # the reference modules come last: the V-Net's own layers initialise as in the plain network
        self.fusion = mcam.ReferenceFusion(16 * base_filters) if references else None
        if references:
            self.decoder_a.take_context(gated)

    def forward(self, x, refs=None, zero_refs=False):
        """x (B, 1, X, Y, Z); refs: mcam.References or None. Returns the logits of decoders A and B."""
        feats = self.encoder(x)
        return self.decode_a(feats, refs, zero_refs), self.decoder_b(feats)   # (B, n_classes, X, Y, Z) x 2

    def decode_a(self, feats, refs=None, zero_refs=False):
        """Decoder A on encoder features; zero_refs or refs=None: the "no references" control (term 0)."""
        x, context = feats[-1], None                                 # (B, 16f, X/16, Y/16, Z/16)
        if self.fusion is not None:
            context = x if zero_refs or refs is None else x + self.fusion(x, refs.features, refs.weights)
        return self.decoder_a(feats, context)

    @torch.no_grad()
    def context_ratio(self, feats, refs):
        """How loud the references are: the fused term's mean per-token norm over x's (0: an inert fusion)."""
        if self.fusion is None:
            raise ValueError("context_ratio: this network was built without references (no fusion)")
        term = self.fusion(feats[-1], refs.features, refs.weights)    # (B, 16f, X/16, Y/16, Z/16)
        return term.float().norm(dim=1).mean() / feats[-1].float().norm(dim=1).mean().clamp_min(1e-12)

    def predict_b(self, x):
        """Decoder B alone: the reference query needs no context."""
        return self.decoder_b(self.encoder(x))


def build_model(cfg):
    """The network an experiment config describes (fusion and context stream only when cfg.references)."""
    return DualDecoderVNet(1, cfg.n_classes, cfg.base_filters, cfg.dropout, cfg.references, cfg.mcam_gates)


def supervised_loss(logits, label, eps=1e-5):
    """0.5 (cross-entropy + soft Dice loss) of labeled logits (Lb, 2, X, Y, Z) against label (Lb, X, Y, Z)."""
    prob = logits.float().softmax(1)[:, 1]                                   # (Lb, X, Y, Z) foreground
    ce, target = F.cross_entropy(logits.float(), label), label.float()
    dice = (2.0 * (prob * target).sum() + eps) / (prob.sum() + target.sum() + eps)
    return 0.5 * (ce + (1.0 - dice))


def mse(a, b):
    """Mean squared error; over no patches (no unlabeled ones) 0, still in the graph, not NaN."""
    sq = (a - b).square()
    return sq.mean() if sq.numel() else sq.sum()


def sharpen(p, t):
    """Push a foreground probability towards 0 or 1: p^(1/t) / (p^(1/t) + (1 - p)^(1/t))."""
    a, b = p.pow(1.0 / t), (1.0 - p).pow(1.0 / t)
    return a / (a + b)
