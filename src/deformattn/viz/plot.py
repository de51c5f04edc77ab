"""Draw where deformable attention looks, over the input image (matplotlib, Agg backend, imported lazily).

Per deformable layer two panels, both in image pixels (:mod:`deformattn.viz.coords`):

* **offsets**: the reference grid (white dots), an arrow from each reference point to where the offsets moved it,
  and the deformed sampling points, colored by offset group;
* **attention**: for one query (the star), that layer's sampled keys sized and colored by the query's attention
  weight (averaged over the heads of the key's group; edge color = group).

Every scatter carries a ``gid`` (``"reference"``, ``"deformed/g"``, ``"query"``, ``"keys/g"``) and
:func:`draw_sampling` returns the plotted coordinates, so tests can check that the points drawn are the points the
module sampled.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from .._utils import atomic_write, optional_import
from .coords import feature_to_image, normalized_to_image
from .record import LayerSampling

__all__ = ["layer_stride", "sampling_points", "draw_sampling", "set_title", "save_figure", "GROUP_COLORS"]

GROUP_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                "#bcbd22", "#7f7f7f")


def _pyplot():
    matplotlib = optional_import("matplotlib", "viz", "deformattn viz")
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def layer_stride(model: nn.Module | None, name: str, input_size: Sequence[int], image_size: Sequence[int]
                 ) -> tuple[float, float]:
    """Total stride ``(sy, sx)`` from the image to a layer's input map.

    A layer of stage ``i`` of a model with ``feature_info`` (``stages.{i}.…``) uses that stage's ``reduction``;
    otherwise the ratio of the image size to the layer's map size.
    """
    match = re.match(r"(?:.*\.)?stages\.(\d+)\.", name)
    info = getattr(model, "feature_info", None) if model is not None else None
    if match and info and int(match.group(1)) < len(info):
        r = float(info[int(match.group(1))]["reduction"])
        return r, r
    return image_size[0] / input_size[0], image_size[1] / input_size[1]


def sampling_points(record: LayerSampling, stride: float | Sequence[float], *, batch_index: int = 0
                    ) -> dict[str, Any]:
    """One layer's record in image pixels, in plotting order **(x, y)** (numpy arrays).

    Returns:
        ``reference_xy [Hk*Wk, 2]``, ``deformed_xy [G, Hk*Wk, 2]``, ``query_xy [n_queries, 2]`` and ``weights
        [G, n_queries, Hk*Wk]`` (None without queries). Non-finite reference points (a DAT++ key grid of length
        1 puts the reference at ``+inf``) stay in the arrays; drawing skips them.
    """
    ref = normalized_to_image(record.reference.double(), record.input_size, stride)  # Hk, Wk, 2 (y, x)
    pos = normalized_to_image(record.pos[batch_index].double(), record.input_size, stride)  # G, Hk, Wk, 2
    G = pos.shape[0]
    out: dict[str, Any] = {
        "reference_xy": ref.reshape(-1, 2).flip(-1).numpy(),
        "deformed_xy": pos.reshape(G, -1, 2).flip(-1).numpy(),
        "query_xy": np.zeros((0, 2)),
        "weights": None,
    }
    if record.queries:
        q = feature_to_image(torch.tensor(record.queries, dtype=torch.float64), stride)  # n, 2 (y, x)
        out["query_xy"] = q.flip(-1).numpy()
        ga = record.group_attn()
        out["weights"] = ga[batch_index].double().numpy() if ga is not None else None
    return out


def _limits(image_hw: Sequence[int], *point_sets: np.ndarray, margin: float = 0.04) -> tuple[tuple, tuple]:
    H, W = image_hw
    lo_x, hi_x, lo_y, hi_y = -0.5, W - 0.5, -0.5, H - 0.5
    for pts in point_sets:
        pts = pts.reshape(-1, 2)
        pts = pts[np.isfinite(pts).all(1)]
        if len(pts):
            lo_x, hi_x = min(lo_x, pts[:, 0].min()), max(hi_x, pts[:, 0].max())
            lo_y, hi_y = min(lo_y, pts[:, 1].min()), max(hi_y, pts[:, 1].max())
    mx, my = margin * (hi_x - lo_x), margin * (hi_y - lo_y)
    return (lo_x - mx, hi_x + mx), (hi_y + my, lo_y - my)  # y axis downwards, as images


def draw_sampling(
    records: Sequence[LayerSampling],
    image: np.ndarray,
    strides: Sequence[float | Sequence[float]],
    *,
    query_index: int = 0,
    batch_index: int = 0,
    title: str | None = None,
    layers_per_row: int = 2,
    panel_inches: float = 3.2,
):
    """Draw the records over ``image`` (``[H, W, 3]`` or ``[H, W]`` in ``[0, 1]``; the model's input size).

    Args:
        records: one :class:`~deformattn.viz.LayerSampling` per layer to draw.
        strides: the total stride of each record's map (:func:`layer_stride`).
        query_index: which recorded query the attention panels show.

    Returns:
        ``(figure, drawn)``: ``drawn[i]`` is :func:`sampling_points` of ``records[i]`` plus the ``"layer"`` name.
        The figure is ``layers_per_row * 2 * panel_inches`` wide (``panel_inches`` per row high, plus a title
        band); save it with :func:`save_figure`.
    """
    plt = _pyplot()
    if len(records) != len(strides):
        raise ValueError(f"draw_sampling: got {len(records)} records but {len(strides)} strides")
    if not records:
        raise ValueError("draw_sampling: nothing to draw (no deformable layer ran)")
    image = np.asarray(image)
    H, W = image.shape[:2]
    n = len(records)
    per_row = max(1, min(layers_per_row, n))
    rows = math.ceil(n / per_row)
    title_in = _TITLE_INCHES
    fig = plt.figure(figsize=(per_row * 2 * panel_inches, rows * panel_inches + title_in))
    axes = fig.subplots(rows, 2 * per_row, squeeze=False)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - title_in / (rows * panel_inches + title_in),
                        wspace=0.08, hspace=0.22)
    cmap = plt.get_cmap("viridis")
    drawn = []
    legend_done = False
    for i, (rec, stride) in enumerate(zip(records, strides)):
        pts = sampling_points(rec, stride, batch_index=batch_index)
        pts["layer"] = rec.name
        drawn.append(pts)
        ax_off, ax_att = axes[i // per_row, 2 * (i % per_row)], axes[i // per_row, 2 * (i % per_row) + 1]
        ref, dfm = pts["reference_xy"], pts["deformed_xy"]
        G = dfm.shape[0]
        Hk, Wk = rec.key_grid_size
        label = rec.name or "layer"
        fmap = f"{rec.input_size[0]}x{rec.input_size[1]}"

        # offsets panel: reference -> deformed, colored by group
        ax_off.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        finite = np.isfinite(ref).all(1)
        ax_off.scatter(ref[finite, 0], ref[finite, 1], s=6, c="white", edgecolors="black", linewidths=0.3,
                       zorder=3, gid="reference")
        for g in range(G):
            color = GROUP_COLORS[g % len(GROUP_COLORS)]
            d = dfm[g] - ref
            ok = finite & np.isfinite(d).all(1)
            ax_off.quiver(ref[ok, 0], ref[ok, 1], d[ok, 0], d[ok, 1], angles="xy", scale_units="xy", scale=1.0,
                          color=color, width=0.006, headwidth=3.5, headlength=4, alpha=0.9, zorder=4,
                          gid=f"arrows/{g}")
            ax_off.scatter(dfm[g, :, 0], dfm[g, :, 1], s=10, color=color, edgecolors="black", linewidths=0.3,
                           zorder=5, gid=f"deformed/{g}", label=f"group {g}")
        xlim, ylim = _limits((H, W), ref, dfm)
        ax_off.set_xlim(*xlim)
        ax_off.set_ylim(*ylim)
        ax_off.set_title(f"{label} ({fmap}, {Hk}x{Wk} keys, G={G})", fontsize=8)

        # attention panel: one query's weights over the sampled keys
        ax_att.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, alpha=0.6, interpolation="nearest")
        weights = pts["weights"]
        if weights is not None and len(pts["query_xy"]):
            qi = query_index % len(pts["query_xy"])
            w = weights[:, qi]  # G, Ns
            wmax = float(w.max()) if w.size else 1.0
            for g in range(G):
                ax_att.scatter(dfm[g, :, 0], dfm[g, :, 1], s=8 + 160 * w[g] / max(wmax, 1e-12), c=w[g], cmap=cmap,
                               vmin=0.0, vmax=wmax, edgecolors=GROUP_COLORS[g % len(GROUP_COLORS)], linewidths=0.8,
                               alpha=0.9, zorder=4, gid=f"keys/{g}")
            qxy = pts["query_xy"][qi]
            ax_att.scatter([qxy[0]], [qxy[1]], marker="*", s=160, c="red", edgecolors="white", linewidths=0.8,
                           zorder=6, gid="query")
            ax_att.set_title(f"attention of query at ({qxy[1]:.1f}, {qxy[0]:.1f}) px, max {wmax:.2f}", fontsize=8)
        else:
            ax_att.set_title("attention: no query recorded", fontsize=8)
        ax_att.set_xlim(*xlim)
        ax_att.set_ylim(*ylim)
        if G > 1 and not legend_done:
            ax_off.legend(fontsize=6, loc="lower right", markerscale=1.5, ncols=2)
            legend_done = True
    for j in range(n, rows * per_row):
        axes[j // per_row, 2 * (j % per_row)].set_visible(False)
        axes[j // per_row, 2 * (j % per_row) + 1].set_visible(False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        set_title(fig, title)
    return fig, drawn


_TITLE_INCHES = 0.8


def set_title(fig, title: str) -> None:
    """Put ``title`` (up to two lines) in the band :func:`draw_sampling` leaves above the panels."""
    height = fig.get_figheight()
    fig.suptitle(title, fontsize=10, y=1 - 0.08 / height, va="top")


def save_figure(fig, path: str | Path, *, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG of exactly ``figsize * dpi`` pixels and close it."""
    plt = _pyplot()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    plt.close(fig)
    return path
