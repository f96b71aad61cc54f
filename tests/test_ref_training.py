"""Training that makes the references earn their place (extensions.py): counterfactual steps, in which the
student's decoder A gets random references or none, and the prototype loss, in which the query's
prototypes segment its references."""
import math

import pytest
import torch

import extensions
import model
import train
from config import get_config
from mcam import References
from test_train import tiny_cfg


def test_counterfactual_steps_come_at_the_configured_rate():
    """With probability ref_counterfactual a step swaps the retrieved references, half for random ones and
    half for none (zero_refs); the rest keep them. One draw a step from the generator given."""
    cfg = get_config("LA_8", ["--ref_counterfactual=0.3"])
    refs, random_refs = object(), object()
    generator = torch.Generator().manual_seed(0)
    n, kinds = 4000, []
    for _ in range(n):
        given, zero = extensions.counterfactual_refs(refs, lambda: random_refs, generator, cfg)
        kinds.append("retrieved" if given is refs and not zero else "random" if given is random_refs
                     and not zero else "none" if given is None and zero else "unexpected")
    swapped = n - kinds.count("retrieved")
    assert kinds.count("unexpected") == 0
    assert abs(swapped - 0.3 * n) < 4 * math.sqrt(n * 0.3 * 0.7), swapped       # binomial, 4 std
    assert abs(kinds.count("random") - swapped / 2) < 4 * math.sqrt(swapped / 4), kinds.count("random")
    assert kinds.count("none") > 0


def test_counterfactual_off_or_without_references_draws_nothing():
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    never = lambda: pytest.fail("random references drawn with the switch off")
    refs = object()
    off = get_config("LA_8")
    assert off.ref_counterfactual == 0.0
    assert extensions.counterfactual_refs(refs, never, generator, off) == (refs, False)
    on = get_config("LA_8", ["--ref_counterfactual=1.0"])
    assert extensions.counterfactual_refs(None, never, generator, on) == (None, False)   # before the warm-up
    assert torch.equal(generator.get_state(), state)
    assert extensions.counterfactual_refs(refs, lambda: "random", generator, on)[0] is not refs
    assert not torch.equal(generator.get_state(), state)


def test_forward_passes_zero_refs_and_the_bottleneck_through():
    cfg = get_config("PHANTOM_8", ["--base_filters=4", "--ref_masks=true"])
    torch.manual_seed(0)
    net = model.build_model(cfg).eval()
    for m in net.decoder_a.mcams:                         # a trained reference path: zero_refs now shows
        torch.nn.init.normal_(m.inject.weight)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        feats = net.encoder(x)
        a, b, transferred, bottleneck = net(x, None, zero_refs=True, bottleneck=True)
        assert torch.equal(a, net.decode_a(feats, zero_refs=True))
        assert not torch.equal(a, net.decode_a(feats))
        assert transferred is None and torch.equal(bottleneck, feats[-1])   # no labels were transferred
        assert len(net(x)) == 3


def halves(flip=False):
    """Features (1, 2, 2, 2, 2): e0 in the first half of x, e1 in the second; the mask (8, 8, 8) {0, 1} is 1
    in the first half of x (the second with flip)."""
    features = torch.zeros(1, 2, 2, 2, 2)
    features[0, 0, 0], features[0, 1, 1] = 1.0, 1.0
    mask = torch.zeros(8, 8, 8)
    mask[slice(4, None) if flip else slice(None, 4)] = 1.0
    return features, mask


