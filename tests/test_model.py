"""The dual-decoder V-Net (model.py): shapes, the plain network's initial weights, decoder A's two streams and
the "no references" control, the context ratio, gradients, channels-last, and overfitting one batch."""
import dataclasses
import hashlib

import pytest
import torch

from config import Config
from mcam import References
from model import build_model, supervised_loss


def tiny(**kw):
    return dataclasses.replace(Config(), base_filters=4, dropout=0.0, **kw)


def batch(B=2, K=3, patch=(32, 32, 16)):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 1, *patch, generator=g)
    refs = References(torch.randn(B, K, 64, *[p // 16 for p in patch], generator=g),
                      torch.softmax(torch.randn(B, K, generator=g), 1))
    return x, refs


def calibrated(net, x, refs):
    """net in eval mode with the BatchNorm statistics of one pass over (x, refs), as trained ones have."""
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None                                   # a cumulative average: this pass alone
            m.reset_running_stats()
    with torch.no_grad():
        net.train()(x, refs)
    return net.eval()


def fingerprint(net):
    h = hashlib.sha256()
    for name, value in net.state_dict().items():
        h.update(name.encode()), h.update(value.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def test_shapes_and_the_two_streams():
    torch.manual_seed(0)
    net = build_model(tiny()).eval()
    x, refs = batch()
    a, b = net(x, refs)
    assert a.shape == b.shape == net.predict_b(x).shape == (2, 2, 32, 32, 16)
    assert net.decoder_a.head.in_channels == 8 and net.decoder_b.head.in_channels == 4   # both streams: 2f
    assert len(net.decoder_a.mcams) == 4 and net.decoder_b.mcams is None


def test_the_plain_network_is_the_v_net_with_its_initial_weights():
    """references=false builds no fusion and no MCAM; at seed 0 its weights are those the V-Net has always
    started from (a changed fingerprint means the baseline no longer starts where its runs did). A references
    network of the same seed starts from the same encoder, decoder B and decoder-A main path."""
    torch.manual_seed(0)
    plain = build_model(tiny(references=False))
    assert fingerprint(plain) == "01dbbc2a079a6d27"
    assert plain.fusion is None and not any("mcams" in n or "fusion" in n for n in plain.state_dict())
    torch.manual_seed(0)
    cers = build_model(tiny())
    shared = plain.state_dict()
    for name, value in cers.state_dict().items():
        if name in shared and not name.startswith("decoder_a.head"):
            assert torch.equal(value, shared[name]), name
    x, refs = batch()
    feats = plain.eval().encoder(x)
    assert torch.equal(plain.decode_a(feats, refs), plain.decode_a(feats))          # refs are not read


@pytest.mark.parametrize("gated", [True, False])
def test_references_move_decoder_a_the_zeroed_control_keeps_the_branch_and_the_context_ratio(gated):
    torch.manual_seed(0)
    net = build_model(tiny(mcam_gates=gated))
    x, refs = batch()
    net = calibrated(net, x, refs)
    feats = net.encoder(x)
    retrieved, zeroed = net.decode_a(feats, refs), net.decode_a(feats, refs, zero_refs=True)
    assert (retrieved - zeroed).abs().max() > 0.05                   # untrained, the references already act
    other = refs._replace(features=torch.randn_like(refs.features))
    assert (net.decode_a(feats, other) - retrieved).abs().max() > 0.05   # what the references contain
    assert not torch.allclose(net.decode_a(feats, refs._replace(weights=refs.weights.flip(1))), retrieved,
                              atol=1e-3)                                  # and how they are weighed
    assert torch.equal(net.decode_a(feats), zeroed)                       # refs=None: the same control
    ratio, term = net.context_ratio(feats, refs), net.fusion(feats[-1], refs.features, refs.weights)
    assert ratio.ndim == 0 and ratio > 0 and not ratio.requires_grad
    assert torch.allclose(ratio, term.norm(dim=1).mean() / feats[-1].norm(dim=1).mean())
    with torch.no_grad():                                    # the control: the fusion's attention output zero
        net.fusion.out.weight.zero_(), net.fusion.out.bias.zero_()
    assert torch.equal(net.decode_a(feats, refs), zeroed) and net.context_ratio(feats, refs) == 0
    a, b = net(x, refs, zero_refs=True)
    assert torch.equal(a, zeroed) and torch.equal(b, net.decoder_b(feats))


def test_every_parameter_and_reference_gets_a_gradient_from_the_first_step():
    torch.manual_seed(0)
    net = build_model(tiny()).train()
    x, refs = batch()
    features = refs.features.clone().requires_grad_()
    a, b = net(x, refs._replace(features=features))
    (a.square().mean() + b.square().mean()).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert (features.grad.flatten(2).abs().sum(2) > 0).all()        # every reference of every sample is used


def test_channels_last_3d_gives_the_same_output():
    torch.manual_seed(0)
    net = build_model(tiny())
    x, refs = batch()
    net = calibrated(net, x, refs)
    expected = net(x, refs)
    cl = torch.channels_last_3d
    net = net.to(memory_format=cl)
    seen = []
    for m in net.decoder_a.mcams:
        m.register_forward_hook(lambda module, args, out: seen.append(out))
    got = net(x.contiguous(memory_format=cl), refs)
    assert all(t.is_contiguous(memory_format=cl) for out in seen for t in out)   # both streams keep it
    for e, g in zip(expected, got):
        assert torch.allclose(e, g, atol=1e-4)


def test_overfits_one_batch():
    torch.manual_seed(0)
    net = build_model(tiny()).train()
    x, refs = batch(patch=(16, 16, 16))
    label = (x[:, 0] > 0.5).long()                                  # a target only the image can give
    opt = torch.optim.Adam(net.parameters(), lr=3e-2)
    losses = []
    for _ in range(40):
        a, b = net(x, refs)
        loss = supervised_loss(a, label) + supervised_loss(b, label)
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses
