"""Drawing one gallery overlay: the X-ray thumbnail in grey, the map in a perceptually uniform,
colour-blind-safe colour map (viridis) with its colour bar, the map's maximum marked, the expert
box and the predicted box, and the method's name stamped on the image.

Colours are chosen to read on every viridis colour and on grey: the expert box is solid magenta
with a black outline, the predicted box black-and-white dashes, the maximum a white ring and cross
with a black outline. Expert and predicted boxes also differ by pattern (solid, dashed), so the
overlay does not rest on colour alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOUR_MAP = "viridis"
GALLERY_SIZE = 448  # px, longest side of the X-ray area of an overlay
BAR_PANEL = 64  # px, width of the colour-bar panel right of the X-ray
BAR_WIDTH = 14  # px, width of the colour bar itself
BAR_MARGIN = 8  # px, the bar's distance from the panel's left and top / bottom edges
EXPERT_COLOUR = (255, 0, 255)
PRED_COLOURS = ((255, 255, 255), (0, 0, 0))  # alternating dashes
PEAK_COLOUR = (255, 255, 255)
OUTLINE = (0, 0, 0)
PANEL_BACKGROUND = (255, 255, 255)
#: Weak evidence (below this fraction of the display range) leaves the X-ray untinted; the
#: opacity then grows linearly to `MAX_ALPHA` at `FULL_ALPHA_AT` of the range.
TINT_FROM, FULL_ALPHA_AT, MAX_ALPHA = 0.05, 0.5, 0.65
DASH = 7  # px


_LUT: dict[str, np.ndarray] = {}


def colour_lut(name: str = COLOUR_MAP) -> np.ndarray:
    """``[256, 3]`` uint8 colours of a matplotlib colour map."""
    if name not in _LUT:
        from matplotlib import colormaps

        _LUT[name] = (colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(
            np.uint8)
    return _LUT[name]


def css_gradient(name: str = COLOUR_MAP, stops: int = 9) -> str:
    """A CSS ``linear-gradient`` (left: 0, right: the maximum) of the colour map."""
    lut = colour_lut(name)
    parts = [f"rgb({','.join(str(int(v)) for v in lut[round(i * 255 / (stops - 1))])}) "
             f"{100 * i / (stops - 1):g}%" for i in range(stops)]
    return "linear-gradient(to right, " + ", ".join(parts) + ")"


def font(size: int = 14) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.truetype("DejaVuSans-Bold.ttf", size)
    except OSError:
        return ImageFont.load_default(size)


def heat_rgb(unit: np.ndarray, size: tuple[int, int], cmap: str = COLOUR_MAP):
    """A map already in [0, 1] (or uint8 0-255) resized to ``size``: ``(rgb, values)``."""
    a = np.asarray(unit, dtype=np.float32)
    if np.asarray(unit).dtype == np.uint8:
        a = a / 255.0
    a = np.clip(np.nan_to_num(a), 0, 1)
    img = Image.fromarray(a, mode="F").resize(size, Image.BILINEAR)
    v = np.clip(np.asarray(img), 0, 1)
    return colour_lut(cmap)[(v * 255).round().astype(np.uint8)], v


def _finite(values: Sequence) -> bool:
    try:
        return all(math.isfinite(float(v)) for v in values)
    except (TypeError, ValueError):
        return False


def draw_expert(draw: ImageDraw.ImageDraw, xyxy: Sequence[float]) -> None:
    x0, y0, x1, y1 = xyxy
    draw.rectangle([x0 - 2, y0 - 2, x1 + 2, y1 + 2], outline=OUTLINE, width=1)
    if x1 - x0 > 6 and y1 - y0 > 6:  # the inner outline of a box too small for one is left out
        draw.rectangle([x0 + 2, y0 + 2, x1 - 2, y1 - 2], outline=OUTLINE, width=1)
    draw.rectangle([x0 - 1, y0 - 1, x1 + 1, y1 + 1], outline=EXPERT_COLOUR, width=3)


def draw_predicted(draw: ImageDraw.ImageDraw, xyxy: Sequence[float]) -> None:
    x0, y0, x1, y1 = xyxy
    for ax, ay, bx, by in ((x0, y0, x1, y0), (x1, y0, x1, y1), (x1, y1, x0, y1),
                           (x0, y1, x0, y0)):
        steps = max(1, int(math.hypot(bx - ax, by - ay) // DASH))
        for i in range(steps):
            t0, t1 = i / steps, (i + 1) / steps
            draw.line([ax + (bx - ax) * t0, ay + (by - ay) * t0, ax + (bx - ax) * t1,
                       ay + (by - ay) * t1], fill=PRED_COLOURS[i % 2], width=2)


def draw_peak(draw: ImageDraw.ImageDraw, x: float, y: float, r: float = 7) -> None:
    draw.ellipse([x - r - 1, y - r - 1, x + r + 1, y + r + 1], outline=OUTLINE, width=4)
    draw.ellipse([x - r, y - r, x + r, y + r], outline=PEAK_COLOUR, width=2)
    for dx, dy in ((1, 0), (0, 1)):
        draw.line([x - 2 * r * dx, y - 2 * r * dy, x + 2 * r * dx, y + 2 * r * dy],
                  fill=OUTLINE, width=4)
        draw.line([x - 2 * r * dx, y - 2 * r * dy, x + 2 * r * dx, y + 2 * r * dy],
                  fill=PEAK_COLOUR, width=2)


def stamp(draw: ImageDraw.ImageDraw, text: str, xy: tuple[int, int] = (4, 4)) -> None:
    """White text on a black box at ``xy``."""
    f = font(15)
    left, top, right, bottom = draw.textbbox(xy, text, font=f)
    draw.rectangle([left - 4, top - 3, right + 4, bottom + 3], fill=OUTLINE)
    draw.text(xy, text, fill=(255, 255, 255), font=f)


def colour_bar(height: int, top_label: str, cmap: str = COLOUR_MAP) -> Image.Image:
    """The colour-bar panel: the bar (top: the display maximum, bottom: 0) and its labels."""
    panel = Image.new("RGB", (BAR_PANEL, height), PANEL_BACKGROUND)
    inner = max(2, height - 2 * BAR_MARGIN)
    ramp = colour_lut(cmap)[np.linspace(255, 0, inner).round().astype(np.uint8)]
    bar = np.repeat(ramp[:, None, :], BAR_WIDTH, axis=1)
    panel.paste(Image.fromarray(bar, mode="RGB"), (BAR_MARGIN, BAR_MARGIN))
    draw = ImageDraw.Draw(panel)
    draw.rectangle([BAR_MARGIN - 1, BAR_MARGIN - 1, BAR_MARGIN + BAR_WIDTH,
                    BAR_MARGIN + inner], outline=OUTLINE, width=1)
    f = font(11)
    x = BAR_MARGIN + BAR_WIDTH + 4
    draw.text((x, BAR_MARGIN - 2), top_label, fill=OUTLINE, font=f)
    draw.text((x, BAR_MARGIN + inner - 12), "0", fill=OUTLINE, font=f)
    return panel


def overlay_image(thumb: Image.Image | None, unit_map: np.ndarray | None,
                  expert_box: Sequence[float], pred_box: Sequence[float],
                  peak_xy: Sequence[float] | None, original_size: tuple[float, float],
                  label: str, bar_label: str = "max", size: int = GALLERY_SIZE) -> Image.Image:
    """One overlay. Boxes ``(x, y, w, h)`` and ``peak_xy`` are in the original frame of size
    ``original_size``; ``unit_map`` is the display map (uint8 or [0, 1]) covering the image."""
    ow, oh = original_size
    scale = size / max(ow, oh)
    tw, th = max(1, round(ow * scale)), max(1, round(oh * scale))
    if thumb is not None:
        base = thumb.convert("L").resize((tw, th), Image.LANCZOS).convert("RGB")
    else:
        base = Image.new("RGB", (tw, th), (48, 48, 48))
    if unit_map is not None:
        rgb, v = heat_rgb(unit_map, (tw, th))
        ramp = np.clip((v - TINT_FROM) / (FULL_ALPHA_AT - TINT_FROM), 0, 1)
        alpha = (MAX_ALPHA * ramp)[..., None]
        mixed = np.asarray(base, dtype=np.float32) * (1 - alpha) + rgb.astype(np.float32) * alpha
        base = Image.fromarray(np.clip(mixed, 0, 255).round().astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(base)
    sx, sy = tw / ow, th / oh

    def xyxy(box: Sequence[float]) -> list[float]:
        x, y, w, h = (float(v) for v in box)
        return [x * sx, y * sy, (x + w) * sx, (y + h) * sy]

    if _finite(pred_box):
        draw_predicted(draw, xyxy(pred_box))
    if _finite(expert_box):
        draw_expert(draw, xyxy(expert_box))
    if peak_xy is not None and _finite(peak_xy):
        draw_peak(draw, float(peak_xy[0]) * sx, float(peak_xy[1]) * sy)
    stamp(draw, label)
    canvas = Image.new("RGB", (tw + BAR_PANEL, th), PANEL_BACKGROUND)
    canvas.paste(base, (0, 0))
    if unit_map is not None:
        canvas.paste(colour_bar(th, bar_label), (tw, 0))
    return canvas
