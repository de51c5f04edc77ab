"""Neighborhood attention (stage letter N): a brute-force loop over queries, the official natten-0.14 fixtures
(through ``deformattn.compat.neighborhood_attention_from_official``), both backends, the fast (tiled) backend
against the reference (gathered) one, gradients and argument checks."""
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
    neighborhood_attention_tiled,
    neighborhood_indices,
    neighborhood_tiles,
)

BACKENDS = ["reference", "fast"]

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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "H, W, k, heads", [(9, 11, 5, 2), (6, 6, 3, 1), (4, 9, 5, 4), (2, 3, 3, 2), (7, 7, 7, 1), (23, 17, 3, 2)]
)
def test_matches_bruteforce(H, W, k, heads, backend):
    torch.set_default_dtype(torch.float64)
    m = NeighborhoodAttention2d(8, k, heads, backend=backend).eval()
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", NAT_FIXTURES, ids=[p.stem for p in NAT_FIXTURES])
def test_official_fixture(path, backend):
    fx = load_fixture(path)
    assert fx["kind"] == "nat"
    m = neighborhood_attention_from_official(fx["config"], fx["state_dict"])
    assert not m.training and m.rpb.dtype == torch.float64
    m.backend = backend
    with torch.no_grad():
        y = m(fx["input"])
        assert (y - fx["output"]).abs().max().item() <= TOL
        if "attn_logits" in fx:
            x = m.pad(fx["input"].permute(0, 2, 3, 1))
            q, k, _ = m.qkv_heads(x)
            assert (na2d_logits(q, k, m.rpb, m.kernel_size) - fx["attn_logits"]).abs().max().item() <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_functional(backend):
    torch.set_default_dtype(torch.float64)
    q, k, v = (torch.randn(1, 2, 4, 5, 3, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 5, requires_grad=True)
    fn = lambda *a: neighborhood_attention2d(*a, kernel_size=3, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, rpb))


def test_gradcheck_tiled_overlapping_tiles():
    """Tiles of 3 on axes of 7 and 8: the last tile overlaps its neighbour (duplicate queries are dropped)."""
    torch.set_default_dtype(torch.float64)
    q, k, v = (torch.randn(1, 2, 7, 8, 2, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 5, requires_grad=True)
    fn = lambda *a: neighborhood_attention_tiled(*a, kernel_size=3, tile=3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, rpb))


@pytest.mark.parametrize("L, k, tile", [(6, 3, None), (7, 3, 3), (56, 7, None), (28, 7, 8), (14, 7, None),
                                        (9, 5, 4), (5, 5, None), (30, 3, 7)])
def test_tiles_hold_every_neighbourhood(L, k, tile):
    """Every query is in exactly one output slot, and its k keys are the allowed ones of its tile's region."""
    query, key, valid, rel, out = neighborhood_tiles(L, k, tile)
    keys, rel_ref = neighborhood_indices(L, k)
    assert query.flatten()[out].tolist() == list(range(L))
    nt, T = query.shape
    for slot in out.tolist():
        t, a = divmod(slot, T)
        i = query[t, a].item()
        allowed = key[t][valid[t, a]]
        assert allowed.tolist() == keys[i].tolist()
        assert rel[t, a][valid[t, a]].tolist() == rel_ref[i].tolist()


# fast vs reference: max abs error per dtype (outputs are O(1), gradients O(1-10))
EQUIV_TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("B, H, W, k, heads", [(2, 9, 13, 3, 2), (1, 15, 31, 7, 3), (3, 20, 7, 5, 1),
                                               (2, 7, 7, 7, 2), (1, 1, 1, 3, 1), (0, 9, 9, 3, 2)])
def test_fast_matches_reference(B, H, W, k, heads, dtype):
    """Module forward and every gradient (input and parameters), random weights and bias."""
    torch.manual_seed(0)
    m = NeighborhoodAttention2d(6 * heads, k, heads).to(dtype)
    with torch.no_grad():
        m.rpb.normal_()
    x = torch.randn(B, 6 * heads, H, W, dtype=dtype)
    g = torch.randn(B, 6 * heads, H, W, dtype=dtype)
    results = {}
    for backend in BACKENDS:
        m.backend = backend
        m.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        (y * g).sum().backward()
        results[backend] = [y, xi.grad] + [p.grad for p in m.parameters()]
    tol = EQUIV_TOL[dtype]
    for ref, fast in zip(results["reference"], results["fast"]):
        assert fast is not None and ref is not None
        assert (fast - ref).abs().max().item() <= tol if fast.numel() else fast.shape == ref.shape


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_fast_without_autograd_then_with(mode):
    """The fast path's no-autograd branch (softmax in place) equals the reference, and a training step at the same
    size afterwards (tiling indices cached by the first call) backpropagates into the input and the bias."""
    torch.manual_seed(0)
    m = NeighborhoodAttention2d(12, 5, 3)
    with torch.no_grad():
        m.rpb.normal_()
    x = torch.randn(2, 12, 19, 23)  # a size no other test uses: the first call builds the cached tiling
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        m.backend = "reference"
        ref = m(x)
        m.backend = "fast"
        fast = m(x)
    assert (fast - ref).abs().max().item() <= 2e-5
    xi = x.clone().requires_grad_(True)
    m(xi).square().sum().backward()
    assert xi.grad is not None and m.rpb.grad is not None and m.rpb.grad.abs().sum() > 0


def test_fast_under_autocast_bf16():
    torch.manual_seed(0)
    m = NeighborhoodAttention2d(16, 7, 2)
    x = torch.randn(2, 16, 15, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m.backend = "fast"
        fast = m(x).float()
        m.backend = "reference"
        ref = m(x).float()
    assert torch.isfinite(fast).all()
    assert (fast - ref).abs().max().item() < 5e-2


def test_backend_choice(monkeypatch):
    with pytest.raises(ValueError, match="backend must be None or one of"):
        NeighborhoodAttention2d(8, 3, 2, backend="natten")
    q = k = v = torch.randn(1, 1, 5, 5, 4)
    with pytest.raises(ValueError, match="neighborhood_attention2d: backend"):
        neighborhood_attention2d(q, k, v, None, 3, backend="cuda")
    monkeypatch.setenv("DEFORMATTN_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"\$DEFORMATTN_BACKEND must be one of"):
        neighborhood_attention2d(q, k, v, None, 3)
    monkeypatch.setenv("DEFORMATTN_BACKEND", "reference")
    torch.testing.assert_close(neighborhood_attention2d(q, k, v, None, 3),
                               neighborhood_attention2d(q, k, v, None, 3, backend="fast"))


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
