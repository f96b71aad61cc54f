"""Reference fusion and MCAM (mcam.py): shapes for any patch divisible by 16, the exact identity of an
untrained reference path, gradient flow, the gates, the documented formulas as oracles, the retrieval-weight
semantics, the references' masks, channels-last 3D and bf16 autocast."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mcam import MCAM, References, ReferenceFusion, weighted_mask

HEADS = 4


def network(f=4, gated=True, masks=False, seed=0, trained=False):
    """The fusion and decoder A's four MCAMs as model.py builds them, at base width f. `trained` gives the
    zero-initialised injections random weights, as training would: otherwise every MCAM is the identity."""
    torch.manual_seed(seed)
    ch = [8 * f, 4 * f, 2 * f, f]                                   # decoder scales 1/8 .. 1, coarse to fine
    labels = HEADS + 1 if masks else 0
    mcams = nn.ModuleList([MCAM(c, cc, labels, gated) for c, cc in zip(ch, [16 * f] + ch[:-1])])
    if trained:
        for m in mcams:
            nn.init.normal_(m.inject.weight, std=0.1)
            nn.init.normal_(m.inject.bias, std=0.1)
    return nn.ModuleDict(dict(fusion=ReferenceFusion(16 * f, HEADS, masks), mcams=mcams))


def inputs(patch, f=4, B=2, K=3, seed=1):
    """Bottleneck x, references (with random masks), and decoder features (scales 1/8 .. 1) for a patch."""
    g = torch.Generator().manual_seed(seed)
    low = [p // 16 for p in patch]
    x = torch.randn(B, 16 * f, *low, generator=g)                                 # (B, 16f, X/16, Y/16, Z/16)
    refs = References(torch.randn(B, K, 16 * f, *low, generator=g),               # (B, K, 16f, X/16, ..)
                      torch.softmax(torch.randn(B, K, generator=g), 1),           # (B, K)
                      (torch.rand(B, K, *patch, generator=g) < 0.3).float())      # (B, K, X, Y, Z)
    decs = [torch.randn(B, c, *[p // s for p in patch], generator=g)              # (B, c, X/s, Y/s, Z/s)
            for c, s in zip([8 * f, 4 * f, 2 * f, f], [8, 4, 2, 1])]
    return x, refs, decs


def run(net, x, refs, decs):
    """Fusion at the bottleneck, then every MCAM, as model.Decoder runs them; every decoder output."""
    masks = refs.masks if net["fusion"].masks else None
    ctx, labels = net["fusion"](x, refs.features, refs.weights, masks)
    mask = None if masks is None else weighted_mask(masks, refs.weights)
    outs = []
    for mcam, dec in zip(net["mcams"], decs):
        dec, ctx = mcam(dec, ctx, labels, mask)
        outs.append(dec)
    return outs


@pytest.mark.parametrize("patch", [(16, 16, 16), (32, 48, 16), (48, 16, 32)])
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("masks", [False, True])
def test_shapes_for_patches_divisible_by_16(patch, B, masks):
    net = network(masks=masks, trained=True)
    x, refs, decs = inputs(patch, B=B)
    ctx, labels = net["fusion"](x, refs.features, refs.weights, refs.masks if masks else None)
    assert ctx.shape == x.shape and (labels is None) != masks
    if masks:
        assert labels.shape == (B, HEADS, *x.shape[2:]) and (labels >= 0).all() and (labels <= 1).all()
    for out, dec in zip(run(net, x, refs, decs), decs):
        assert out.shape == dec.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("masks", [False, True])
def test_an_untrained_reference_path_is_the_identity(masks):
    """The injections start at zero: whatever the references, every MCAM returns the decoder features exactly,
    so switching references on cannot change an untrained decoder A (no switch shock)."""
    net = network(masks=masks)
    x, refs, decs = inputs((32, 16, 16))
    for out, dec in zip(run(net, x, refs, decs), decs):
        assert torch.equal(out, dec)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("masks", [False, True])
def test_gradients_reach_references_context_and_every_parameter(gated, masks):
    net = network(gated=gated, masks=masks)
    x, refs, decs = inputs((32, 16, 16))
    sum(o.square().mean() for o in run(net, x, refs, decs)).backward()
    for name, p in net.named_parameters():          # at the start only the injections learn ...
        assert (p.grad is not None and p.grad.abs().sum() > 0) == ("inject" in name), name
    net = network(gated=gated, masks=masks, trained=True)   # ... once they have weight, everything does
    features = refs.features.clone().requires_grad_()
    x.requires_grad_()
    sum(o.square().mean() for o in run(net, x, refs._replace(features=features), decs)).backward()
    for name, t in [("x", x), ("refs", features)]:
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0, name
    assert (features.grad.flatten(2).abs().sum(2) > 0).all()  # every reference of every sample is used
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_gates_strictly_inside_unit_interval(scale):
    mcam = MCAM(16, 32)
    dec, ctx = scale * torch.randn(2, 16, 8, 12, 6), scale * torch.randn(2, 32, 4, 6, 3)
    out, c, (gx, gy, gz) = mcam(dec, ctx, return_gates=True)
    assert (gx.shape, gy.shape, gz.shape) == ((2, 16, 8, 1, 1), (2, 16, 1, 12, 1), (2, 16, 1, 1, 6))
    gate = gx * gy * gz                                       # (2, 16, 8, 12, 6)
    for g in (gx, gy, gz, gate):
        assert (g > 0).all() and (g < 1).all()
    assert gate.std() > 0  # the gate varies over positions and channels: it is not a constant


def test_mcam_computes_the_documented_formula():
    torch.manual_seed(0)
    dec, ctx = torch.randn(2, 8, 8, 6, 4), torch.randn(2, 16, 4, 3, 2)
    labels, mask = torch.rand(2, HEADS, 1, 1, 1), torch.rand(2, 1, 32, 24, 16)
    for gated in (True, False):
        for with_masks in (False, True):
            mcam = MCAM(8, 16, HEADS + 1 if with_masks else 0, gated).eval()
            nn.init.normal_(mcam.inject.weight)
            args = (labels, mask) if with_masks else (None, None)
            out, c, gates = mcam(dec, ctx, *args, return_gates=True)
            up = F.interpolate(ctx, size=dec.shape[2:], mode="trilinear", align_corners=False)
            assert torch.allclose(c, mcam.proj(up), atol=1e-5)   # project, upsample == upsample, project
            m = c
            if with_masks:                                     # label maps: upsampled labels, block-mean mask
                pooled = mask.reshape(2, 1, 8, 4, 6, 4, 4, 4).mean((3, 5, 7))
                m = torch.cat([c, labels.expand(2, HEADS, 8, 6, 4), pooled], 1)
            gate = gates[0] * gates[1] * gates[2] if gated else 1.0
            assert torch.allclose(out, dec + mcam.inject(gate * m), atol=1e-5)
            assert (gates is None) != gated
    # the ablation "without MCAM" has no gate parameters at all
    names = {n.split(".")[0] for n, _ in MCAM(8, 16, gated=False).named_parameters()}
    assert names == {"proj", "inject"}
    with pytest.raises(ValueError, match="label channels"):
        MCAM(8, 16, HEADS + 1)(dec, ctx)                         # built for masks, given none


def fuse(fusion, x, features, weights, masks=None):
    return fusion(x, features, weights, masks)[0]


def test_retrieval_weight_scales_a_references_attention():
    fusion = ReferenceFusion(48, heads=4).eval()
    x, refs, _ = inputs((32, 16, 32), f=3, B=2, K=3)
    refs = refs.features
    a, b = refs[:, :1], refs[:, 1:2]
    # weight w scales a reference's attention by w: weight 2/3 on A equals A listed twice at 1/3
    w2 = torch.tensor([[2 / 3, 1 / 3]]).expand(2, 2)
    w3 = torch.full((2, 3), 1 / 3)
    assert torch.allclose(fuse(fusion, x, torch.cat([a, b], 1), w2),
                          fuse(fusion, x, torch.cat([a, a, b], 1), w3), atol=1e-5)
    # a zero weight removes a reference; only the ratios of the weights matter
    one_hot = torch.tensor([[1.0, 0.0, 0.0]]).expand(2, 3)
    assert torch.allclose(fuse(fusion, x, refs, one_hot), fuse(fusion, x, a, torch.ones(2, 1)), atol=1e-5)
    w = torch.softmax(torch.randn(2, 3), 1)
    assert torch.allclose(fuse(fusion, x, refs, w), fuse(fusion, x, refs, 5 * w), atol=1e-5)
    # the order of the references is irrelevant, and the weights do change the context
    perm = torch.tensor([2, 0, 1])
    assert torch.allclose(fuse(fusion, x, refs, w), fuse(fusion, x, refs[:, perm], w[:, perm]), atol=1e-5)
    assert not torch.allclose(fuse(fusion, x, refs, w), fuse(fusion, x, refs, w.flip(1)), atol=1e-3)


def test_the_context_keeps_the_scan():
    """context = x + gate * attention: with references the scan's own features stay in the stream."""
    fusion = ReferenceFusion(48, heads=4).eval()
    x, refs, _ = inputs((32, 16, 32), f=3)
    ctx = fuse(fusion, x, refs.features, refs.weights)
    nn.init.zeros_(fusion.out.weight), nn.init.zeros_(fusion.out.bias)        # no attention output at all
    assert torch.allclose(fuse(fusion, x, refs.features, refs.weights), x) and not torch.allclose(ctx, x)


