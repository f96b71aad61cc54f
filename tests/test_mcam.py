"""Reference fusion and MCAM (mcam.py): shapes for any patch divisible by 16, the documented formulas as
oracles, the gates, the retrieval-weight semantics, Xavier init, bf16 autocast, loud shape errors."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mcam import MCAM, ReferenceFusion, axis_profiles


def inputs(patch, f=4, B=2, K=3, seed=1):
    """Bottleneck x, reference features and weights, and decoder features (scales 1/8 .. 1) for a patch."""
    g = torch.Generator().manual_seed(seed)
    low = [p // 16 for p in patch]
    x = torch.randn(B, 16 * f, *low, generator=g)                                 # (B, 16f, X/16, Y/16, Z/16)
    refs = torch.randn(B, K, 16 * f, *low, generator=g)                           # (B, K, 16f, X/16, ..)
    weights = torch.softmax(torch.randn(B, K, generator=g), 1)                    # (B, K)
    decs = [torch.randn(B, c, *[p // s for p in patch], generator=g)              # (B, c, X/s, Y/s, Z/s)
            for c, s in zip([8 * f, 4 * f, 2 * f, f], [8, 4, 2, 1])]
    return x, refs, weights, decs


def streams(fusion, mcams, x, refs, weights, decs):
    """The fused map, then every MCAM, as model.Decoder runs them: each scale's (main, context)."""
    ctx, outs = x + fusion(x, refs, weights), []
    for mcam, dec in zip(mcams, decs):
        main, ctx = mcam(dec, ctx)
        outs.append((main, ctx))
    return outs


def modules(f=4, gated=True, seed=0):
    torch.manual_seed(seed)
    fusion = ReferenceFusion(16 * f)
    return fusion, nn.ModuleList([MCAM(2**i * f, 2**(i + 1) * f, gated) for i in (3, 2, 1, 0)])


@pytest.mark.parametrize("patch", [(16, 16, 16), (32, 48, 16), (48, 16, 32)])
@pytest.mark.parametrize("B", [1, 2])
def test_shapes_for_patches_divisible_by_16(patch, B):
    fusion, mcams = modules()
    x, refs, weights, decs = inputs(patch, B=B)
    assert fusion(x, refs, weights).shape == x.shape
    for (main, ctx), dec in zip(streams(fusion, mcams.eval(), x, refs, weights, decs), decs):
        assert main.shape == ctx.shape == dec.shape and torch.isfinite(main).all()


@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_mcam_computes_the_documented_formula_with_gates_strictly_inside_0_1(scale):
    torch.manual_seed(0)
    main, ctx = scale * torch.randn(2, 8, 8, 6, 4), scale * torch.randn(2, 16, 4, 3, 2)
    for gated in (True, False):
        mcam = MCAM(8, 16, gated).eval()
        nn.init.normal_(mcam.proj[1].running_mean), nn.init.uniform_(mcam.proj[1].running_var, 0.5, 2)
        out, c_out = mcam(main, ctx)
        c = F.interpolate(mcam.proj(ctx), size=main.shape[2:], mode="trilinear", align_corners=False)
        g = 1.0
        if gated:                                                   # the oracle: the volume [main, c] pooled
            s = mcam.squeeze(torch.cat(axis_profiles(torch.cat([main, c], 1)), 2)).split((8, 6, 4), 2)
            gx, gy, gz = (torch.sigmoid(getattr(mcam, "gate_" + a)(t)) for a, t in zip("xyz", s))
            g = gx[..., :, None, None] * gy[..., None, :, None] * gz[..., None, None, :]   # (2, 8, 8, 6, 4)
            assert all((t > 0).all() and (t < 1).all() for t in (gx, gy, gz, g)) and g.std() > 0  # varies
        torch.testing.assert_close(c_out, g * c, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out, main + g * c, atol=1e-5, rtol=1e-5)
    names = {n.split(".")[0] for n, _ in MCAM(8, 16, gated=False).named_parameters()}
    assert names == {"proj"}                                        # "without MCAM": no gate parameters


def test_retrieval_weight_scales_a_references_attention():
    fusion = ReferenceFusion(48, heads=4).eval()
    x, refs, _, _ = inputs((32, 16, 32), f=3, B=2, K=3)
    a, b = refs[:, :1], refs[:, 1:2]
    # weight w scales a reference's attention by w: weight 2/3 on A equals A listed twice at 1/3
    w2 = torch.tensor([[2 / 3, 1 / 3]]).expand(2, 2)
    w3 = torch.full((2, 3), 1 / 3)
    assert torch.allclose(fusion(x, torch.cat([a, b], 1), w2),
                          fusion(x, torch.cat([a, a, b], 1), w3), atol=1e-5)
    # a zero weight removes a reference; only the ratios of the weights matter
    one_hot = torch.tensor([[1.0, 0.0, 0.0]]).expand(2, 3)
    assert torch.allclose(fusion(x, refs, one_hot), fusion(x, a, torch.ones(2, 1)), atol=1e-5)
    w = torch.softmax(torch.randn(2, 3), 1)
    assert torch.allclose(fusion(x, refs, w), fusion(x, refs, 5 * w), atol=1e-5)
    # the order of the references is irrelevant, and the weights do change the context
    perm = torch.tensor([2, 0, 1])
    assert torch.allclose(fusion(x, refs, w), fusion(x, refs[:, perm], w[:, perm]), atol=1e-5)
    assert not torch.allclose(fusion(x, refs, w), fusion(x, refs, w.flip(1)), atol=1e-3)


def test_xavier_initialisation_nothing_at_zero():
    fusion, mcams = modules()
    for name, p in [*fusion.named_parameters(), *mcams.named_parameters()]:
        if p.ndim >= 2:                                              # Xavier-uniform: inside its bound, not 0
            fan_out, fan_in = p.shape[0] * p[0, 0].numel(), p.shape[1] * p[0, 0].numel()
            bound = math.sqrt(6 / (fan_in + fan_out))
            assert p.abs().max() <= bound and p.abs().max() > 0.5 * bound, name
        elif name.endswith("bias"):
            assert not p.any(), name


def test_bf16_autocast_runs_forward_and_backward():
    fusion, mcams = modules()
    x, refs, weights, decs = inputs((16, 16, 32))
    expected = streams(fusion.eval(), mcams.eval(), x, refs, weights, decs)
    with torch.autocast("cpu", dtype=torch.bfloat16):               # decoder features come from bf16 convs
        got = streams(fusion, mcams, x, refs, weights, [d.bfloat16() for d in decs])
    for (e, _), (g, _) in zip(expected, got):
        assert g.dtype == torch.bfloat16 and (g.float() - e).abs().max() < 0.1 * e.abs().max()
    fusion.train(), mcams.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sum(m.float().square().mean() for m, _ in streams(fusion, mcams, x, refs, weights, decs))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in [*fusion.parameters(), *mcams.parameters()])


def test_bad_shapes_fail_loudly():
    fusion = ReferenceFusion(32)
    x = torch.randn(2, 32, 2, 2, 2)
    with pytest.raises(ValueError, match="refs"):
        fusion(x, torch.randn(2, 3, 16, 2, 2, 2), torch.full((2, 3), 1 / 3))   # wrong channels
    with pytest.raises(ValueError, match="weights"):
        fusion(x, torch.randn(2, 3, 32, 2, 2, 2), torch.full((2, 4), 1 / 4))   # weights for 4 references
