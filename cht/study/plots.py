"""Pictures of a run with Pillow only: training curves, density/ITOP over evolution, masks.

``run(run_dir)`` reads ``metrics.csv``, ``evolution.jsonl``, ``checkpoint.npz`` and any
``evotrace-e<E>.npz`` (``python -m cht.study evotrace``) and writes into ``run_dir/plots/``:
- ``curves.png``: train loss, train and test accuracy, learning rate per epoch;
- ``evolution.png``: density and ITOP rate of every sparse layer after each evolution step;
- ``topology.png``: the topology measures of every sparse layer after each evolution step
  (``channel_cv``, ``empty_kernels``, ``unused_inputs``; docs/algorithm.md section 7);
- ``mask-<key>.png`` per sparse layer: the final mask (checkpoint), filters as rows, one
  ``kh x kw`` tile per input channel; active / once active (ITOP) / never active;
- ``mask-<key>-e<E>.png`` per layer of an evotrace file: that step's kept, removed,
  regrown, removed-and-regrown entries, with their counts in the legend.
"""
import csv
import glob
import math
import os
import re

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cht.rundir import CorruptFile, RunDir
from cht.study.common import StudyError

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0), (255, 187, 120),
           (152, 223, 138)]
STEP_COLOURS = {"kept": (40, 70, 160), "removed": (220, 40, 40), "regrown": (30, 170, 60),
                "removed and regrown": (245, 160, 0), "inactive": (235, 235, 235)}
FINAL_COLOURS = {"active": (40, 70, 160), "once active (ITOP)": (150, 190, 240), "never active": (235, 235, 235)}


def font(size=13):
    """Pillow's built-in font; scalable from Pillow 10.1 (older: the fixed bitmap font)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def nice_ticks(lo, hi, n=5, integer=False):
    """About ``n`` round tick values (1, 2, 5 x 10^k steps, at least 1 if ``integer``) covering ``[lo, hi]``."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        lo, hi = (lo - 1, lo + 1) if math.isfinite(lo) else (0, 1)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    step = max(step, 1) if integer else step
    return [k * step for k in range(math.floor(lo / step), math.ceil(hi / step) + 1)]


def _label(v):
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.1e}"


