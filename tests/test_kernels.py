"""Quantized Linear layers: quantization math, exact CPU GEMMs, and the one-call model swap."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowvram.kernels import linear as K


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture
def layer():
    torch.manual_seed(0)
    lin = nn.Linear(256, 384)
    nn.init.normal_(lin.weight, std=256 ** -0.5)
    return lin


def test_int4_pack_roundtrip_is_exact_on_the_grid():
    torch.manual_seed(1)
    q = torch.randint(0, 16, (8, 256), dtype=torch.uint8)
    scale = torch.rand(8, 2) + 0.5
    offset = torch.randn(8, 2)
    w = q.float().reshape(8, 2, 128) * scale[..., None].bfloat16().float() + offset[..., None].bfloat16().float()
    packed, s, o = K.quantize_int4_groupwise(w.reshape(8, 256))
    assert torch.equal(K.unpack_int4(packed), q)
    assert rel_err(K.dequantize_int4(packed, s, o, torch.float32), w.reshape(8, 256)) < 1e-2


@pytest.mark.parametrize("fmt,bound", [("fp8", 0.05), ("int8", 0.02), ("int4", 0.12)])
def test_quantized_linear_close_to_float(layer, fmt, bound):
    x = torch.randn(3, 17, 256)
    q = K.quantized_linear(layer, fmt)
    err = rel_err(q(x), layer(x))
    assert 0 < err < bound, err


def test_int8_gemm_equals_its_dequantized_math(layer):
    x = torch.randn(40, 256)
    q = K.quantized_linear(layer, "int8")
    x8, sa = K.per_token_int8(x)
    expected = (x8.float() @ q.weight.float().t()) * sa * q.weight_scale + layer.bias
    assert torch.allclose(q(x), expected.float(), atol=1e-5)


def test_smoothquant_factors_are_folded_exactly(layer):
    x = torch.randn(40, 256)
    x[:, 3] *= 50  # an outlier channel, the case SmoothQuant exists for
    smooth = x.abs().amax(0).clamp(min=1e-5) ** 0.5 / layer.weight.abs().amax(0).clamp(min=1e-5) ** 0.5
    plain = rel_err(K.quantized_linear(layer, "int8")(x), layer(x))
    smoothed = rel_err(K.quantized_linear(layer, "int8", smooth=smooth)(x), layer(x))
    assert smoothed < plain


def test_quantize_swaps_linears_by_recipe():
    model = nn.Sequential()
    model.add_module("blocks", nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 128)))
    model.add_module("head", nn.Sequential())
    model.head.add_module("head", nn.Linear(128, 64))
    K.quantize_(model, "fp8")
    assert isinstance(model.blocks[0], K.Fp8Linear) and isinstance(model.blocks[1], K.Fp8Linear)
    assert isinstance(model.head.head, nn.Linear)  # kept in bf16 like upstream
    with pytest.raises(ValueError, match="unknown format"):
        K.default_recipe(model, "int3")


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "int8", "int4"])
def test_fused_qkv_gives_the_same_output(fmt):
    from lowvram.model.config import tiny
    from lowvram.model.dit import LiveAvatarDiT, fuse_qkv_

    torch.manual_seed(0)
    model = LiveAvatarDiT(tiny())
    if fmt != "bf16":
        K.quantize_(model, fmt)
    attn = model.blocks["0"].self_attn
    x = torch.randn(40, 128)
    before = attn.query_key_value(x)
    fuse_qkv_(model)
    assert attn.qkv is not None and attn.q is None
    after = attn.query_key_value(x)
    for a, b in zip(before, after):
        assert torch.allclose(a, b, atol=1e-5)
    assert all(b.self_attn.qkv is not None for b in model.blocks.values())
    assert all(b.cross_attn.qkv is None and b.cross_attn.k is not None for b in model.blocks.values())


def test_fused_qkv_keeps_static_per_step_fp8_scales():
    """q, k, v read the same input, so the fused layer keeps one scale per step (their max), not three."""
    from lowvram.model.config import tiny
    from lowvram.model.dit import LiveAvatarDiT, fuse_qkv_
    from lowvram.kernels.linear import set_act_step

    torch.manual_seed(0)
    model = LiveAvatarDiT(tiny())
    K.quantize_(model, "fp8")
    attn = model.blocks["0"].self_attn
    for j, lin in enumerate((attn.q, attn.k, attn.v)):
        lin.register_buffer("act_scales", torch.tensor([0.01, 0.02, 0.03, 0.04, 0.05]) * (1 + j))
    x = torch.randn(40, 128)
    set_act_step(model, 2)
    q, k, v = attn.q(x), attn.k(x), attn.v(x)
    fuse_qkv_(model)
    assert attn.qkv.act_scales.shape == (5,) and "act_scales" in dict(attn.qkv.named_buffers())
    assert torch.allclose(attn.qkv.act_scales, torch.tensor([0.03, 0.06, 0.09, 0.12, 0.15]))
    set_act_step(model, 2)
    assert attn.qkv.act_scale.item() == pytest.approx(0.09)
    fq, fk, fv = attn.qkv(x).chunk(3, dim=-1)
    # v had the largest scale (0.09) in both cases: bit-equal; q and k now use the coarser shared scale.
    assert torch.equal(fv, v)
    for a, b in ((fq, q), (fk, k)):
        assert (a - b).abs().max() <= 0.1 * b.abs().max()


def test_patch_embedding_as_one_gemm_equals_the_conv():
    from lowvram.model.config import tiny
    from lowvram.model.dit import LiveAvatarDiT

    torch.manual_seed(0)
    model = LiveAvatarDiT(tiny())
    for conv in (model.patch_embedding, model.frame_packer.proj_2x, model.frame_packer.proj_4x):
        x = torch.randn(1, conv.in_channels, 9, 20, 28)  # not multiples of the 4x kernel: the conv drops the rest
        tokens, grid = model.patchify(conv, x)
        ref = conv(x)[0]
        assert grid == tuple(ref.shape[1:])
        torch.testing.assert_close(tokens, ref.flatten(1).t(), atol=1e-5, rtol=1e-5)



@pytest.mark.parametrize("stride", [1, 2])
def test_causal_conv1d_as_one_gemm_equals_the_conv(stride):
    from lowvram.model.audio_encoder import CausalConv1d

    torch.manual_seed(0)
    conv = CausalConv1d(24, 40, stride=stride)
    x = torch.randn(4, 24, 17)
    ref = conv.conv(F.pad(x, (2, 0), mode="replicate"))
    torch.testing.assert_close(conv(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_is_bit_equal_to_the_pairwise_rotation(dtype):
    from lowvram.model.rope import apply_rope, grid_positions, rope_table

    torch.manual_seed(0)
    x = torch.randn(50, 4, 16).to(dtype)
    cos, sin = rope_table(grid_positions(range(2), range(5), range(5)), (4, 2, 2))
    math_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    re, im = x.to(math_dtype).unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos.to(math_dtype)[:, None], sin.to(math_dtype)[:, None]
    expected = torch.stack((re * c - im * s, re * s + im * c), dim=-1).flatten(-2).to(dtype)
    assert torch.equal(apply_rope(x, cos, sin), expected)