def test_transferred_labels_read_the_references_masks():
    """Each head's label is an attention-weighted mean of the references' foreground shares: 1 when every
    reference is all foreground, 0 when all background, and a zero-weight reference's mask is ignored."""
    fusion = ReferenceFusion(48, heads=4, masks=True).eval()
    x, refs, _ = inputs((32, 16, 32), f=3)
    ones, zeros = torch.ones_like(refs.masks), torch.zeros_like(refs.masks)
    assert torch.allclose(fusion(x, refs.features, refs.weights, ones)[1], torch.ones(1))
    assert torch.allclose(fusion(x, refs.features, refs.weights, zeros)[1], torch.zeros(1))
    first = torch.tensor([[1.0, 0.0, 0.0]]).expand(2, 3)
    mixed = torch.cat([ones[:, :1], zeros[:, 1:]], 1)            # only the first reference has foreground
    assert torch.allclose(fusion(x, refs.features, first, mixed)[1], torch.ones(1), atol=1e-6)
    labels = fusion(x, refs.features, refs.weights, refs.masks)[1]
    assert 0 < labels.min() and labels.max() < 1 and labels.std() > 0
    with pytest.raises(ValueError, match="masks"):
        fusion(x, refs.features, refs.weights)                   # built for masks, given none


def test_weighted_mask():
    masks = torch.stack([torch.ones(4, 4, 2), torch.zeros(4, 4, 2)])[None]   # (1, 2, 4, 4, 2)
    assert torch.allclose(weighted_mask(masks, torch.tensor([[0.25, 0.75]])),
                          torch.full((1, 1, 4, 4, 2), 0.25))