def line_panel(draw, box, series, title, xlabel, ylabel, fnt, legend_width=0, y_min=None, y_integer=False,
               xspan=()):
    """A line chart in ``box`` (x0, y0, x1, y1): axes, labelled ticks, grid, legend.

    ``series``: ``[(label, xs, ys, colour)]``, or ``(label, xs, ys, colour, errs)`` with error bars
    ``ys +- errs``. The legend sits inside the top right corner, or in a column of
    ``legend_width`` pixels right of the axes. ``y_min``: the y axis starts there (e.g. 0 for
    counts); ``y_integer``: whole-number y ticks; ``xspan``: x values the axis covers in any case.
    """
    x0, y0, x1, y1 = box
    L, R, T, B = x0 + 62, x1 - 12 - legend_width, y0 + 26, y1 - 44     # the plotting area
    errs = [s[4] if len(s) > 4 else [0.0] * len(s[2]) for s in series]
    xs = [x for s in series for x in s[1]] + list(xspan) if series else []
    ys = [y + sign * e for s, es in zip(series, errs) for y, e in zip(s[2], es) for sign in (-1, 1)
          if math.isfinite(y)]
    if not xs or not ys:
        draw.text((x0 + 10, y0 + 10), f"{title}: no data", fill="black", font=fnt)
        return
    xt = nice_ticks(min(xs), max(xs), 6, integer=all(float(x).is_integer() for x in xs))
    ylo = min(ys) if y_min is None else y_min
    yt = nice_ticks(ylo, max(max(ys), ylo + 1) if y_integer else max(ys), 5, integer=y_integer)
    xlo, xhi, ylo, yhi = xt[0], xt[-1], yt[0], yt[-1]
    X = lambda v: L + (v - xlo) / (xhi - xlo) * (R - L)
    Y = lambda v: B - (v - ylo) / (yhi - ylo) * (B - T)
    draw.text(((L + R) // 2, y0 + 6), title, fill="black", font=fnt, anchor="mt")
    for v in yt:                                                      # grid and y ticks
        draw.line([(L, Y(v)), (R, Y(v))], fill=(225, 225, 225))
        draw.line([(L - 4, Y(v)), (L, Y(v))], fill="black")
        draw.text((L - 6, Y(v)), _label(v), fill="black", font=fnt, anchor="rm")
    for v in xt:
        draw.line([(X(v), B), (X(v), B + 4)], fill="black")
        draw.text((X(v), B + 6), _label(v), fill="black", font=fnt, anchor="mt")
    draw.rectangle([L, T, R, B], outline="black")
    draw.text(((L + R) // 2, y1 - 4), xlabel, fill="black", font=fnt, anchor="md")
    draw.text((x0 + 2, (T + B) // 2), ylabel, fill="black", font=fnt, anchor="lm") if len(ylabel) < 3 else \
        draw.text((x0 + 4, T - 14), ylabel, fill="black", font=fnt, anchor="ls")
    for (label, sx, sy, col, *_), es in zip(series, errs):
        pts = [(X(a), Y(b)) for a, b in zip(sx, sy) if math.isfinite(b)]
        if len(pts) > 1:
            draw.line(pts, fill=col, width=2)
        for p in pts:
            draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=col)
        for a, b, e in zip(sx, sy, es):                               # error bars with caps
            if e > 0 and math.isfinite(b):
                draw.line([(X(a), Y(b - e)), (X(a), Y(b + e))], fill=col, width=2)
                for v in (b - e, b + e):
                    draw.line([(X(a) - 5, Y(v)), (X(a) + 5, Y(v))], fill=col, width=2)
    ly = T + 6
    for label, _, _, col, *_ in series:
        w = draw.textlength(label, font=fnt)
        lx = R + 10 if legend_width else R - w - 30                  # outside / top right inside
        draw.rectangle([lx, ly + 2, lx + 12, ly + 12], fill=col)
        draw.text((lx + 18, ly), label, fill="black", font=fnt)
        ly += 16


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.exists(path):
        raise StudyError(f"{run_dir}: no metrics.csv (not a run directory?)")
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def read_evolution(run_dir):
    """The records of ``evolution.jsonl`` (none when it is missing; ``cht.rundir``)."""
    try:
        return RunDir(run_dir).read_evolution()
    except CorruptFile as e:
        raise StudyError(str(e)) from None


def draw_curves(rows, path):
    """Loss, accuracy and learning rate per epoch, three panels side by side."""
    fnt = font(13)
    img = Image.new("RGB", (1260, 380), "white")
    d = ImageDraw.Draw(img)
    ep = [r["epoch"] for r in rows]
    line_panel(d, (0, 0, 420, 380), [("train loss", ep, [r["train_loss"] for r in rows], PALETTE[0])],
               "training loss (mean cross-entropy)", "epoch", "loss", fnt)
    line_panel(d, (420, 0, 840, 380), [("train", ep, [r["train_acc"] for r in rows], PALETTE[0]),
                                       ("test", ep, [r["test_acc"] for r in rows], PALETTE[1])],
               "top-1 accuracy", "epoch", "%", fnt)
    line_panel(d, (840, 0, 1260, 380), [("lr", ep, [r["lr"] for r in rows], PALETTE[2])],
               "learning rate (during the epoch)", "epoch", "lr", fnt)
    img.save(path)


def layer_series(recs, key):
    """``{layer: (epochs, values of key)}`` from evolution.jsonl records, layers in their order."""
    out = {}
    for r in recs:
        xs, ys = out.setdefault(r["layer"].replace(".weight", ""), ([], []))
        xs.append(r["epoch"])
        ys.append(r[key])
    return out


def draw_layer_panels(recs, panels, path, panel_width=630, height=460):
    """One line panel per ``(key, title, axes)`` of ``panels``, side by side: a line per layer
    against the epoch of the evolution step (``axes``: keyword arguments of ``line_panel``,
    such as ``y_min``). Returns ``{key: layer_series(recs, key)}``."""
    fnt = font(13)
    img = Image.new("RGB", (panel_width * len(panels), height), "white")
    d = ImageDraw.Draw(img)
    drawn = {}
    for k, (key, title, axes) in enumerate(panels):
        drawn[key] = layer_series(recs, key)
        series = [(name, xs, ys, PALETTE[i % len(PALETTE)]) for i, (name, (xs, ys)) in enumerate(drawn[key].items())]
        line_panel(d, (panel_width * k, 0, panel_width * (k + 1), height), series, title,
                   "epoch (evolution after it)", key, fnt, legend_width=100, **axes)
    img.save(path)
    return drawn


def draw_evolution(recs, path):
    """Density and ITOP rate of every layer after each evolution step."""
    return draw_layer_panels(recs, [("density", "density (active fraction) per layer", {}),
                                    ("itop", "ITOP rate (fraction ever active) per layer", {})], path)


def draw_topology(recs, path):
    """The section 7 measures of every layer after each evolution step, three panels."""
    return draw_layer_panels(recs, [
        ("channel_cv", "channel_cv: std/mean of links per input channel", dict(y_min=0)),
        ("empty_kernels", "empty_kernels: fraction of (o, c) with no link", dict(y_min=0)),
        ("unused_inputs", "unused_inputs: input channels no filter reads", dict(y_min=0, y_integer=True))],
        path, panel_width=560)


def draw_mask(classes, colours, title, path, fnt=None):
    """A mask picture: filters as rows, one ``kh x kw`` tile per input channel.

    ``classes``: int ``(C_out, C_in, kh, kw)``, an index into ``colours`` (an ordered
    ``{label: rgb}``). The legend gives each class's count. Returns ``{label: count}``.
    """
    fnt = fnt or font(13)
    C_out, C_in, kh, kw = classes.shape
    cell = max(1, min(8, 900 // max(C_in * (kw + 1), 1), 700 // max(C_out * (kh + 1), 1)))
    gap = 1 if cell < 3 else 2
    tw, th = kw * cell + gap, kh * cell + gap                          # tile pitch
    L, T = 56, 70
    W = max(L + C_in * tw + 20, 640)
    H = T + C_out * th + 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    counts = {label: int((classes == i).sum()) for i, label in enumerate(colours)}
    d.text((8, 6), title, fill="black", font=fnt)
    x = 8
    for label, col in colours.items():                                 # legend with counts
        text = f"{label} {counts[label]}"
        d.rectangle([x, 30, x + 12, 42], fill=col, outline="black")
        d.text((x + 16, 29), text, fill="black", font=fnt)
        x += 16 + int(d.textlength(text, font=fnt)) + 18
    pix = np.array(list(colours.values()), dtype=np.uint8)[classes]    # (C_out, C_in, kh, kw, 3)
    canvas = np.full((C_out * th, C_in * tw, 3), 255, np.uint8)
    block = np.repeat(np.repeat(pix, cell, axis=2), cell, axis=3)      # (C_out, C_in, kh*cell, kw*cell, 3)
    for o in range(C_out):                                             # one row of tiles per filter
        for c in range(C_in):
            canvas[o * th:o * th + kh * cell, c * tw:c * tw + kw * cell] = block[o, c]
    img.paste(Image.fromarray(canvas), (L, T))
    step = max(1, nice_ticks(0, C_out, 8)[1]) if C_out > 8 else 1
    for o in range(0, C_out, int(step)):                               # labelled ticks
        d.line([(L - 4, T + o * th + kh * cell / 2), (L - 1, T + o * th + kh * cell / 2)], fill="black")
        d.text((L - 6, T + o * th + kh * cell / 2), str(o), fill="black", font=fnt, anchor="rm")
    step = max(1, nice_ticks(0, C_in, 8)[1]) if C_in > 8 else 1
    for c in range(0, C_in, int(step)):
        d.line([(L + c * tw + kw * cell / 2, T - 4), (L + c * tw + kw * cell / 2, T - 1)], fill="black")
        d.text((L + c * tw + kw * cell / 2, T - 6), str(c), fill="black", font=fnt, anchor="md")
    d.text((4, T - 20), "filter o", fill="black", font=fnt)
    d.text((L, T + C_out * th + 10), f"input channel c (tiles of {kh}x{kw}: kernel offsets dy down, dx across)",
           fill="black", font=fnt)
    img.save(path)
    return counts


def step_classes(before, removed, regrown):
    """Classes of ``STEP_COLOURS`` for one evolution step (bool arrays of one shape)."""
    cls = np.full(before.shape, 4, np.int64)                            # inactive
    cls[before & ~removed] = 0                                          # kept
    cls[removed & ~regrown] = 1
    cls[regrown & ~removed] = 2
    cls[removed & regrown] = 3
    return cls


def run(run_dir, echo=print):
    """The ``plots`` command. Returns ``{path: what it shows}`` of the pictures written: the
    legend counts of a mask picture, the series of a line picture (``draw_layer_panels``),
    None for the curves."""
    rows = read_metrics(run_dir)
    out = os.path.join(run_dir, "plots")
    os.makedirs(out, exist_ok=True)
    written = {}
    p = os.path.join(out, "curves.png")
    draw_curves(rows, p)
    written[p] = None
    recs = read_evolution(run_dir)
    if recs:
        p = os.path.join(out, "evolution.png")
        written[p] = draw_evolution(recs, p)
        p = os.path.join(out, "topology.png")
        written[p] = draw_topology(recs, p)
    ck = os.path.join(run_dir, "checkpoint.npz")
    if os.path.exists(ck):
        with np.load(ck) as z:
            for key in [k[5:] for k in z.files if k.startswith("mask.")]:
                M, ever = z[f"mask.{key}"], z[f"itop.{key}"] if f"itop.{key}" in z.files else z[f"mask.{key}"]
                cls = np.where(M, 0, np.where(ever, 1, 2))
                p = os.path.join(out, f"mask-{key}.png")
                written[p] = draw_mask(cls, FINAL_COLOURS, f"{key} {'x'.join(map(str, M.shape))}: final mask "
                                       f"(epoch {len(rows)}), density {M.mean():.3f}, ITOP {ever.mean():.3f}", p)
    for f in sorted(glob.glob(os.path.join(run_dir, "evotrace-e*.npz"))):
        epoch = int(re.search(r"evotrace-e(\d+)\.npz$", f).group(1))
        with np.load(f) as z:
            for key in [k[:-len(".mask_before")] for k in z.files if k.endswith(".mask_before")
                        and not k.startswith("trace.")]:
                b, r, g = z[f"{key}.mask_before"], z[f"{key}.removed"], z[f"{key}.regrown"]
                p = os.path.join(out, f"mask-{key}-e{epoch}.png")
                written[p] = draw_mask(step_classes(b, r, g), STEP_COLOURS,
                                       f"{key}: evolution step after epoch {epoch}: removed {int(r.sum())}, "
                                       f"regrown {int(g.sum())}, overlap {int((r & g).sum())}", p)
    echo(f"wrote {len(written)} pictures into {out}: " + ", ".join(os.path.basename(p) for p in list(written)[:4])
         + (" ..." if len(written) > 4 else ""))
    return written
