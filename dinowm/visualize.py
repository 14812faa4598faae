"""Pictures for a person to look at: labelled PNG grids of frames, and line plots of metrics.

Grids: every row has a label on the left (ground truth / reconstruction / prediction / rollout /
baseline ...), every column a label on top (frame offset or horizon). Small frames are upsampled with
nearest-neighbour interpolation (no blur: every model pixel stays visible) to at least `min_tile` px,
so the 5 cm cubes of a 64 px frame are readable.

Plots are drawn with PIL alone (no plotting dependency): axes with ticks, axis labels, a legend.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

MIN_TILE = 128
"""Frames are upsampled (nearest) to at least this many pixels per side."""

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) in [-1, 1] -> (..., H, W, 3) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def _font(size: int = 14) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def save_grid(rows: list[torch.Tensor], path: str | Path, row_labels: list[str], col_labels: list[str] | None = None,
              title: str | None = None, pad: int = 4, min_tile: int = MIN_TILE) -> Path:
    """Save rows of frames as one labelled PNG.

    rows: list of (C_i, 3, H, W) tensors in [-1, 1] (same H, W); rows may be shorter than the longest
    (missing cells stay white). row_labels: one per row. col_labels: one per column (default 0, 1, ...).
    Frames are upsampled by the smallest integer factor that makes them >= min_tile px (nearest).
    """
    if len(row_labels) != len(rows):
        raise ValueError(f"save_grid: {len(rows)} rows but {len(row_labels)} row labels")
    arrays = [to_uint8(r) for r in rows]
    h, w = arrays[0].shape[1:3]
    scale = max(1, math.ceil(min_tile / min(h, w)))
    th, tw = h * scale, w * scale
    cols = max(a.shape[0] for a in arrays)
    col_labels = list(col_labels) if col_labels is not None else [str(j) for j in range(cols)]
    if len(col_labels) < cols:
        raise ValueError(f"save_grid: {cols} columns but {len(col_labels)} column labels")
    font = _font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(_text_size(probe, s, font)[0] for s in row_labels) + 2 * pad
    line_h = _text_size(probe, "Ag", font)[1] + 2 * pad
    top = line_h * (2 if title else 1)
    width = label_w + cols * (tw + pad) + pad
    height = top + len(arrays) * (th + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, pad), title, fill="black", font=font)
    for j in range(cols):
        text_w = _text_size(draw, col_labels[j], font)[0]
        draw.text((label_w + j * (tw + pad) + (tw - text_w) // 2, top - line_h + pad), col_labels[j],
                  fill="black", font=font)
    for i, row in enumerate(arrays):
        y = top + i * (th + pad)
        draw.text((pad, y + th // 2 - line_h // 2 + pad), row_labels[i], fill="black", font=font)
        for j, img in enumerate(row):
            tile = img.repeat(scale, axis=0).repeat(scale, axis=1)  # nearest-neighbour upsampling
            canvas.paste(Image.fromarray(tile), (label_w + j * (tw + pad), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        high = low + 1.0
    step = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(step))
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= step), default=step)
    start = math.floor(low / step) * step
    ticks, t = [], start
    while t <= high + step * 1e-6:
        ticks.append(round(t, 12))
        t += step
    return ticks


def save_line_plot(x: list[float], series: dict[str, list[float]], path: str | Path, xlabel: str, ylabel: str,
                   title: str = "", size: tuple[int, int] = (640, 420), log_y: bool = False) -> Path:
    """A line plot (one line + markers per series) with axis ticks, axis labels, a legend and a title."""
    font, small = _font(14), _font(12)
    width, height = size
    left, right, top, bottom = 78, 20, 34, 56
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    values = [v for vs in series.values() for v in vs if v is not None and math.isfinite(v)]
    if log_y:
        values = [v for v in values if v > 0]
    ymap = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    lo, hi = (min(map(ymap, values)), max(map(ymap, values))) if values else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    margin = 0.08 * (hi - lo)
    lo, hi = lo - margin, hi + margin
    if not log_y and min(values, default=0.0) >= 0:
        lo = max(lo, 0.0)
    x_lo, x_hi = min(x), max(x)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    pw, ph = width - left - right, height - top - bottom

    def px(xv, yv):
        return (left + (xv - x_lo) / (x_hi - x_lo) * pw, top + (1 - (ymap(yv) - lo) / (hi - lo)) * ph)

    draw.rectangle([left, top, left + pw, top + ph], outline="black")
    for t in _nice_ticks(lo, hi):
        if lo <= t <= hi:
            y = top + (1 - (t - lo) / (hi - lo)) * ph
            draw.line([left - 4, y, left, y], fill="black")
            draw.line([left + 1, y, left + pw - 1, y], fill=(230, 230, 230))
            text = f"{10 ** t:.3g}" if log_y else f"{t:.3g}"
            tw, th = _text_size(draw, text, small)
            draw.text((left - 8 - tw, y - th / 2 - 2), text, fill="black", font=small)
    for xv in x:
        xp = left + (xv - x_lo) / (x_hi - x_lo) * pw
        draw.line([xp, top + ph, xp, top + ph + 4], fill="black")
        text = f"{xv:g}"
        tw, _ = _text_size(draw, text, small)
        draw.text((xp - tw / 2, top + ph + 6), text, fill="black", font=small)
    tw, _ = _text_size(draw, xlabel, font)
    draw.text((left + (pw - tw) / 2, height - 24), xlabel, fill="black", font=font)
    label = Image.new("RGB", (_text_size(draw, ylabel, font)[0] + 4, 20), "white")
    ImageDraw.Draw(label).text((2, 0), ylabel, fill="black", font=font)
    label = label.rotate(90, expand=True)
    canvas.paste(label, (4, top + (ph - label.height) // 2))
    if title:
        tw, _ = _text_size(draw, title, font)
        draw.text(((width - tw) / 2, 8), title, fill="black", font=font)
    legend_y = top + 8
    for k, (name, ys) in enumerate(series.items()):
        color = COLORS[k % len(COLORS)]
        points = [px(xv, yv) for xv, yv in zip(x, ys) if yv is not None and math.isfinite(yv) and (yv > 0 or not log_y)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for xp, yp in points:
            draw.ellipse([xp - 3, yp - 3, xp + 3, yp + 3], fill=color)
        tw, th = _text_size(draw, name, small)
        lx = left + pw - tw - 40
        draw.line([lx, legend_y + 7, lx + 24, legend_y + 7], fill=color, width=2)
        draw.text((lx + 30, legend_y), name, fill="black", font=small)
        legend_y += th + 8
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
