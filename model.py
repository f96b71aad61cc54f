"""The dual-decoder V-Net (docs/design.md §8).

A V-Net encoder (Milletari et al. 2016, as configured by UA-MT / MC-Net for LA: 16 base filters,
batch norm, dropout at the bottleneck and before the head) is shared by two decoders that differ
only in how they upsample:

    decoder A: transposed convolutions; optionally fuses the reference context (mcam.py)
    decoder B: trilinear upsampling + convolution; always plain

Their disagreement is a training signal (train.py), and decoder B's prediction is what drives the
reference query at training and test time.

With the references' masks (ref_masks, an extension beyond the paper), the references also vote:
their masks, weighted by retrieval weight, form a prior that is added to decoder A's logits with a
learned weight (prior_scale, starting at 0), as multi-atlas segmentation fuses its atlases' labels and
the network learns, through MCAM, where to correct the vote. Everything on the reference path starts
at zero, so decoder A with references is exactly decoder A without them until training moves it.
With ref_mask_detail instead, only the MCAMs at 1/4 and 1/2 of the patch read the references' weighted
mask, at their own scale: the references' labels with spatial detail, without the vote or the transfer.

Two controls say what the references bring: decode_a(feats, None) runs decoder A as a plain decoder
(no fusion, no MCAM), and decode_a(feats, zero_refs=True) keeps the whole reference branch with the
references' contribution set to zero (the fusion's attention, labels, mask and vote), so the MCAMs still
act on the scan's own stream: only what the references contain is missing.
"""
import torch
import torch.nn as nn

import mcam

FUSION_HEADS = 4  # attention heads of the reference fusion at the bottleneck
DETAIL_SCALES = (1, 2)  # decoder A's stages (0: 1/8 .. 3: full) whose MCAMs read the mask (ref_mask_detail)


def conv_stage(c_in, c_out, n_convs):
    """n_convs x (3x3x3 convolution, batch norm, ReLU)."""
    layers = []
    for i in range(n_convs):
        layers += [nn.Conv3d(c_in if i == 0 else c_out, c_out, 3, padding=1), nn.BatchNorm3d(c_out),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def down(c_in, c_out):
    """Halve the resolution with a stride-2 2x2x2 convolution."""
    return nn.Sequential(nn.Conv3d(c_in, c_out, 2, stride=2), nn.BatchNorm3d(c_out), nn.ReLU(inplace=True))


def up(c_in, c_out, mode):
    """Double the resolution: 'deconv' (transposed convolution) or 'trilinear' (interpolation + 3x3x3
    conv)."""
    if mode == "deconv":
        first = nn.ConvTranspose3d(c_in, c_out, 2, stride=2)
    else:
        first = nn.Sequential(nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
                              nn.Conv3d(c_in, c_out, 3, padding=1))
    return nn.Sequential(first, nn.BatchNorm3d(c_out), nn.ReLU(inplace=True))


class Encoder(nn.Module):
    """Five stages (1, 2, 3, 3, 3 convolutions); channels f, 2f, 4f, 8f, 16f at scales 1 .. 1/16."""

    def __init__(self, in_channels=1, f=16, dropout=0.5):
        super().__init__()
        ch = [f, 2 * f, 4 * f, 8 * f, 16 * f]
        self.stages = nn.ModuleList([conv_stage(in_channels, ch[0], 1)] +
                                    [conv_stage(ch[i], ch[i], n) for i, n in zip(range(1, 5), (2, 3, 3, 3))])
        self.downs = nn.ModuleList([down(ch[i], ch[i + 1]) for i in range(4)])
        self.dropout = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):                            # (B, 1, X, Y, Z)
        feats = [self.stages[0](x)]                  # (B, f, X, Y, Z)
        for stage, down_ in zip(self.stages[1:], self.downs):
            feats.append(stage(down_(feats[-1])))    # (B, 2f, X/2, ..) .. (B, 16f, X/16, Y/16, Z/16)
        feats[-1] = self.dropout(feats[-1])
        return feats


class Decoder(nn.Module):
    """Four up-stages with residual skip additions (V-Net style), then a 1x1x1 head.

    When built with `mcams` (one per scale, from coarse to fine), a reference context given to
    forward() is fused at every scale; without a context it runs as a plain decoder."""

    def __init__(self, f=16, n_classes=2, mode="deconv", dropout=0.5, mcams=None):
        super().__init__()
        ch = [f, 2 * f, 4 * f, 8 * f, 16 * f]
        self.ups = nn.ModuleList([up(ch[i + 1], ch[i], mode) for i in reversed(range(4))])
        self.stages = nn.ModuleList([conv_stage(ch[i], ch[i], n)
                                     for i, n in zip(reversed(range(4)), (3, 3, 2, 1))])
        self.mcams = mcams
        self.dropout = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Conv3d(f, n_classes, 1)

    def forward(self, feats, context=None, labels=None, mask=None):
        """feats: the encoder's five scales; context (B, 16f, X/16, Y/16, Z/16) from ReferenceFusion, with
        ref_masks also its transferred labels and the references' weighted mask (see MCAM.forward)."""
        x = feats[-1]                                # (B, 16f, X/16, Y/16, Z/16)
        for i, (up_, stage) in enumerate(zip(self.ups, self.stages)):
            x = stage(up_(x) + feats[-2 - i])        # (B, 8f, X/8, ..) .. (B, f, X, Y, Z)
            if context is not None and self.mcams is not None:
                mcam_ = self.mcams[i]                # an MCAM without label channels reads no label maps
                maps = (labels, mask) if mcam_.label_channels else (None, None)
                x, context = mcam_(x, context, *maps)  # gated context fused at this scale
        return self.head(self.dropout(x))            # (B, n_classes, X, Y, Z)