def test_prototype_loss_is_low_when_the_prototypes_fit_the_references_labels():
    """A labeled query whose foreground cells look like e0: a reference labelled where it shows e0 is
    segmented right (loss near 0), one labelled the other way round wrong (the cosine scale's worth); a
    reference of weight 0 (a filled slot) does not count; an unlabeled query counts at the weight w; a query
    without foreground does not count; off, nothing is computed."""
    cfg = get_config("LA_8", ["--ref_proto_weight=2.0"])
    query, label = halves()
    label = label.long()[None]                                        # (1, 8, 8, 8)
    empty = torch.zeros(0, 8, 8, 8)
    ref_features, mask = halves()
    _, swapped = halves(flip=True)

    def loss(masks, weights=(1.0, 0.0), n_lab=1, w=1.0, query_label=label, **kw):
        refs = References(ref_features[:, None].expand(1, 2, 2, 2, 2, 2), torch.tensor([weights]),
                          torch.stack(masks)[None])
        labeled, unlabeled = (query_label, empty) if n_lab else (empty.long(), query_label.float())
        return extensions.prototype_loss(refs, labeled, unlabeled, n_lab, w, kw.get("cfg", cfg), query)

    fit, wrong = float(loss([mask, swapped])), float(loss([swapped, mask]))
    assert fit < 1e-6 and wrong == pytest.approx(2.0 * extensions.PROTO_TEMPERATURE, rel=1e-3)
    assert float(loss([mask, swapped], weights=(0.5, 0.5))) == pytest.approx(wrong / 2, rel=1e-3)
    assert float(loss([swapped, mask], n_lab=0, w=0.25)) == pytest.approx(wrong / 4, rel=1e-3)
    assert float(loss([swapped, mask], query_label=torch.zeros_like(label))) == 0.0
    assert loss([swapped, mask], cfg=get_config("LA_8")) == 0.0       # a float: nothing computed


def test_prototype_loss_sends_gradients_to_the_query_features():
    cfg = get_config("LA_8", ["--ref_proto_weight=1.0"])
    g = torch.Generator().manual_seed(0)
    query = torch.randn(2, 8, 2, 2, 2, generator=g, requires_grad=True)
    label = (torch.rand(1, 16, 16, 16, generator=g) > 0.5).long()
    target = torch.rand(1, 16, 16, 16, generator=g)
    refs = References(torch.randn(2, 3, 8, 2, 2, 2, generator=g), torch.full((2, 3), 1 / 3),
                      (torch.rand(2, 3, 16, 16, 16, generator=g) > 0.5).float())
    loss = extensions.prototype_loss(refs, label, target, 1, 0.5, cfg, query)
    loss.backward()
    assert torch.isfinite(loss) and query.grad.abs().sum() > 0


def test_training_with_both_switches_swaps_the_students_references_and_learns_prototypes(tiny_la, tmp_path,
                                                                                       monkeypatch):
    """Every step past the warm-up (ref_counterfactual 1) gives the student's decoder A random references or
    none; the prototype loss is formed on the retrieved references with masks and, where a query has
    prototypes, reaches the student's bottleneck."""
    swaps, protos = [], []
    counterfactual, prototype = extensions.counterfactual_refs, extensions.prototype_loss

    def swap_spy(refs, random_refs, generator, cfg):
        given, zero = counterfactual(refs, random_refs, generator, cfg)
        swaps.append((given is refs, zero))
        return given, zero

    def proto_spy(refs, label, target, n_lab, w, cfg, bottleneck=None):
        loss = prototype(refs, label, target, n_lab, w, cfg, bottleneck)
        if refs is not None:                                          # past the warm-up
            grad, = torch.autograd.grad(loss, bottleneck, retain_graph=True)
            protos.append((refs.masks is not None, float(loss.detach()), float(grad.abs().sum())))
        return loss

    monkeypatch.setattr(extensions, "counterfactual_refs", swap_spy)
    monkeypatch.setattr(extensions, "prototype_loss", proto_spy)
    cfg = tiny_cfg(tiny_la, tmp_path / "run", max_iters=6, ref_counterfactual=1.0, ref_proto_weight=1.0)
    train.train(cfg, progress=False)
    assert len(swaps) == len(protos) == 4                             # iterations 3 to 6
    assert all(not kept for kept, _ in swaps)
    assert all(masks and math.isfinite(value) for masks, value, _ in protos), protos
    # a step whose queries all lack foreground or background cells has no prototypes to learn
    assert all((value > 0) == (grad > 0) for _, value, grad in protos) and any(g > 0 for *_, g in protos)
