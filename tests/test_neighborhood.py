"""Neighborhood attention (stage letter N): a brute-force loop over queries, the official natten-0.14 fixtures
(through ``deformattn.compat.neighborhood_attention_from_official``), gradients and argument checks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import fixture_dir, fixture_files, load_fixture

from deformattn.compat import neighborhood_attention_from_official
from deformattn.layers import NeighborhoodAttention2d
from deformattn.layers.neighborhood_attention import (
    na2d_logits,
    neighborhood_attention2d,
    neighborhood_indices,
)

TOL = 1e-10  # max abs error, float64


def _window_start(i: int, length: int, k: int) -> int:
    """The k-window inside [0, length) whose centre is closest to i (NATTEN: centred, shifted inwards)."""
    return min(range(length - k + 1), key=lambda s: abs(s + k // 2 - i))


def na_bruteforce(m: NeighborhoodAttention2d, x: torch.Tensor) -> torch.Tensor:
    """One query at a time, on the zero-padded map, then cropped; bias rpb[h, r - i + k - 1, c - j + k - 1]."""
    B, C, H, W = x.shape
    k, nH, hd = m.kernel_size, m.num_heads, m.head_dim
    xp = F.pad(x, (0, max(0, k - W), 0, max(0, k - H))).permute(0, 2, 3, 1)  # B, Hp, Wp, C
    Hp, Wp = xp.shape[1:3]
    qkv = m.qkv(xp).reshape(B, Hp, Wp, 3, nH, hd)
    q, kk, v = qkv[..., 0, :, :] * m.scale, qkv[..., 1, :, :], qkv[..., 2, :, :]
    out = torch.zeros(B, H, W, nH, hd, dtype=x.dtype)
    for i in range(H):
        si = _window_start(i, Hp, k)
        for j in range(W):
            sj = _window_start(j, Wp, k)
            keys = [(r, c) for r in range(si, si + k) for c in range(sj, sj + k)]
            logits = torch.stack(
                [(q[:, i, j] * kk[:, r, c]).sum(-1) + m.rpb[:, r - i + k - 1, c - j + k - 1] for r, c in keys], -1
            )  # B, nH, k*k
            values = torch.stack([v[:, r, c] for r, c in keys], -2)  # B, nH, k*k, hd
            out[:, i, j] = (logits.softmax(-1).unsqueeze(-1) * values).sum(-2)
    return m.proj(out.reshape(B, H, W, C)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("H, W, k, heads", [(9, 11, 5, 2), (6, 6, 3, 1), (4, 9, 5, 4), (2, 3, 3, 2), (7, 7, 7, 1)])
def test_matches_bruteforce(H, W, k, heads):
    torch.set_default_dtype(torch.float64)
    m = NeighborhoodAttention2d(8, k, heads).eval()
    with torch.no_grad():
        m.rpb.normal_()
    x = torch.randn(2, 8, H, W)
    with torch.no_grad():
        torch.testing.assert_close(m(x), na_bruteforce(m, x), rtol=0, atol=TOL)


def test_window_start_rule():
    keys, rel = neighborhood_indices(6, 3)
    assert keys[:, 0].tolist() == [0, 0, 1, 2, 3, 3]  # centred, shifted inwards at the borders
    assert rel[0].tolist() == [2, 3, 4] and rel[5].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="kernel_size"):
        neighborhood_indices(2, 3)


NAT_FIXTURES = fixture_files(("nat_",))


def test_nat_fixtures_present():
    folder = fixture_dir()
    assert len(list(folder.glob("nat_*.pt"))) >= 8


@pytest.mark.parametrize("path", NAT_FIXTURES, ids=[p.stem for p in NAT_FIXTURES])
def test_official_fixture(path):
    fx = load_fixture(path)
    assert fx["kind"] == "nat"
    m = neighborhood_attention_from_official(fx["config"], fx["state_dict"])
    assert not m.training and m.rpb.dtype == torch.float64
    with torch.no_grad():
        y = m(fx["input"])
        assert (y - fx["output"]).abs().max().item() <= TOL
        if "attn_logits" in fx:
            x = m.pad(fx["input"].permute(0, 2, 3, 1))
            q, k, _ = m.qkv_heads(x)
            assert (na2d_logits(q, k, m.rpb, m.kernel_size) - fx["attn_logits"]).abs().max().item() <= TOL


def test_gradcheck_functional():
    torch.set_default_dtype(torch.float64)
    q, k, v = (torch.randn(1, 2, 4, 5, 3, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 5, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: neighborhood_attention2d(*a, kernel_size=3), (q, k, v, rpb))


def test_module_errors_and_gradients():
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        NeighborhoodAttention2d(8, 4, 2)
    with pytest.raises(ValueError, match="dilation"):
        NeighborhoodAttention2d(8, 3, 2, dilation=2)
    with pytest.raises(ValueError, match="divisible"):
        NeighborhoodAttention2d(10, 3, 4)
    m = NeighborhoodAttention2d(8, 5, 2)
    with pytest.raises(ValueError, match="x must have 8 channels"):
        m(torch.randn(1, 3, 6, 6))
    x = torch.randn(2, 8, 3, 7)  # smaller than the kernel along H
    m(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    with pytest.raises(ValueError, match="unknown config keys"):
        neighborhood_attention_from_official({"dim": 8, "kernel_size": 3, "num_heads": 2, "bias": True})
