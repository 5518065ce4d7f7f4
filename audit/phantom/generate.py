"""Digital chest phantom: synthetic chest-like radiographs with planted findings and known boxes.

Every image is a pure function of ``(seed, index, config)``: the same arguments give the same
pixels (:mod:`audit.phantom.dataset` writes them as byte-identical PNG, DICOM and CSV files). The
geometry is defined in a 1024x1024 frame and sampled at pixel centres of the
requested ``config.size``, so an image rendered at 224 has the same anatomy and findings as the one
rendered at 1024 (used to train the reference models without rendering at 1024 first).

Anatomy: body outline, two dark lung fields with faint vascular texture, ribs, a bright
mediastinum/spine and heart, smooth exposure variation and noise.

Planted findings (NIH names), drawn independently (several may co-occur; negatives exist):

- ``Mass``: a bright blob, 150-260 px across (1024 frame), centred in either lung at any height.
- ``Effusion``: a basal opacity with a meniscus (higher laterally), either side, 150-260 px high.
- ``Pneumothorax``: a lucent apical/lateral rim without lung markings or rib contrast, with a thin
  visceral pleural line, either side.
- ``Nodule``: a small blob, 30-50 px across (below the 7x7 Grad-CAM cell size on purpose).
- ``Cardiomegaly``: the heart enlarged (same centre, ~1.5x wider); its box is the heart's box.

Boxes are ``(x, y, w, h)`` in continuous pixel coordinates of the returned image (see
docs/interfaces.md). Every planted finding changes pixels only inside its box: all soft edges
fall off *inside* the finding's support (compact smoothsteps), so the box is exact.

Shortcut cue: an 'R'-like laterality marker in the top-left corner (:data:`MARKER_BOX_1024`).
With ``config.shortcut=True`` the marker is present exactly when a Mass is present, and the Mass
is faint (the cue a labels-only model learns instead of the lesion). With
``config.marker_with_mass=True`` the marker also accompanies every Mass but the Mass is visible:
the demo's common test set, where the spurious correlation still holds (as at the site where the
shortcut was learned) and a model that localizes must look past the marker.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FRAME = 1024  # geometry frame (pixels)
FINDINGS: tuple[str, ...] = ("Mass", "Effusion", "Pneumothorax", "Nodule", "Cardiomegaly")

# The laterality marker ('R'-like bitmap), fixed place in the 1024 frame: x, y, w, h.
MARKER_BOX_1024: tuple[float, float, float, float] = (48.0, 48.0, 70.0, 98.0)
_MARKER_BITMAP = np.array(
    [
        [1, 1, 1, 1, 0],
        [1, 0, 0, 0, 1],
        [1, 0, 0, 0, 1],
        [1, 1, 1, 1, 0],
        [1, 0, 1, 0, 0],
        [1, 0, 0, 1, 0],
        [1, 0, 0, 0, 1],
    ],
    dtype=bool,
)


@dataclass(frozen=True)
class PhantomConfig:
    """What to render. ``prevalence``: probability of each finding, drawn independently."""

    size: int = FRAME
    shortcut: bool = False
    prevalence: dict[str, float] = field(
        default_factory=lambda: {
            "Mass": 0.3,
            "Effusion": 0.3,
            "Pneumothorax": 0.3,
            "Nodule": 0.3,
            "Cardiomegaly": 0.3,
        }
    )
    mass_amplitude: tuple[float, float] = (45.0, 65.0)
    faint_mass_amplitude: tuple[float, float] = (6.0, 10.0)  # shortcut set
    marker_probability: float = 0.0  # marker independent of findings (ignored when shortcut)
    # The demo's common test set: the marker present exactly when a Mass is, and the Mass
    # visible (ordinary amplitude). Draws nothing extra: other modes keep their bytes.
    marker_with_mass: bool = False
    noise_sigma: float = 4.0  # white noise at 1024 (scaled with the pixel area when smaller)
    force: dict[str, bool] | None = None  # override presence (geometry draws are unchanged)
    force_marker: bool | None = None


def _smoothstep(t: np.ndarray) -> np.ndarray:
    """0 for t <= 0, 1 for t >= 1, C1-smooth in between (compact support)."""
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in the 1024 frame: X[r, c] = (c + 0.5) * 1024 / size."""
    s = FRAME / size
    v = (np.arange(size, dtype=np.float64) + 0.5) * s
    return np.meshgrid(v, v, indexing="xy")


