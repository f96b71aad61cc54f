"""The dual-decoder V-Net (model.py): shapes, the reference path's exact identity when untrained, and the
references' label vote (ref_masks) as a logit prior with a learned weight."""
import dataclasses

import pytest
import torch

from config import Config
from mcam import References, weighted_mask
from model import PRIOR_CLIP, build_model, prior_logits


def tiny(**kw):
    return dataclasses.replace(Config(), base_filters=4, dropout=0.0, **kw)


def batch(B=2, K=3, patch=(32, 32, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 1, *patch, generator=g)
    refs = References(torch.randn(B, K, 64, *[p // 16 for p in patch], generator=g),
                      torch.softmax(torch.randn(B, K, generator=g), 1),
                      (torch.rand(B, K, *patch, generator=g) < 0.4).float())
    return x, refs


@pytest.mark.parametrize("ref_masks", [False, True])
def test_shapes_and_untrained_identity(ref_masks):
    torch.manual_seed(0)
    net = build_model(tiny(ref_masks=ref_masks)).eval()
    x, refs = batch()
    refs = refs if ref_masks else refs._replace(masks=None)
    a, b, labels = net(x, refs)
    assert a.shape == b.shape == (2, 2, 32, 32, 16) and (labels is not None) == ref_masks
    feats = net.encoder(x)
    assert torch.equal(net.decode_a(feats, refs), net.decode_a(feats))   # no jump when references switch on
    assert not hasattr(build_model(tiny(references=False)), "prior_scale")


def test_prior_is_the_references_vote_with_a_learned_weight():
    mask = torch.tensor([0.0, 0.25, 0.5, 1.0]).reshape(1, 1, 4, 1, 1)
    p = prior_logits(mask).softmax(1)[:, 1]                                # the vote, clipped
    assert torch.allclose(p.flatten(), torch.tensor([PRIOR_CLIP, 0.25, 0.5, 1 - PRIOR_CLIP]), atol=1e-6)
    torch.manual_seed(0)
    net = build_model(tiny(ref_masks=True)).eval()
    x, refs = batch()
    feats = net.encoder(x)
    with torch.no_grad():
        net.prior_scale.fill_(0.7)
    shift = net.decode_a(feats, refs) - net.decode_a(feats)             # injections still zero: only the vote
    assert torch.allclose(shift, 0.7 * prior_logits(weighted_mask(refs.masks, refs.weights)), atol=1e-5)