def test_channels_last_3d_gives_the_same_output():
    net = network(masks=True, trained=True).eval()
    x, refs, decs = inputs((16, 32, 16))
    expected = run(net, x, refs, decs)
    cl = torch.channels_last_3d
    assert fuse(net["fusion"], x, refs.features, refs.weights, refs.masks).is_contiguous()  # keeps the layout
    net = net.to(memory_format=cl)
    x = x.to(memory_format=cl)
    assert fuse(net["fusion"], x, refs.features, refs.weights, refs.masks).is_contiguous(memory_format=cl)
    got = run(net, x, refs, [d.to(memory_format=cl) for d in decs])
    for e, g in zip(expected, got):
        assert g.is_contiguous(memory_format=cl)
        assert torch.allclose(e, g, atol=1e-4)


def test_bf16_autocast_runs_forward_and_backward():
    net = network(masks=True, trained=True)
    x, refs, decs = inputs((16, 16, 32))
    expected = run(net.eval(), x, refs, decs)
    with torch.autocast("cpu", dtype=torch.bfloat16):                 # decoder features come from bf16 convs
        got = run(net, x, refs, [d.bfloat16() for d in decs])
    for e, g in zip(expected, got):
        assert g.dtype == torch.bfloat16 and torch.isfinite(g).all()
        assert (g.float() - e).abs().max() < 0.1 * e.abs().max()
    net.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sum(o.float().square().mean() for o in run(net, x, refs, decs))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_bad_shapes_fail_loudly():
    fusion = ReferenceFusion(32)
    x = torch.randn(2, 32, 2, 2, 2)
    with pytest.raises(ValueError, match="refs"):
        fusion(x, torch.randn(2, 3, 16, 2, 2, 2), torch.full((2, 3), 1 / 3))   # wrong channels
    with pytest.raises(ValueError, match="weights"):
        fusion(x, torch.randn(2, 3, 32, 2, 2, 2), torch.full((2, 4), 1 / 4))   # weights for 4 references
    with pytest.raises(ValueError, match="masks"):
        fusion(x, torch.randn(2, 3, 32, 2, 2, 2), torch.full((2, 3), 1 / 3), torch.ones(2, 3, 32, 32, 32))
    with pytest.raises(ValueError, match="heads"):
        ReferenceFusion(30, heads=4)