def _coarse_field(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.standard_normal((n, n))


def _sample_field(f: np.ndarray, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Bilinear sample of a coarse field spanning the 1024 frame (size-independent texture)."""
    from scipy.ndimage import map_coordinates

    n = f.shape[0]
    u = X / FRAME * (n - 1)
    v = Y / FRAME * (n - 1)
    return map_coordinates(f, [v.ravel(), u.ravel()], order=1, mode="nearest").reshape(X.shape)


def _ellipse_r(X, Y, cx, cy, ax, ay):
    return np.sqrt(((X - cx) / ax) ** 2 + ((Y - cy) / ay) ** 2)


def _clip_box(x0, y0, x1, y1, scale):
    x0, y0 = max(x0, 0.0), max(y0, 0.0)
    x1, y1 = min(x1, float(FRAME)), min(y1, float(FRAME))
    return (
        float(x0 * scale),
        float(y0 * scale),
        float((x1 - x0) * scale),
        float((y1 - y0) * scale),
    )


def _draw_params(rng: np.random.Generator, config: PhantomConfig) -> dict:
    """All random draws of one image, in a fixed order independent of size and presence."""
    u = rng.uniform
    p: dict = {}
    p["present"] = {f: bool(u() < config.prevalence.get(f, 0.0)) for f in FINDINGS}
    p["marker_draw"] = u()
    # anatomy
    p["body"] = (512 + u(-15, 15), 600 + u(-10, 10), u(410, 460), u(540, 580))
    cy = 470 + u(-25, 25)
    ay = u(270, 320)
    p["lungs"] = [
        (335 + u(-20, 10), cy + u(-8, 8), u(140, 165), ay * u(0.97, 1.03)),
        (689 + u(-10, 20), cy + u(-8, 8), u(140, 165), ay * u(0.97, 1.03)),
    ]
    p["lung_level"] = u(40, 60)
    p["body_level"] = u(115, 135)
    p["rib_phase"] = u(0, 1)
    p["rib_spacing"] = u(58, 66)
    p["rib_curv"] = u(0.0010, 0.0016)
    p["heart"] = (535 + u(-15, 15), 650 + u(-20, 20), u(140, 160), u(110, 130))
    p["cardio_scale"] = (u(1.45, 1.6), u(1.25, 1.35))
    p["gain"] = u(0.85, 1.15)
    p["offset"] = u(-12, 12)
    p["gradient"] = (u(-12, 12), u(-12, 12))
    # findings (always drawn)
    p["mass_side"] = int(u() < 0.5)
    p["mass_pos"] = (u(-0.55, 0.55), u(-0.6, 0.6))
    p["mass_diam"] = u(150, 260)
    p["mass_amp"] = u(*config.mass_amplitude)
    p["mass_faint_amp"] = u(*config.faint_mass_amplitude)
    p["eff_side"] = int(u() < 0.5)
    p["eff_height"] = u(150, 260)
    p["eff_level"] = u(140, 160)
    p["ptx_side"] = int(u() < 0.5)
    p["ptx_depth"] = u(0.22, 0.32)
    p["ptx_cut"] = u(-0.1, 0.3)
    p["nod_side"] = int(u() < 0.5)
    p["nod_pos"] = (u(-0.6, 0.6), u(-0.7, 0.6))
    p["nod_diam"] = u(30, 50)
    p["nod_amp"] = u(40, 55)
    # textures (coarse, size independent)
    p["texture"] = _coarse_field(rng, 48)
    p["exposure"] = _coarse_field(rng, 6)
    return p


def _presence(p: dict, config: PhantomConfig) -> tuple[dict[str, bool], bool]:
    present = dict(p["present"])
    if config.force:
        present.update({k: bool(v) for k, v in config.force.items()})
    if config.shortcut or config.marker_with_mass:
        marker = present["Mass"]
    else:
        marker = p["marker_draw"] < config.marker_probability
    if config.force_marker is not None:
        marker = bool(config.force_marker)
    return present, marker


def generate_phantom(
    seed: int, index: int, config: PhantomConfig | None = None
) -> tuple[np.ndarray, list[tuple[str, tuple[float, float, float, float]]], dict[str, int]]:
    """Render phantom ``index`` of the set ``seed``.

    Returns ``(image, boxes, labels)``: ``image`` uint8 ``[size, size]`` (larger = brighter),
    ``boxes`` a list of ``(finding, (x, y, w, h))`` in the image's own frame, ``labels`` a dict
    ``finding -> 0/1`` over :data:`FINDINGS` plus ``"marker" -> 0/1``.
    """
    config = config or PhantomConfig()
    size = int(config.size)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 0x70AB]))
    p = _draw_params(rng, config)
    present, marker = _presence(p, config)
    px = FRAME / size  # 1024-frame units per pixel
    edge = max(6.0, 1.2 * px)  # soft-edge width (1024 units)
    scale = size / FRAME
    X, Y = _grid(size)

    # ---- anatomy
    bx, by, bax, bay = p["body"]
    rb = _ellipse_r(X, Y, bx, by, bax, bay)
    body = _smoothstep((1 - rb) * bax / (3 * edge))
    neck = _smoothstep((1 - _ellipse_r(X, Y, bx, 40.0, 105.0, 170.0)) * 105 / (3 * edge))
    body = np.maximum(body, neck)
    img = 18.0 + (p["body_level"] - 18.0) * body

    lung_r = [_ellipse_r(X, Y, *lp) for lp in p["lungs"]]
    lung_soft = [
        _smoothstep((1 - r) * lp[2] / (2 * edge)) for r, lp in zip(lung_r, p["lungs"], strict=True)
    ]
    lungs = np.maximum(lung_soft[0], lung_soft[1])
    texture = _sample_field(p["texture"], X, Y)
    lung_val = p["lung_level"] + 7.0 * texture
    img = img * (1 - lungs) + lung_val * lungs

    # ribs: bands y = y0 + k (x - 512)^2 within the lungs (weaker over soft tissue)
    d = Y - p["rib_curv"] * (X - 512.0) ** 2
    ph = np.mod(d / p["rib_spacing"] + p["rib_phase"], 1.0)
    ribs = _smoothstep(1 - np.abs(ph - 0.5) / 0.18)
    ribs *= _smoothstep((Y - 140.0) / 40.0) * _smoothstep((900.0 - Y) / 60.0)
    img = img + ribs * (24.0 * lungs + 8.0 * body * (1 - lungs))

    # mediastinum and spine
    med = _smoothstep((1 - _ellipse_r(X, Y, bx, 430.0, 80.0, 360.0)) * 80 / (3 * edge))
    img = img * (1 - med) + 160.0 * med
    spine = _smoothstep((38.0 - np.abs(X - bx)) / (2 * edge)) * body
    vert = 0.5 + 0.5 * np.cos(2 * np.pi * Y / 52.0)
    img = img + spine * (10.0 + 6.0 * vert)

    # heart (normal or enlarged: same centre, the enlarged ellipse contains the normal one)
    hx, hy, hax, hay = p["heart"]
    if present["Cardiomegaly"]:
        hax, hay = hax * p["cardio_scale"][0], hay * p["cardio_scale"][1]
    heart = _smoothstep((1 - _ellipse_r(X, Y, hx, hy, hax, hay)) * hay / (2 * edge))
    img = img * (1 - heart) + 172.0 * heart

    boxes: list[tuple[str, tuple[float, float, float, float]]] = []

    # ---- findings
    if present["Effusion"]:
        s = p["eff_side"]
        cx, cy, ax, ay = p["lungs"][s]
        lateral_x = cx - ax if s == 0 else cx + ax
        H = p["eff_height"]
        ym = _effusion_line(X, cx, cy, ax, ay, lateral_x, H)
        m = lung_soft[s] * _smoothstep((Y - ym) / (2 * edge))
        img = img * (1 - m) + (p["eff_level"] + 6.0 * texture) * m
        boxes.append(("Effusion", _effusion_box(p, scale)))

    if present["Pneumothorax"]:
        s = p["ptx_side"]
        cx, cy, ax, ay = p["lungs"][s]
        t, cut = p["ptx_depth"], cy + ay * p["ptx_cut"]
        r = lung_r[s]
        rim = lung_soft[s] * _smoothstep((r - (1 - t)) * ax / (1.5 * edge))
        rim *= _smoothstep((cut - Y) / (3 * edge))
        img = img * (1 - rim) + 30.0 * rim
        # visceral pleural line, just inside the rim
        line = _smoothstep(1 - np.abs(r - (1 - t) - 0.02) * ax / 4.0) * rim
        img = img + 22.0 * line
        boxes.append(("Pneumothorax", _ptx_box(p, scale)))

    if present["Mass"]:
        amp = p["mass_faint_amp"] if config.shortcut else p["mass_amp"]
        (mx, my), R = _mass_centre(p), p["mass_diam"] / 2
        rr = np.sqrt((X - mx) ** 2 + (Y - my) ** 2) / R
        blob = _smoothstep((1 - rr) * R / (3 * edge)) * (
            0.7 + 0.3 * np.sqrt(np.clip(1 - rr**2, 0, 1))
        )
        img = img + amp * blob
        boxes.append(("Mass", _clip_box(mx - R, my - R, mx + R, my + R, scale)))

    if present["Nodule"]:
        (nx, ny), R = _nodule_centre(p), p["nod_diam"] / 2
        rr = np.sqrt((X - nx) ** 2 + (Y - ny) ** 2) / R
        blob = _smoothstep((1 - rr) * R / max(4.0, 0.8 * px))
        img = img + p["nod_amp"] * blob
        boxes.append(("Nodule", _clip_box(nx - R, ny - R, nx + R, ny + R, scale)))

    if present["Cardiomegaly"]:
        boxes.append(("Cardiomegaly", _clip_box(hx - hax, hy - hay, hx + hax, hy + hay, scale)))

    # ---- exposure and noise (everything but the marker)
    gx, gy = p["gradient"]
    expo = (
        6.0 * _sample_field(p["exposure"], X, Y) + gx * (X / FRAME - 0.5) + gy * (Y / FRAME - 0.5)
    )
    img = p["gain"] * img + p["offset"] + expo
    noise_rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), size, 0x501E]))
    img = img + noise_rng.standard_normal(img.shape) * (config.noise_sigma * scale)

    if marker:
        mxb, myb, mw, mh = MARKER_BOX_1024
        cols = np.floor((X - mxb) / mw * 5).astype(int)
        rows = np.floor((Y - myb) / mh * 7).astype(int)
        inside = (cols >= 0) & (cols < 5) & (rows >= 0) & (rows < 7)
        on = np.zeros_like(inside)
        on[inside] = _MARKER_BITMAP[rows[inside], cols[inside]]
        img = np.where(on, 245.0, img)

    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    order = {f: i for i, f in enumerate(FINDINGS)}
    boxes.sort(key=lambda fb: order[fb[0]])
    labels = {f: int(present[f]) for f in FINDINGS}
    labels["marker"] = int(marker)
    return image, boxes, labels


def _effusion_line(X, cx, cy, ax, ay, lateral_x, H):
    """Meniscus: y of the fluid surface; higher (smaller y) at the lateral wall."""
    u = np.clip(np.abs(X - lateral_x) / (2 * ax), 0.0, 1.0)
    return cy + ay - H + 0.45 * H * u**1.5


def _effusion_box(p: dict, scale: float):
    s = p["eff_side"]
    cx, cy, ax, ay = p["lungs"][s]
    lateral_x = cx - ax if s == 0 else cx + ax
    X, Y = _region_grid(cx - ax, cy - ay, cx + ax, cy + ay)
    mask = (_ellipse_r(X, Y, cx, cy, ax, ay) < 1) & (
        Y > _effusion_line(X, cx, cy, ax, ay, lateral_x, p["eff_height"])
    )
    return _region_box(mask, X, Y, scale)


def _ptx_box(p: dict, scale: float):
    s = p["ptx_side"]
    cx, cy, ax, ay = p["lungs"][s]
    t, cut = p["ptx_depth"], cy + ay * p["ptx_cut"]
    X, Y = _region_grid(cx - ax, cy - ay, cx + ax, cy + ay)
    r = _ellipse_r(X, Y, cx, cy, ax, ay)
    mask = (r < 1) & (r > 1 - t) & (Y < cut)
    return _region_box(mask, X, Y, scale)


def _region_grid(x0, y0, x1, y1):
    """1024-frame pixel centres of the integer pixels covering [x0,x1]x[y0,y1]."""
    c0, c1 = max(int(np.floor(x0)) - 1, 0), min(int(np.ceil(x1)) + 1, FRAME)
    r0, r1 = max(int(np.floor(y0)) - 1, 0), min(int(np.ceil(y1)) + 1, FRAME)
    return np.meshgrid(np.arange(c0, c1) + 0.5, np.arange(r0, r1) + 0.5, indexing="xy")


def _region_box(mask, X, Y, scale):
    """Box of the region where the (continuous) finding support lies, from a 1024 mask.

    The box spans the covered 1024 pixels plus a half-pixel margin, so it encloses the continuous
    support."""
    xs, ys = X[mask], Y[mask]
    x0, x1 = xs.min() - 0.5, xs.max() + 0.5
    y0, y1 = ys.min() - 0.5, ys.max() + 0.5
    return _clip_box(x0 - 0.5, y0 - 0.5, x1 + 0.5, y1 + 0.5, scale)  # + half-pixel margin


def _mass_centre(p: dict) -> tuple[float, float]:
    cx, cy, ax, ay = p["lungs"][p["mass_side"]]
    return cx + p["mass_pos"][0] * ax, cy + p["mass_pos"][1] * ay


def _nodule_centre(p: dict) -> tuple[float, float]:
    cx, cy, ax, ay = p["lungs"][p["nod_side"]]
    return cx + p["nod_pos"][0] * ax, cy + p["nod_pos"][1] * ay


def marker_box(size: int = FRAME) -> tuple[float, float, float, float]:
    """The laterality marker's box in a ``size`` frame."""
    s = size / FRAME
    x, y, w, h = MARKER_BOX_1024
    return (x * s, y * s, w * s, h * s)
