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

The operations on the patches (cutting, mixing, the strong view) live in data.py beside the protocol's
augmentation.
"""
import torch
import torch.nn.functional as F

import data
from losses import mean, supervised_loss


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
