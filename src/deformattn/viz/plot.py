"""Draw where deformable attention looks, over the input image (matplotlib, Agg backend, imported lazily).

Per deformable layer two panels, both in image pixels (:mod:`deformattn.viz.coords`):

* **offsets**: the reference grid (white dots), an arrow from each reference point to where the offsets moved it,
  and the deformed sampling points, coloured by offset group (legend);
* **attention**: for one query (the star, at the centre of the feature-map cell containing the requested point),
  that layer's sampled keys sized and coloured by the query's attention weight (averaged over the heads of the
  key's group; colour bar; edge colour = group).

Axes are in image pixels with the image's frame dashed; panel titles name the layer as ``stage i / block j``.

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

__all__ = ["layer_stride", "sampling_points", "draw_sampling", "panel_name", "set_title", "save_figure",
           "GROUP_COLORS"]

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


def panel_name(name: str) -> str:
    """A readable layer name: ``stages.0.attns.1`` -> ``stage 1 / block 2`` (other names unchanged)."""
    m = re.search(r"stages\.(\d+)\.attns\.(\d+)$", name or "")
    return f"stage {int(m.group(1)) + 1} / block {int(m.group(2)) + 1}" if m else (name or "layer")


def _style_axes(ax, H: int, W: int, *, xlabel: bool, ylabel: bool) -> None:
    """Pixel ticks (a few integers inside the image) and the dashed image frame."""
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import MaxNLocator

    for axis, n in ((ax.xaxis, W), (ax.yaxis, H)):
        axis.set_major_locator(MaxNLocator(nbins=4, integer=True, min_n_ticks=2))
    ax.set_xticks([t for t in ax.get_xticks() if 0 <= t <= W - 1])
    ax.set_yticks([t for t in ax.get_yticks() if 0 <= t <= H - 1])
    ax.tick_params(labelsize=6, length=2, pad=1)
    if xlabel:
        ax.set_xlabel("x (px)", fontsize=6, labelpad=1)
    if ylabel:
        ax.set_ylabel("y (px)", fontsize=6, labelpad=1)
    ax.add_patch(Rectangle((-0.5, -0.5), W, H, fill=False, ls="--", lw=0.7, ec="0.35", zorder=2, gid="image-frame"))


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
    requested_query: Sequence[float] | None = None,
):
    """Draw the records over ``image`` (``[H, W, 3]`` or ``[H, W]`` in ``[0, 1]``; the model's input size).

    Per layer two panels with pixel axes and the image's frame (dashed): the offsets (reference grid -> deformed
    points, one colour per offset group, legend when there are several groups) and the attention of one query
    (keys coloured and sized by weight, colour bar; edge colour = group). The query is drawn where the layer
    computes it: at the centre (star) of the feature-map cell containing the requested point (``+``), so it moves
    between stages of different strides. A note under the panels says so, and explains points outside the frame.

    Args:
        records: one :class:`~deformattn.viz.LayerSampling` per layer to draw.
        strides: the total stride of each record's map (:func:`layer_stride`).
        query_index: which recorded query the attention panels show.
        requested_query: ``(y, x)`` in image pixels of the point asked for (drawn as ``+``), if known.

    Returns:
        ``(figure, drawn)``: ``drawn[i]`` is :func:`sampling_points` of ``records[i]`` plus the ``"layer"`` name.
        The figure is ``layers_per_row * 2 * panel_inches`` wide and ``0.85 * panel_inches`` per row high, plus a
        title band and a note band; save it with :func:`save_figure`.
    """
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    if len(records) != len(strides):
        raise ValueError(f"draw_sampling: got {len(records)} records but {len(strides)} strides")
    if not records:
        raise ValueError("draw_sampling: nothing to draw (no deformable layer ran)")
    image = np.asarray(image)
    H, W = image.shape[:2]
    n = len(records)
    per_row = max(1, min(layers_per_row, n))
    rows = math.ceil(n / per_row)
    height = rows * _ROW_FACTOR * panel_inches + _TITLE_INCHES + _NOTE_INCHES
    fig = plt.figure(figsize=(per_row * 2 * panel_inches, height))
    axes = fig.subplots(rows, 2 * per_row, squeeze=False)
    fig.subplots_adjust(left=0.04, right=0.95, bottom=(_NOTE_INCHES + 0.25) / height, top=1 - (_TITLE_INCHES + 0.1)
                        / height, wspace=0.32, hspace=0.38)
    cmap = plt.get_cmap("viridis")
    drawn = []
    outside = False
    for i, (rec, stride) in enumerate(zip(records, strides)):
        pts = sampling_points(rec, stride, batch_index=batch_index)
        pts["layer"] = rec.name
        drawn.append(pts)
        row, col = i // per_row, 2 * (i % per_row)
        ax_off, ax_att = axes[row, col], axes[row, col + 1]
        ref, dfm = pts["reference_xy"], pts["deformed_xy"]
        G = dfm.shape[0]
        Hk, Wk = rec.key_grid_size
        name = panel_name(rec.name)
        finite = np.isfinite(ref).all(1)
        inside = ((ref[finite, 0] >= -0.5) & (ref[finite, 0] <= W - 0.5) & (ref[finite, 1] >= -0.5)
                  & (ref[finite, 1] <= H - 0.5))
        outside |= not bool(inside.all())
        groups = f"{G} offset group" + ("s" if G > 1 else "")

        # offsets panel: reference -> deformed, coloured by group
        ax_off.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax_off.scatter(ref[finite, 0], ref[finite, 1], s=7, c="white", edgecolors="black", linewidths=0.4,
                       zorder=3, gid="reference")
        for g in range(G):
            color = GROUP_COLORS[g % len(GROUP_COLORS)]
            d = dfm[g] - ref
            ok = finite & np.isfinite(d).all(1)
            ax_off.quiver(ref[ok, 0], ref[ok, 1], d[ok, 0], d[ok, 1], angles="xy", scale_units="xy", scale=1.0,
                          color=color, width=0.006, headwidth=3.5, headlength=4, alpha=0.9, zorder=4,
                          gid=f"arrows/{g}")
            ax_off.scatter(dfm[g, :, 0], dfm[g, :, 1], s=11, color=color, edgecolors="black", linewidths=0.3,
                           zorder=5, gid=f"deformed/{g}", label=f"group {g + 1}")
        xlim, ylim = _limits((H, W), ref, dfm)
        ax_off.set_xlim(*xlim)
        ax_off.set_ylim(*ylim)
        ax_off.set_title(f"{name}: where the keys are sampled\n{rec.input_size[0]}x{rec.input_size[1]} map, "
                         f"{Hk}x{Wk} keys, {groups}", fontsize=7)
        handles = [Line2D([], [], ls="", marker="o", ms=3.5, mfc="white", mec="black", mew=0.5,
                          label="reference point")]
        if G > 1:
            handles += [Line2D([], [], ls="", marker="o", ms=3.5, mfc=GROUP_COLORS[g % len(GROUP_COLORS)], mec="black",
                               mew=0.3, label=f"group {g + 1}") for g in range(G)]
        else:
            handles += [Line2D([], [], ls="", marker="o", ms=3.5, mfc=GROUP_COLORS[0], mec="black", mew=0.3,
                               label="sampled key")]
        ax_off.legend(handles=handles, fontsize=5, loc="best", framealpha=0.75, handletextpad=0.2,
                      borderpad=0.3, labelspacing=0.2, ncols=2 if G > 2 else 1)

        # attention panel: one query's weights over the sampled keys
        ax_att.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, alpha=0.5, interpolation="nearest")
        weights = pts["weights"]
        if weights is not None and len(pts["query_xy"]):
            qi = query_index % len(pts["query_xy"])
            w = weights[:, qi]  # G, Ns
            wmax = float(w.max()) if w.size else 1.0
            mappable = None
            for g in range(G):
                mappable = ax_att.scatter(dfm[g, :, 0], dfm[g, :, 1], s=8 + 140 * w[g] / max(wmax, 1e-12), c=w[g],
                                          cmap=cmap, vmin=0.0, vmax=wmax,
                                          edgecolors=GROUP_COLORS[g % len(GROUP_COLORS)] if G > 1 else "black",
                                          linewidths=0.9 if G > 1 else 0.3, alpha=0.95, zorder=4, gid=f"keys/{g}")
            qxy = pts["query_xy"][qi]
            sy, sx = (float(stride), float(stride)) if np.isscalar(stride) else (float(stride[0]), float(stride[1]))
            ax_att.add_patch(Rectangle((qxy[0] - sx / 2, qxy[1] - sy / 2), sx, sy, fill=False, ec="red", lw=0.8,
                                       zorder=5, gid="query-cell"))
            ax_att.scatter([qxy[0]], [qxy[1]], marker="*", s=110, c="red", edgecolors="white", linewidths=0.6,
                           zorder=6, gid="query")
            if requested_query is not None:
                ax_att.scatter([requested_query[1]], [requested_query[0]], marker="+", s=60, c="#00d5ff",
                               linewidths=1.4, zorder=7, gid="query-requested")
            cax = ax_att.inset_axes([1.03, 0.0, 0.05, 1.0])
            bar = fig.colorbar(mappable, cax=cax)
            bar.ax.tick_params(labelsize=5, length=2, pad=1)
            bar.set_label("attention weight", fontsize=6, labelpad=2)
            ax_att.set_title(f"{name}: attention of the query (star)\ncell centre ({qxy[1]:.1f}, {qxy[0]:.1f}) px, "
                             f"cell {sy:g}x{sx:g} px", fontsize=7)
            if G > 1:
                ax_att.legend(handles=[Line2D([], [], ls="", marker="o", ms=4, mfc="none",
                                              mec=GROUP_COLORS[g % len(GROUP_COLORS)], mew=1.0, label=f"group {g + 1}")
                                       for g in range(G)], fontsize=5, loc="best", framealpha=0.75,
                              handletextpad=0.2, borderpad=0.3, labelspacing=0.2, ncols=2 if G > 2 else 1)
        else:
            ax_att.set_title(f"{name}: attention\n(no query recorded)", fontsize=7)
        ax_att.set_xlim(*xlim)
        ax_att.set_ylim(*ylim)
        for ax in (ax_off, ax_att):
            _style_axes(ax, H, W, xlabel=row == rows - 1, ylabel=col == 0)
    for j in range(n, rows * per_row):
        axes[j // per_row, 2 * (j % per_row)].set_visible(False)
        axes[j // per_row, 2 * (j % per_row) + 1].set_visible(False)
    note = ("Dashed frame: the image. Star: the centre of the feature-map cell (red square) that contains the "
            "requested query (+); each stage's cells are larger, so the star moves between stages. Attention "
            "weights: averaged over the heads of each key's offset group.")
    if outside:
        note += ("\nPoints outside the frame: DAT++ places its reference grid at (i + 0.5) / (Hk - 1) * 2 - 1, as "
                 "the official code and its weights do, so the last row and column start outside the map; offsets "
                 "move them, and samples outside read zeros.")
    fig.text(0.5, 0.08 / height, note, ha="center", va="bottom", fontsize=6.5, color="0.2", wrap=True,
             gid="note")
    if title:
        set_title(fig, title)
    return fig, drawn


_TITLE_INCHES = 0.8
_NOTE_INCHES = 0.45
_ROW_FACTOR = 0.85  # rows lower than wide: the colour bar and the pixel ticks take width


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
