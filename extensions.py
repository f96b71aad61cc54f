"""The extensions beyond the paper (docs/design.md §9, §11), each behind one switch of config.Config and off
unless an experiment turns it on (the LA experiments turn none on).

train.train_step calls each function where it acts; a function returns what it was given when its switch is
off, so removing an extension is deleting its function and its call:

    strong_labeled_view     strong_labeled    the labeled patches in the strong view too
    mixed                   unlabeled_mix     unlabeled patches cut and mixed with each other (CutMix)
                            mix_labeled       ... or with labeled patches (copy-paste; replaces unlabeled_mix)
    strong_unlabeled_view   strong_view       the student sees the unlabeled patches in a strong view
    copy_paste_loss         mix_labeled       the supervised loss on the copy-pasted patches' hard targets
    transfer_loss           ref_masks         the labels the fusion transfers learn the query's own
    counterfactual_refs     ref_counterfactual  at times the student's decoder A gets random references or
                                                none in place of the retrieved ones
    prototype_loss          ref_proto_weight  the query's prototypes segment its references, scored on
                                              the references' masks

The operations on the patches (cutting, mixing, the strong view) live in data.py beside the protocol's
augmentation.
"""
import torch
import torch.nn.functional as F

import data
from losses import mean, supervised_loss

PROTO_TEMPERATURE = 20.0  # scale of the cosine similarities to the prototypes before the softmax (PANet's)
PROTO_MIN_CELLS = 0.5     # a query's prototypes count when its foreground and background each fill this
                          # many cells of the feature grid


def strong_labeled_view(image, n_lab, cfg):
    """strong_labeled: the labeled patches of image (B, 1, X, Y, Z) in the strong view (data.strong_view), a
    control for what the strong view does without unlabeled data."""
    if not cfg.strong_labeled:
        return image
    return torch.cat([data.strong_view(image[:n_lab]), image[n_lab:]])


def mixed(image, target, label, n_lab, cfg):
    """mix_labeled: each unlabeled patch cut and mixed with a labeled one, its target the ground truth where
    the labeled patch shows (data.mix_with_labeled); otherwise unlabeled_mix: pairs of unlabeled patches cut
    and mixed, their targets alike (data.mix_unlabeled). image (B, 1, X, Y, Z), target (Bu, X, Y, Z)."""
    if cfg.mix_labeled and len(target):
        return data.mix_with_labeled(image, target, label, n_lab)
    if cfg.unlabeled_mix and len(target) > 1:
        return data.mix_unlabeled(image, target, n_lab)
    return image, target


def strong_unlabeled_view(image, n_lab, cfg):
    """strong_view: the student sees the unlabeled patches of image (B, 1, X, Y, Z), after any mixing, in the
    strong view; the geometry is kept, so the teacher's targets still fit (weak-to-strong consistency)."""
    if not cfg.strong_view or len(image) == n_lab:
        return image
    return torch.cat([image[:n_lab], data.strong_view(image[n_lab:])])


def copy_paste_loss(loss_mt, logits_a, logits_b, target, cfg):
    """mix_labeled: a copy-pasted patch's target is part ground truth, so both student decoders' unlabeled
    logits (Bu, 2, X, Y, Z) take the supervised loss on the hard target (Bu, X, Y, Z) in place of the mean
    teacher's squared error `loss_mt`, which is returned as it is when the switch is off."""
    if not (cfg.mix_labeled and len(target)):
        return loss_mt
    hard = (target > 0.5).long()
    return supervised_loss(logits_a, hard) + supervised_loss(logits_b, hard)


def transfer_loss(transferred, label, target, n_lab, w, cfg):
    """ref_masks: how far the labels the fusion transferred from the references (B, H, d, h, w) are from the
    query's own foreground share on the same grid: the ground truth (Lb, X, Y, Z) for the labeled patches,
    the teacher's target (Bu, X, Y, Z) for the unlabeled ones, whose squared error is weighted by the
    consistency weight w. Every head counts. 0 when nothing was transferred (no masks or no references)."""
    if transferred is None:
        return 0.0
    share = F.adaptive_avg_pool3d(torch.cat([label.float(), target])[:, None].float(),
                                  transferred.shape[2:])                            # (B, 1, d, h, w)
    err = (transferred.float() - share).square()                                    # (B, H, d, h, w)
    return cfg.transfer_weight * (mean(err[:n_lab]) + w * mean(err[n_lab:]))


