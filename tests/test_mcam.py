"""Reference fusion and MCAM (mcam.py): shapes for any patch divisible by 16, gradient flow, the gates,
the documented formulas as oracles, the retrieval-weight semantics, channels-last 3D and bf16 autocast."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mcam import MCAM, ReferenceFusion


def network(f=4, gated=True, seed=0):
    """The fusion and decoder A's four MCAMs as model.py builds them, at base width f."""
    torch.manual_seed(seed)
    ch = [8 * f, 4 * f, 2 * f, f]                                   # decoder scales 1/8 .. 1, coarse to fine
    mcams = nn.ModuleList([MCAM(c, cc, gated) for c, cc in zip(ch, [16 * f] + ch[:-1])])
    return nn.ModuleDict(dict(fusion=ReferenceFusion(16 * f), mcams=mcams))


def inputs(patch, f=4, B=2, K=3, seed=1):
    """Bottleneck x, references, retrieval weights and decoder features (scales 1/8 .. 1) for a patch."""
    g = torch.Generator().manual_seed(seed)
    low = [p // 16 for p in patch]
    x = torch.randn(B, 16 * f, *low, generator=g)                                    # (B, 16f, X/16, Y/16, Z/16)
    refs = torch.randn(B, K, 16 * f, *low, generator=g)                              # (B, K, 16f, X/16, ..)
    weights = torch.softmax(torch.randn(B, K, generator=g), 1)                       # (B, K)
    decs = [torch.randn(B, c, *[p // s for p in patch], generator=g)                 # (B, c, X/s, Y/s, Z/s)
            for c, s in zip([8 * f, 4 * f, 2 * f, f], [8, 4, 2, 1])]
    return x, refs, weights, decs


def up_the_decoder(net, ctx, decs):
    """The context travels up through every MCAM beside the decoder features; all decoder outputs."""
    outs = []
    for mcam, dec in zip(net["mcams"], decs):
        dec, ctx = mcam(dec, ctx)
        outs.append(dec)
    return outs


def run(net, x, refs, weights, decs):
    """Fusion at the bottleneck, then every MCAM."""
    return up_the_decoder(net, net["fusion"](x, refs, weights), decs)


@pytest.mark.parametrize("patch", [(16, 16, 16), (32, 48, 16), (48, 16, 32)])
@pytest.mark.parametrize("B", [1, 2])
def test_shapes_for_patches_divisible_by_16(patch, B):
    net = network()
    x, refs, weights, decs = inputs(patch, B=B)
    ctx = net["fusion"](x, refs, weights)
    assert ctx.shape == x.shape
    for mcam, dec in zip(net["mcams"], decs):
        out, ctx = mcam(dec, ctx)
        assert out.shape == ctx.shape == dec.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("gated", [True, False])
def test_gradients_reach_references_context_and_every_parameter(gated):
    net = network(gated=gated)
    x, refs, weights, decs = inputs((32, 16, 16))
    x.requires_grad_(), refs.requires_grad_()
    ctx = net["fusion"](x, refs, weights)
    ctx.retain_grad()
    sum(o.square().mean() for o in up_the_decoder(net, ctx, decs)).backward()
    for name, t in [("x", x), ("refs", refs), ("context", ctx)]:
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0, name
    assert (refs.grad.flatten(2).abs().sum(2) > 0).all()  # every reference of every sample is used
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
    for gated in (True, False):
        mcam = MCAM(8, 16, gated).eval()
        out, c, gates = mcam(dec, ctx, return_gates=True)
        up = F.interpolate(ctx, size=dec.shape[2:], mode="trilinear", align_corners=False)
        assert torch.allclose(c, mcam.proj(up), atol=1e-5)   # project-then-upsample == upsample-then-project
        gate = gates[0] * gates[1] * gates[2] if gated else 1.0
        assert torch.allclose(out, mcam.out(dec + gate * c), atol=1e-5)
        assert (gates is None) != gated
    # the ablation "without MCAM" has no gate parameters at all
    names = {n.split(".")[0] for n, _ in MCAM(8, 16, gated=False).named_parameters()}
    assert names == {"proj", "out"}


def test_retrieval_weight_scales_a_references_attention():
    fusion = ReferenceFusion(48, heads=4).eval()
    x, refs, _, _ = inputs((32, 16, 32), f=3, B=2, K=3)
    a, b = refs[:, :1], refs[:, 1:2]
    # weight w scales a reference's attention by w: weight 2/3 on A equals A listed twice at 1/3
    w2 = torch.tensor([[2 / 3, 1 / 3]]).expand(2, 2)
    w3 = torch.full((2, 3), 1 / 3)
    assert torch.allclose(fusion(x, torch.cat([a, b], 1), w2), fusion(x, torch.cat([a, a, b], 1), w3), atol=1e-5)
    # a zero weight removes a reference; only the ratios of the weights matter
    one_hot = torch.tensor([[1.0, 0.0, 0.0]]).expand(2, 3)
    assert torch.allclose(fusion(x, refs, one_hot), fusion(x, a, torch.ones(2, 1)), atol=1e-5)
    w = torch.softmax(torch.randn(2, 3), 1)
    assert torch.allclose(fusion(x, refs, w), fusion(x, refs, 5 * w), atol=1e-5)
    # the order of the references is irrelevant, and the weights do change the context
    perm = torch.tensor([2, 0, 1])
    assert torch.allclose(fusion(x, refs, w), fusion(x, refs[:, perm], w[:, perm]), atol=1e-5)
    assert not torch.allclose(fusion(x, refs, w), fusion(x, refs, w.flip(1)), atol=1e-3)


def test_channels_last_3d_gives_the_same_output():
    net = network().eval()
    x, refs, weights, decs = inputs((16, 32, 16))
    expected = run(net, x, refs, weights, decs)
    cl = torch.channels_last_3d
    assert net["fusion"](x, refs, weights).is_contiguous()  # the context stream keeps the input's layout
    net = net.to(memory_format=cl)
    x = x.to(memory_format=cl)
    assert net["fusion"](x, refs, weights).is_contiguous(memory_format=cl)
    got = run(net, x, refs, weights, [d.to(memory_format=cl) for d in decs])
    for e, g in zip(expected, got):
        assert g.is_contiguous(memory_format=cl)
        assert torch.allclose(e, g, atol=1e-4)


def test_bf16_autocast_runs_forward_and_backward():
    net = network()
    x, refs, weights, decs = inputs((16, 16, 32))
    expected = run(net.eval(), x, refs, weights, decs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(net, x, refs, weights, decs)
    for e, g in zip(expected, got):
        assert g.dtype == torch.bfloat16 and torch.isfinite(g).all()
        assert (g.float() - e).abs().max() < 0.1 * e.abs().max()
    net.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sum(o.float().square().mean() for o in run(net, x, refs, weights, decs))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_bad_shapes_fail_loudly():
    fusion = ReferenceFusion(32)
    x = torch.randn(2, 32, 2, 2, 2)
    with pytest.raises(ValueError, match="refs"):
        fusion(x, torch.randn(2, 3, 16, 2, 2, 2), torch.full((2, 3), 1 / 3))   # wrong channels
    with pytest.raises(ValueError, match="weights"):
        fusion(x, torch.randn(2, 3, 32, 2, 2, 2), torch.full((2, 4), 1 / 4))   # weights for 4 references
    with pytest.raises(ValueError, match="heads"):
        ReferenceFusion(30, heads=4)