class DualDecoderVNet(nn.Module):
    """Shared encoder; decoder A (deconv, reference context) and decoder B (trilinear, plain)."""

    def __init__(self, in_channels=1, n_classes=2, base_filters=16, dropout=0.5, fusion=None, mcams=None):
        super().__init__()
        self.encoder = Encoder(in_channels, base_filters, dropout)
        self.decoder_a = Decoder(base_filters, n_classes, "deconv", dropout, mcams)
        self.decoder_b = Decoder(base_filters, n_classes, "trilinear", dropout)
        self.fusion = fusion  # mcam.ReferenceFusion, or None for the plain dual-decoder network
        # whether decoder A reads the references' weighted mask (ref_masks, ref_mask_detail)
        self.reads_mask = mcams is not None and any(m.label_channels for m in mcams)
        if fusion is not None and fusion.masks:  # weight of the references' label vote in decoder A's logits
            self.prior_scale = nn.Parameter(torch.zeros(()))

    def forward(self, x, refs=None, zero_refs=False, bottleneck=False):
        """x (B, 1, X, Y, Z); refs: mcam.References for decoder A, or None; zero_refs: decoder A with the
        references' contribution zeroed (decode_a).

        Returns the logits of decoder A and decoder B, each (B, n_classes, X, Y, Z), and with ref_masks the
        labels the fusion transferred from the references (B, heads, X/16, Y/16, Z/16), else None (None too
        with zero_refs: nothing was transferred); with `bottleneck`, fourth, the encoder's bottleneck
        features (B, 16f, X/16, Y/16, Z/16)."""
        feats = self.encoder(x)
        logits_a, labels = self.decode_a(feats, refs, return_labels=True, zero_refs=zero_refs)
        out = logits_a, self.decoder_b(feats), None if zero_refs else labels
        return out + (feats[-1],) if bottleneck else out

    def decode_a(self, feats, refs=None, return_labels=False, zero_refs=False):
        """Decoder A on encoder features, fusing the references' context when there are references.

        zero_refs: the "no references" control that keeps the reference branch (refs is not read). The
        fusion's attention output is zero, so the context is the scan's own bottleneck (x + gate * 0); the
        transferred labels and the references' mask are zeros and their vote is left out; every MCAM runs
        on that. Without a fusion (a plain network) it is decoder A as with refs=None."""
        labels = mask = context = None
        if self.fusion is not None and zero_refs:
            x = feats[-1]                                                      # (B, 16f, X/16, Y/16, Z/16)
            context = x
            if self.fusion.masks:
                labels = torch.zeros(len(x), self.fusion.heads, *x.shape[2:], device=x.device)  # (B, H, ..)
            if self.reads_mask:
                mask = torch.zeros(len(x), 1, *feats[0].shape[2:], device=x.device)          # (B, 1, X, Y, Z)
        elif refs is not None and self.fusion is not None:
            masks = refs.masks if self.fusion.masks else None
            context, labels = self.fusion(feats[-1], refs.features, refs.weights, masks)  # (B, 16f, ..), ..
            if self.reads_mask:
                mask = mcam.weighted_mask(refs.masks, refs.weights)                  # (B, 1, X, Y, Z)
        logits = self.decoder_a(feats, context, labels, mask)
        if mask is not None and self.fusion.masks and not zero_refs:  # the references vote: atlas prior
            logits = logits + self.prior_scale * prior_logits(mask)
        return (logits, labels) if return_labels else logits

    def predict_b(self, x):
        """Decoder B alone: the reference query needs no context."""
        return self.decoder_b(self.encoder(x))


PRIOR_CLIP = 0.05  # the references' vote is clipped to [0.05, 0.95] before its logit: at most +-2.9


def prior_logits(mask):
    """(B, 2, X, Y, Z) logits whose softmax is the references' weighted vote mask (B, 1, X, Y, Z), clipped."""
    p = mask.float().clamp(PRIOR_CLIP, 1 - PRIOR_CLIP)
    half = 0.5 * (p.log() - (1 - p).log())                   # (B, 1, X, Y, Z)
    return torch.cat([-half, half], 1)


def build_model(cfg):
    """The network an experiment config describes (references and MCAM when cfg.references is on; with
    cfg.ref_masks the fusion reads the references' masks and every MCAM gets their label maps; with
    cfg.ref_mask_detail the MCAMs of DETAIL_SCALES get the references' weighted mask)."""
    fusion = mcams = None
    if cfg.references:
        f = cfg.base_filters
        fusion = mcam.ReferenceFusion(16 * f, heads=FUSION_HEADS, masks=cfg.ref_masks)
        ch = [8 * f, 4 * f, 2 * f, f]                            # decoder A's scales, coarse to fine
        ctx = [16 * f] + ch[:-1]                                 # the context arrives from the scale below
        labels = [FUSION_HEADS + 1 if cfg.ref_masks                 # transferred labels + the weighted mask
                  else int(cfg.ref_mask_detail and i in DETAIL_SCALES)   # the weighted mask alone
                  for i in range(len(ch))]
        mcams = nn.ModuleList([mcam.MCAM(c, cc, n, gated=cfg.mcam_gates)
                               for c, cc, n in zip(ch, ctx, labels)])
    return DualDecoderVNet(1, cfg.n_classes, cfg.base_filters, cfg.dropout, fusion, mcams)

