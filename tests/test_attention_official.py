"""Every official deformable-attention fixture reproduced in float64, through the compat bridge, on both backends."""
from __future__ import annotations

import pytest
import torch

from conftest import fixture_dir, fixture_files, load_fixture
from deformattn.compat import attention_from_official, native_kwargs_from_official

DATTN = fixture_files(("pp_", "v1_"))


def test_fixture_folder_present():
    path = fixture_dir()  # fails under CI=true when missing
    assert any(p.name.startswith(("pp_", "v1_")) for p in path.glob("*.pt"))


@pytest.mark.parametrize("backend", ["fast", "reference"])
@pytest.mark.parametrize("path", DATTN, ids=lambda p: p.stem)
def test_official_fixture(path, backend):
    d = load_fixture(path)
    assert d["kind"] == "dattn"
    m = attention_from_official(d["config"], d["version"], d["state_dict"]).eval()
    assert m.backend is None  # the bridge runs the default (fast) path
    if backend == "reference":
        m.backend = "reference"
    with torch.no_grad():
        y, pos, ref = m(d["input"], return_sampling=True)
    assert y.dtype == torch.float64
    for name, ours, theirs in (("output", y, d["output"]), ("pos", pos, d["pos"]), ("reference", ref, d["reference"])):
        assert ours.shape == theirs.shape, name
        err = (ours - theirs).abs().max().item()
        assert err <= 1e-10, f"{path.stem}: {name} max abs error {err:.3e}"
    # without return_sampling only the output comes back
    with torch.no_grad():
        assert torch.equal(m(d["input"]), y)


@pytest.mark.parametrize("path", DATTN, ids=lambda p: p.stem)
def test_official_intermediates(path):
    """The steps agree too: projected queries, raw offsets and the sampled key features."""
    d = load_fixture(path)
    m = attention_from_official(d["config"], d["version"], d["state_dict"]).eval()
    x = d["input"]
    with torch.no_grad():
        q = m.proj_q(x)
        torch.testing.assert_close(q, d["q"], rtol=0, atol=1e-12)
        pos, _ = m.sampling_positions(q)
        x_sampled = m.sample_kv_input(x, pos)
    torch.testing.assert_close(x_sampled, d["x_sampled"].reshape(x_sampled.shape), rtol=0, atol=1e-12)
    if not m.no_off:
        B, C, H, W = x.shape
        G = m.offset_groups
        with torch.no_grad():
            raw = m.conv_offset(q.reshape(B * G, C // G, H, W))
        torch.testing.assert_close(raw, d["offset_raw"], rtol=0, atol=1e-12)


def test_state_dict_names_are_official():
    for path in DATTN:
        d = load_fixture(path)
        m = attention_from_official(d["config"], d["version"])
        assert set(m.state_dict()) == set(d["state_dict"]), path.stem


def test_native_kwargs_mapping():
    base = dict(q_size=[8, 8], kv_size=[8, 8], n_heads=4, n_head_channels=8, n_groups=2, stride=2, ksize=5,
                offset_range_factor=-1, attn_drop=0.0, proj_drop=0.0)
    cases = [
        (dict(use_pe=False, dwc_pe=False, fixed_pe=False, no_off=False, log_cpb=False), "pp", "none"),
        (dict(use_pe=True, dwc_pe=True, fixed_pe=False, no_off=False, log_cpb=False), "pp", "dwc"),
        (dict(use_pe=True, dwc_pe=False, fixed_pe=True, no_off=False, log_cpb=False), "pp", "fixed"),
        (dict(use_pe=True, dwc_pe=False, fixed_pe=False, no_off=False, log_cpb=True), "pp", "log_cpb"),
        (dict(use_pe=True, dwc_pe=False, fixed_pe=False, no_off=False, log_cpb=False), "pp", "table"),
        (dict(use_pe=True, dwc_pe=True, fixed_pe=False, no_off=True, log_cpb=False), "pp", "none"),
        (dict(use_pe=True, dwc_pe=True, fixed_pe=False, no_off=True, stage_idx=1), "v1", "dwc"),
    ]
    for flags, version, kind in cases:
        kw = native_kwargs_from_official({**base, **flags}, version)
        assert kw["pos_bias"] == kind, (flags, version)
    assert native_kwargs_from_official({**base, "stage_idx": 1}, "v1")["offset_kernel_size"] == 7
    with pytest.raises(ValueError, match="version"):
        native_kwargs_from_official(base, "v2")
    with pytest.raises(ValueError, match="n_heads"):
        native_kwargs_from_official({"q_size": 8}, "pp")