def counterfactual_refs(refs, random_refs, generator, cfg):
    """ref_counterfactual: what the student's decoder A is given this step, (references, zero_refs). With
    probability cfg.ref_counterfactual, one uniform draw from `generator` (the run's reference generator, so
    a resumed run draws the same) puts in place of the retrieved `refs` either random references,
    random_refs() (retrieval mode "random", drawn from the same generator), or none, decoder A with the
    references' contribution zeroed (model.decode_a zero_refs), half and half: the network learns to segment
    without them and cannot come to trust whatever it is given. The teacher keeps the retrieved references.
    Off, or without references: (refs, False), and nothing is drawn. On CUDA the draw is read on the host,
    one synchronisation a step."""
    if refs is None or not cfg.ref_counterfactual:
        return refs, False
    u = float(torch.rand((), generator=generator, device=generator.device))
    if u >= cfg.ref_counterfactual:
        return refs, False
    if u < cfg.ref_counterfactual / 2:
        return random_refs(), False
    return None, True


def masked_average(features, weight):
    """Prototypes: the features (B, C, d, h, w) averaged with the weight (B, 1, d, h, w) per patch, (B, C)."""
    return (features * weight).sum((2, 3, 4)) / weight.sum((2, 3, 4)).clamp(min=1e-6)


def prototype_loss(refs, label, target, n_lab, w, cfg, bottleneck=None):
    """ref_proto_weight: prototype alignment as in few-shot segmentation (PANet, Wang et al. 2019), the
    query's prototypes segmenting its references, a target only the references hold (their masks).

    From the student's bottleneck features (B, C, d, h, w) and the query's foreground share on that grid
    (the ground truth (Lb, X, Y, Z) for the labeled patches, the teacher's target (Bu, X, Y, Z) for the
    unlabeled ones, both fixed), a foreground and a background prototype (masked averages); each
    reference's bank features (refs.features (B, K, C, d, h, w), the teacher's bottleneck) are segmented by
    the cosine similarity of each cell to the two prototypes, times PROTO_TEMPERATURE, softmax, and scored
    by cross-entropy against the reference's mask pooled to the grid (refs.masks (B, K, X, Y, Z): its
    foreground share, a soft target). The references of a query count with their retrieval weights (a
    filled slot weighs 0); a query counts when its foreground and its background each fill
    PROTO_MIN_CELLS cells. Gradients reach the student through its prototypes. The unlabeled part, whose
    prototypes rest on the teacher, is weighted by the consistency weight w, as in transfer_loss. Off, or
    without references: 0, and nothing is computed."""
    if not cfg.ref_proto_weight or refs is None or bottleneck is None:
        return 0.0
    q = bottleneck.float()                                                           # (B, C, d, h, w)
    grid = q.shape[2:]
    share = F.adaptive_avg_pool3d(torch.cat([label.float(), target.float()])[:, None], grid)  # (B, 1, ..)
    protos = torch.stack([masked_average(q, 1 - share), masked_average(q, share)], 1)  # (B, 2, C): bg, fg
    sim = torch.einsum("bkcxyz,bjc->bkjxyz", F.normalize(refs.features.float(), dim=2),
                       F.normalize(protos, dim=2))                                   # (B, K, 2, d, h, w)
    log_p = (PROTO_TEMPERATURE * sim).log_softmax(2)
    ref_share = F.adaptive_avg_pool3d(refs.masks.float(), grid)                      # (B, K, d, h, w)
    ce = -(ref_share * log_p[:, :, 1] + (1 - ref_share) * log_p[:, :, 0]).mean((2, 3, 4))   # (B, K)
    per_query = (refs.weights.float() * ce).sum(1)                                   # (B,)
    cells = share.sum((1, 2, 3, 4))
    counts = (torch.minimum(cells, share[0].numel() - cells) >= PROTO_MIN_CELLS).float()      # (B,)
    part = lambda s: (per_query[s] * counts[s]).sum() / counts[s].sum().clamp(min=1)
    return cfg.ref_proto_weight * (part(slice(None, n_lab)) + w * part(slice(n_lab, None)))
