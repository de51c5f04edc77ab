"""Generic layers of the DAT models: window attention (L / S) against a brute-force reference, MLP / ConvFFN,
LPU, LayerScale, DropPath, stems and down-sampling."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deformattn.layers import (
    ConvFFN,
    ConvStem,
    Downsample,
    DropPath,
    LayerScale,
    LocalPerceptionUnit,
    Mlp,
    PatchifyStem,
    WindowAttention,
)
from deformattn.layers.drop import drop_path
from deformattn.layers.stem import conv_output_size
from deformattn.layers.window_attention import relative_position_index


# ---------------------------------------------------------------------------------------------------------------
# window attention
# ---------------------------------------------------------------------------------------------------------------
def _segments(length: int, padded: int, ws: int, shift: int) -> list[int]:
    """Window id of every row of a padded axis: tiles of ``ws`` starting at ``shift`` (no wrap-around), i.e.
    ``[0, s), [s, s + ws), ...`` - Swin's shifted windows seen in the original coordinates."""
    return [0 if r < shift else 1 + (r - shift) // ws for r in range(padded)]


def window_attention_bruteforce(m: WindowAttention, x: torch.Tensor) -> torch.Tensor:
    """One query at a time: attend to the real (unpadded) tokens of the same (shifted) window, with the bias of
    the table entry for the offset (dy, dx). Independent of the module's roll / partition / mask code."""
    B, C, H, W = x.shape
    ws, s, nH, hd = m.window_size, m.shift_size, m.num_heads, m.head_dim
    Hp, Wp = math.ceil(H / ws) * ws, math.ceil(W / ws) * ws
    rows, cols = _segments(H, Hp, ws, s), _segments(W, Wp, ws, s)
    tokens = x.permute(0, 2, 3, 1)  # B, H, W, C
    qkv = m.proj_qkv(tokens).reshape(B, H, W, 3, nH, hd)
    q, k, v = qkv[..., 0, :, :] * m.scale, qkv[..., 1, :, :], qkv[..., 2, :, :]  # B, H, W, nH, hd
    table = m.relative_position_bias_table  # (2ws-1)^2, nH
    out = torch.zeros(B, H, W, nH, hd, dtype=x.dtype)
    for i in range(H):
        for j in range(W):
            keys = [(r, c) for r in range(H) for c in range(W) if rows[r] == rows[i] and cols[c] == cols[j]]
            kk = torch.stack([k[:, r, c] for r, c in keys], dim=2)  # B, nH, n, hd
            vv = torch.stack([v[:, r, c] for r, c in keys], dim=2)
            bias = torch.stack([table[(i - r + ws - 1) * (2 * ws - 1) + (j - c + ws - 1)] for r, c in keys], dim=1)
            logits = torch.einsum("bhd,bhnd->bhn", q[:, i, j], kk) + bias  # B, nH, n
            out[:, i, j] = torch.einsum("bhn,bhnd->bhd", logits.softmax(-1), vv)
    return m.proj_out(out.reshape(B, H, W, C)).permute(0, 3, 1, 2)


@pytest.mark.parametrize(
    "H, W, ws, shifted",
    [(8, 8, 4, False), (8, 8, 4, True), (6, 9, 3, True), (7, 10, 4, False), (7, 10, 4, True), (3, 5, 4, True),
     (5, 5, 2, True)],
)
def test_window_attention_matches_bruteforce(H, W, ws, shifted):
    torch.set_default_dtype(torch.float64)
    m = WindowAttention(12, 3, ws, shift_size=math.ceil(ws / 2) if shifted else 0, fmap_size=8).eval()
    with torch.no_grad():
        m.relative_position_bias_table.normal_()  # large enough to matter
    x = torch.randn(2, 12, H, W)
    with torch.no_grad():
        y = m(x)
        ref = window_attention_bruteforce(m, x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


def test_shift_mask_follows_input_size_not_construction_size():
    torch.set_default_dtype(torch.float64)
    m = WindowAttention(8, 2, 4, shift_size=2, fmap_size=8).eval()
    assert m.attn_mask.shape == (4, 16, 16)  # the official buffer for the 8x8 construction size
    x = torch.randn(1, 8, 12, 16)  # 3 x 4 windows
    with torch.no_grad():
        torch.testing.assert_close(m(x), window_attention_bruteforce(m, x), rtol=1e-10, atol=1e-10)


def test_relative_position_index_matches_offsets():
    ws = 3
    idx = relative_position_index(ws)
    coords = [(r, c) for r in range(ws) for c in range(ws)]
    for a, (r1, c1) in enumerate(coords):
        for b, (r2, c2) in enumerate(coords):
            assert idx[a, b] == (r1 - r2 + ws - 1) * (2 * ws - 1) + (c1 - c2 + ws - 1)


def test_window_attention_derived_buffers_are_not_overwritten_by_loading():
    m = WindowAttention(8, 2, 4, shift_size=2, fmap_size=8)
    sd = m.state_dict()
    assert {"relative_position_index", "attn_mask", "relative_position_bias_table"} <= set(sd)
    index, mask = m.relative_position_index.clone(), m.attn_mask.clone()
    sd["relative_position_index"] = torch.zeros_like(index)
    sd["attn_mask"] = torch.randn(9, 16, 16)  # another size: accepted, ignored
    m.load_state_dict(sd, strict=True)
    assert torch.equal(m.relative_position_index, index) and torch.equal(m.attn_mask, mask)


def test_window_attention_gradients_and_errors():
    m = WindowAttention(8, 2, 4, shift_size=2, fmap_size=8)
    x = torch.randn(2, 8, 9, 7, requires_grad=True)
    m(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    with pytest.raises(ValueError, match="x must have 8 channels"):
        m(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="shift_size"):
        WindowAttention(8, 2, 4, shift_size=4, fmap_size=8)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        WindowAttention(10, 4, 4)
    with pytest.raises(ValueError, match="fmap_size"):
        WindowAttention(8, 2, 4, shift_size=2)


# ---------------------------------------------------------------------------------------------------------------
# feed-forward, LPU, LayerScale, DropPath
# ---------------------------------------------------------------------------------------------------------------
def test_mlp_is_per_pixel_two_layer_gelu():
    torch.set_default_dtype(torch.float64)
    m = Mlp(6, 3).eval()
    x = torch.randn(2, 6, 3, 4)
    lin1, lin2 = m.chunk.linear1, m.chunk.linear2
    t = x.permute(0, 2, 3, 1)
    ref = F.linear(F.gelu(F.linear(t, lin1.weight, lin1.bias)), lin2.weight, lin2.bias).permute(0, 3, 1, 2)
    torch.testing.assert_close(m(x), ref)
    names = {"chunk.linear1.weight", "chunk.linear1.bias", "chunk.linear2.weight", "chunk.linear2.bias"}
    assert set(m.state_dict()) == names


@pytest.mark.parametrize("version", ["pp", "v1"])
def test_conv_ffn_versions(version):
    torch.set_default_dtype(torch.float64)
    m = ConvFFN(4, 2, version=version).eval()
    x = torch.randn(2, 4, 5, 6)
    fc1 = m.linear1[0] if version == "pp" else m.linear1
    fc2 = m.linear2[0] if version == "pp" else m.linear2
    h = F.conv2d(x, fc1.weight, fc1.bias)
    d = F.conv2d(h, m.dwc.weight, m.dwc.bias, padding=1, groups=8)
    h = F.gelu(h + d) if version == "pp" else F.gelu(d)  # DAT++ keeps a residual around the dwconv
    torch.testing.assert_close(m(x), F.conv2d(h, fc2.weight, fc2.bias))
    prefix = "linear1.0" if version == "pp" else "linear1"
    assert f"{prefix}.weight" in m.state_dict()
    with pytest.raises(ValueError, match="version"):
        ConvFFN(4, version="v2")


def test_lpu_layerscale_droppath():
    torch.set_default_dtype(torch.float64)
    lpu = LocalPerceptionUnit(3)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(lpu(x), x + F.conv2d(x, lpu.weight, lpu.bias, padding=1, groups=3))
    assert set(lpu.state_dict()) == {"weight", "bias"}

    ls = LayerScale(3, 0.5)
    with torch.no_grad():
        ls.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(ls(x), x * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1))

    dp = DropPath(0.5)
    dp.eval()
    assert torch.equal(dp(x), x)
    dp.train()
    torch.manual_seed(3)
    y = dp(torch.ones(64, 2, 2, 2))
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}  # dropped, or kept and scaled by 1 / (1 - p)
    assert (per_sample == per_sample[:, :1]).all()  # one draw per sample
    assert 0 < (per_sample[:, 0] == 0).sum() < 64
    assert torch.equal(drop_path(x, 0.9, training=False), x)
    with pytest.raises(ValueError, match="drop_prob"):
        DropPath(1.5)


# ---------------------------------------------------------------------------------------------------------------
# stems and down-sampling
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("H, W", [(32, 32), (33, 47), (31, 30)])
def test_stems_and_downsample_sizes(H, W):
    x = torch.randn(1, 3, H, W)
    for stem, expect in [
        (PatchifyStem(3, 8, 4), (H // 4, W // 4)),
        (ConvStem(3, 8, 4, "pp"), (math.ceil(math.ceil(H / 2) / 2), math.ceil(math.ceil(W / 2) / 2))),
        (ConvStem(3, 8, 4, "v1"), (math.ceil(H / 4), math.ceil(W / 4))),
    ]:
        y = stem(x)
        assert tuple(y.shape[-2:]) == expect
        assert (conv_output_size(H, stem), conv_output_size(W, stem)) == expect
    assert ConvStem(3, 8, 4, "pp").reduction == 4 and PatchifyStem(3, 8, 2).reduction == 2
    z = torch.randn(1, 8, H, W)
    assert tuple(Downsample(8, 16)(z).shape) == (1, 16, H // 2, W // 2)
    assert tuple(Downsample(8, 16, overlapping=True)(z).shape) == (1, 16, math.ceil(H / 2), math.ceil(W / 2))


def test_stem_state_dict_names_and_errors():
    assert set(ConvStem(3, 8, 4, "pp").state_dict()) == {
        "0.weight", "0.bias", "1.norm.weight", "1.norm.bias", "3.weight", "3.bias", "4.norm.weight", "4.norm.bias"
    }
    assert set(Downsample(4, 8).state_dict()) == {"0.weight", "1.norm.weight", "1.norm.bias"}
    with pytest.raises(ValueError, match="patch_size"):
        ConvStem(3, 8, 3, "pp")
    with pytest.raises(ValueError, match="version"):
        ConvStem(3, 8, 4, "v3")
