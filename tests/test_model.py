"""The dual-decoder V-Net (model.py): shapes, the reference path's exact identity when untrained, and the
references' label vote (ref_masks) as a logit prior with a learned weight."""
import copy
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


def trained(net, seed=1):
    """Give the zero-started reference path weight, as training would: every MCAM injection and the vote."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.decoder_a.mcams:
            m.inject.weight.copy_(0.1 * torch.randn(m.inject.weight.shape, generator=g))
            m.inject.bias.copy_(0.1 * torch.randn(m.inject.bias.shape, generator=g))
        if hasattr(net, "prior_scale"):
            net.prior_scale.fill_(0.7)
    return net


def mcam_inputs(net):
    """Record what each MCAM of decoder A is given: (dec, ctx, labels, mask) per call."""
    seen = []
    for m in net.decoder_a.mcams:
        m.register_forward_hook(lambda module, args, out: seen.append(args))
    return seen


@pytest.mark.parametrize("flags", [{}, {"ref_masks": True}, {"ref_mask_detail": True}, {"mcam_gates": False}])
def test_zeroed_references_keep_decoder_a_and_the_query_stream(flags):
    """The "no references" control: decoder A as with a fusion whose attention output is zero and references
    whose masks are empty (the vote left out), and the bottleneck context is the scan's own features. Once
    the MCAMs have weight it differs from refs=None, which drops the MCAMs and with them the query stream."""
    torch.manual_seed(0)
    net = trained(build_model(tiny(**flags)).eval())
    x, refs = batch()
    feats = net.encoder(x)
    seen = mcam_inputs(net)
    zeroed, labels = net.decode_a(feats, refs, return_labels=True, zero_refs=True)
    assert torch.equal(seen[0][1], feats[-1])                              # the query's own stream
    assert (labels is None) != bool(flags.get("ref_masks"))
    assert labels is None or (labels.shape == (2, 4, 2, 2, 1) and not labels.any())
    hand = copy.deepcopy(net)                                      # the fusion's output zeroed by hand
    with torch.no_grad():
        hand.fusion.out.weight.zero_()
        hand.fusion.out.bias.zero_()
        if hasattr(hand, "prior_scale"):
            hand.prior_scale.zero_()
    empty = refs._replace(masks=torch.zeros_like(refs.masks))
    assert torch.equal(zeroed, hand.decode_a(feats, empty))
    assert torch.equal(zeroed, net.decode_a(feats, zero_refs=True))       # the references are not read
    assert not torch.allclose(zeroed, net.decode_a(feats), atol=1e-3)      # the MCAMs act on the query
    assert not torch.equal(zeroed, net.decode_a(feats, refs))              # what the references contain
    plain = build_model(tiny(references=False)).eval()
    assert torch.equal(plain.decode_a(feats, zero_refs=True), plain.decode_a(feats))


def test_mask_detail_reaches_the_upper_stages_only():
    torch.manual_seed(0)
    net = trained(build_model(tiny(ref_mask_detail=True)).eval())
    assert [m.label_channels for m in net.decoder_a.mcams] == [0, 1, 1, 0]   # 1/8, 1/4, 1/2, full
    assert not hasattr(net, "prior_scale") and not net.fusion.masks
    x, refs = batch()
    seen = mcam_inputs(net)
    a, b, labels = net(x, refs)
    assert a.shape == b.shape == (2, 2, 32, 32, 16) and labels is None
    assert [tuple(s[0].shape[2:]) for s in seen] == [(4, 4, 2), (8, 8, 4), (16, 16, 8), (32, 32, 16)]
    assert [s[3] is not None for s in seen] == [False, True, True, False] and seen[0][2] is None
    torch.testing.assert_close(seen[1][3], weighted_mask(refs.masks, refs.weights))
    feats = net.encoder(x)                                 # the mask is read: other mask, other output
    other = refs._replace(masks=refs.masks.flip(2))
    assert not torch.allclose(net.decode_a(feats, refs), net.decode_a(feats, other), atol=1e-4)


def test_mask_detail_off_is_the_default_and_on_adds_only_a_mask_channel():
    """Off (the default), decoder A never reads the references' masks. On, with the weights that read the mask
    channel at zero and every other weight copied from the default network, decoder A is the default's."""
    torch.manual_seed(0)
    off = trained(build_model(tiny()).eval())
    x, refs = batch()
    feats = off.encoder(x)
    assert torch.equal(off.decode_a(feats, refs), off.decode_a(feats, refs._replace(masks=None)))
    on = build_model(tiny(ref_mask_detail=True)).eval()
    state = on.state_dict()
    for name, value in off.state_dict().items():                           # the mask channel comes last
        assert value.ndim == state[name].ndim, name
        state[name] = torch.zeros_like(state[name])
        state[name][tuple(slice(0, s) for s in value.shape)] = value
    on.load_state_dict(state)
    torch.testing.assert_close(on.decode_a(feats, refs), off.decode_a(feats, refs), rtol=0, atol=1e-6)
    changed = {n for n, v in on.state_dict().items() if v.shape != off.state_dict()[n].shape}
    assert changed and all(n.startswith(("decoder_a.mcams.1.", "decoder_a.mcams.2.")) for n in changed)
