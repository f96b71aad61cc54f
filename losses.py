"""The losses of training (docs/design.md §9): Dice + cross-entropy on labeled patches, mean squared error
to the teacher's target, and the sharpening of a foreground probability. Pure functions of tensors."""
import torch.nn.functional as F


def dice_loss(prob, target, eps=1e-5):
    """1 - soft Dice of the foreground probability (B, X, Y, Z) against a {0, 1} target."""
    inter = (prob * target).sum()
    return 1.0 - (2.0 * inter + eps) / (prob.sum() + target.sum() + eps)


def supervised_loss(logits, label):
    """0.5 (cross-entropy + Dice) for one decoder's labeled logits (Lb, 2, X, Y, Z) and label
    (Lb, X, Y, Z)."""
    prob = logits.float().softmax(1)[:, 1]
    return 0.5 * (F.cross_entropy(logits.float(), label) + dice_loss(prob, label.float()))


def mean(t):
    """The mean of t, and 0 (still in the graph) when t is empty: a batch of labeled patches only has no
    unlabeled part, whose losses would otherwise be NaN."""
    return t.mean() if t.numel() else t.sum()


def mse(a, b):
    """Mean squared error, 0 over no patches."""
    return mean((a - b).square())


def sharpen(p, t):
    """Push a foreground probability towards 0 or 1: p^(1/t) / (p^(1/t) + (1 - p)^(1/t))."""
    a, b = p.pow(1.0 / t), (1.0 - p).pow(1.0 / t)
    return a / (a + b)
