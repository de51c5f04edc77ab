"""Record where every deformable layer of a model looks: reference points, sampling positions and, for chosen
queries, the attention weights, with forward hooks (the model's forward code is not touched and its outputs do not
change).

How: :func:`record_sampling` puts a forward hook on every :class:`~deformattn.DeformableAttention2d`. After the
layer has run, the hook takes the layer's input and recomputes, without gradients, what it needs with the layer's
own functions - ``sampling_positions(proj_q(x))`` for the positions (the same call every backend makes), and for the
chosen queries the reference algorithm (``sample_kv_input``, ``proj_k``, ``DeformableAttention2d.position_bias``,
``softmax(q k * scale + bias)``, as in :func:`deformattn.functional.attention_core`). Nothing random runs (the
weights are those before attention dropout), so the model's outputs and its RNG stream are unchanged.

Example:
    >>> model = create_model("dat_nano").eval()
    >>> with torch.no_grad(), record_sampling(model, queries=[(0.5, 0.5)]) as rec:
    ...     logits = model(x)
    >>> [(r.name, tuple(r.pos.shape)) for r in rec.records]
    [('stages.0.attns.1', (1, 1, 4, 4, 2)), ('stages.1.attns.1', (1, 1, 4, 4, 2)), ...]
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..attention import DeformableAttention2d
from .coords import relative_to_feature_index

__all__ = ["LayerSampling", "SamplingRecorder", "record_sampling", "deformable_layers"]

_OWNER = "record_sampling"


@dataclass
class LayerSampling:
    """What one call of one deformable layer did.

    Attributes:
        name: the layer's qualified name in the model (``"stages.2.attns.1"``; ``""`` for a bare module).
        input_size: ``(H, W)`` of the layer's input map (the map ``pos`` is normalised to).
        reference (Tensor[Hk, Wk, 2]): the uniform reference grid, normalised (y, x), ``align_corners=True``.
        pos (Tensor[B, G, Hk, Wk, 2]): the deformed sampling positions of every group, normalised (y, x) - what
            ``layer(x, return_sampling=True)`` returns.
        offset_groups, num_heads: ``G`` and ``nH`` (head ``h`` belongs to group ``h // (nH // G)``).
        queries: feature pixel ``(row, col)`` of every requested query on this layer's map.
        attn (Tensor[B, nH, len(queries), Ns] or None): softmax attention weights of those queries over the
            ``Ns = Hk * Wk`` sampled keys (before attention dropout); key ``n`` of head ``h`` sits at
            ``pos[:, h // (nH // G)].flatten(1, 2)[:, n]``.
    """

    name: str
    input_size: tuple[int, int]
    reference: Tensor
    pos: Tensor
    offset_groups: int
    num_heads: int
    queries: list[tuple[int, int]] = field(default_factory=list)
    attn: Tensor | None = None

    @property
    def key_grid_size(self) -> tuple[int, int]:
        return int(self.pos.shape[2]), int(self.pos.shape[3])

    def group_attn(self) -> Tensor | None:
        """Attention weights averaged over the heads of each group: ``Tensor[B, G, len(queries), Ns]`` (each row
        sums to 1 over that group's keys), or None when no query was recorded."""
        if self.attn is None:
            return None
        B, nH, Nq, Ns = self.attn.shape
        G = self.offset_groups
        return self.attn.reshape(B, G, nH // G, Nq, Ns).mean(2)


def deformable_layers(model: nn.Module) -> list[tuple[str, DeformableAttention2d]]:
    """``(qualified name, module)`` of every :class:`~deformattn.DeformableAttention2d` in ``model``, in
    registration order (the model itself counts, with the name ``""``)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DeformableAttention2d)]


def _check_queries(queries: Sequence[Sequence[float]] | None) -> list[tuple[float, float]]:
    if queries is None:
        return []
    if isinstance(queries, (str, bytes)) or not isinstance(queries, Sequence):
        raise TypeError(f"{_OWNER}: queries must be a sequence of relative (y, x) pairs, got {queries!r}")
    out = []
    for q in queries:
        if not isinstance(q, Sequence) or len(q) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in q
        ):
            raise TypeError(f"{_OWNER}: every query must be a relative (y, x) pair of numbers, got {q!r}")
        y, x = float(q[0]), float(q[1])
        if not (0.0 <= y <= 1.0 and 0.0 <= x <= 1.0):
            raise ValueError(
                f"{_OWNER}: queries are relative (y, x) in [0, 1] x [0, 1] (0 = top/left edge, 1 = bottom/right "
                f"edge), got {(y, x)}; use deformattn.viz.image_to_relative for image pixels"
            )
        out.append((y, x))
    return out


@torch.no_grad()
def _query_attention(m: DeformableAttention2d, x: Tensor, q: Tensor, pos: Tensor, index: list[int]) -> Tensor:
    """Attention weights of the query pixels ``index`` (flat ``i * W + j``): Tensor[B, nH, len(index), Ns].

    The reference algorithm (``backends.reference.forward`` up to the softmax): keys from the sampled input,
    logits ``q . k * scale + bias``."""
    B, C, H, W = x.shape
    nH, hc = m.num_heads, m.head_dim
    x_sampled = m.sample_kv_input(x, pos)  # B, C, Ns
    Ns = x_sampled.shape[-1]
    k = m.proj_k(x_sampled.reshape(B, C, 1, Ns)).reshape(B, nH, hc, Ns)
    idx = torch.tensor(index, dtype=torch.long, device=x.device)
    q_sel = q.reshape(B, nH, hc, H * W).index_select(-1, idx)  # B, nH, hc, n
    logits = torch.einsum("bhcm,bhcn->bhmn", q_sel, k).mul(m.scale)  # B, nH, n, Ns
    bias = m.position_bias(H, W, pos)  # B or 1, nH, H*W, Ns
    if bias is not None:
        logits = logits + bias.index_select(2, idx)
    return logits.softmax(dim=-1)


class SamplingRecorder:
    """Context manager that records every call of the deformable layers of ``model``; see :func:`record_sampling`.

    Attributes:
        records: one :class:`LayerSampling` per layer call, in call order (a model called twice inside the
            ``with`` block records every layer twice).
    """

    def __init__(
        self,
        model: nn.Module,
        queries: Sequence[Sequence[float]] | None = None,
        *,
        layers: str | Sequence[str] | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{_OWNER}: model must be a torch.nn.Module, got {type(model).__name__}")
        self.queries = _check_queries(queries)
        found = deformable_layers(model)
        if not found:
            raise ValueError(f"{_OWNER}: {type(model).__name__} contains no DeformableAttention2d layer to record")
        if layers is not None:
            patterns = [layers] if isinstance(layers, str) else list(layers)
            found = [(n, m) for n, m in found if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
            if not found:
                raise ValueError(
                    f"{_OWNER}: no deformable layer matches layers={layers!r}; the model's deformable layers are "
                    f"{[n for n, _ in deformable_layers(model)]}"
                )
        self.model = model
        self.layer_names = [n for n, _ in found]
        self.records: list[LayerSampling] = []
        self._modules = found
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "SamplingRecorder":
        if self._handles:
            raise RuntimeError(f"{_OWNER}: this recorder is already active")
        for name, module in self._modules:
            self._handles.append(module.register_forward_hook(self._make_hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove the hooks (done on leaving the ``with`` block)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_hook(self, name: str):
        def hook(module: DeformableAttention2d, args, kwargs, output) -> None:
            x = args[0] if args else kwargs["x"]
            self.records.append(self._record(name, module, x))
            return None  # the output is left as it is

        return hook

    @torch.no_grad()
    def _record(self, name: str, m: DeformableAttention2d, x: Tensor) -> LayerSampling:
        x = x.detach()
        B, C, H, W = x.shape
        q = m.proj_q(x)  # B, C, H, W
        pos, reference = m.sampling_positions(q)  # BG, Hk, Wk, 2 ; Hk, Wk, 2
        Hk, Wk = reference.shape[:2]
        G = m.offset_groups
        rec = LayerSampling(
            name=name,
            input_size=(H, W),
            reference=reference,
            pos=pos.reshape(B, G, Hk, Wk, 2),
            offset_groups=G,
            num_heads=m.num_heads,
        )
        if self.queries:
            rec.queries = [relative_to_feature_index(p, (H, W)) for p in self.queries]
            rec.attn = _query_attention(m, x, q, pos, [i * W + j for i, j in rec.queries])
        return rec

    # -- access ------------------------------------------------------------------------------------------------
    def by_name(self) -> dict[str, list[LayerSampling]]:
        """The records grouped by layer name (every call of a layer, in order)."""
        out: dict[str, list[LayerSampling]] = {}
        for r in self.records:
            out.setdefault(r.name, []).append(r)
        return out

    def last(self) -> list[LayerSampling]:
        """The latest record of every layer that ran, in the model's layer order."""
        latest = {r.name: r for r in self.records}
        return [latest[n] for n in self.layer_names if n in latest]


def record_sampling(
    model: nn.Module,
    queries: Sequence[Sequence[float]] | None = None,
    *,
    layers: str | Sequence[str] | None = None,
) -> SamplingRecorder:
    """Record the sampling of every deformable layer of ``model`` while the ``with`` block runs.

    Args:
        model: any module containing :class:`~deformattn.DeformableAttention2d` layers (or one such layer).
        queries: relative ``(y, x)`` points in ``[0, 1] x [0, 1]`` (0 = top/left edge, 1 = bottom/right edge of
            the map) whose attention weights are recorded; on each layer the query is the feature pixel containing
            the point, so one point is followed through every stage (:func:`~deformattn.viz.image_to_relative`
            converts image pixels). None: positions only.
        layers: only the layers whose qualified names match these ``fnmatch`` patterns (``"stages.3.*"``).

    Returns:
        A :class:`SamplingRecorder`; its ``records`` fill up as the model runs. Hooks are removed on exit.

    The model's outputs are bitwise the same with and without recording. With gradient checkpointing, a layer
    recomputed in the backward pass is recorded again; record under ``torch.no_grad()`` to avoid that.
    """
    return SamplingRecorder(model, queries, layers=layers)
