"""The lesion painter: one synthetic dermoscopy photo from (dx, seed, lesion, photo index, size).

Each lesion gets a latent *atypia* score in [0, 1] drawn from a class-
dependent Beta distribution, and every ABCD sign (asymmetry, border irregularity, extra colours such
as blue-white veil and black dots, diameter) is drawn with a probability that grows with atypia.
Melanomas draw high atypia and nevi low, but the distributions overlap, so the task is learnable but
not trivial: a small CNN trained from scratch on 64x64 images for 4 CPU minutes reaches ROC-AUC
0.80-0.91 (benchmarks/synth_learnability.py); the atypia overlap alone caps it near 0.90-0.93.
The lesion is rendered once in its own frame (a "sprite"); every photo of that lesion re-places the
same sprite with a small pose / scale / colour change on freshly textured skin, with its own hairs,
illumination and dermatoscope vignette, as repeated photos in HAM10000 do.

Numpy draws the smooth fields and colours, PIL the shapes, resampling and blur. :func:`render` is a
pure function of its arguments (same numpy / Pillow), so any worker draws the same bytes;
:mod:`skinsweep.data.synth` decides which photos to draw and writes them in the release layout.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

__all__ = ["render"]

# Atypia ~ Beta(a, b) per dx: the single knob that sets how much melanomas and the rest overlap.
_ATYPIA = {"mel": (2.4, 1.8), "nv": (1.4, 4.2), "bkl": (1.6, 3.5), "bcc": (1.6, 3.5),
           "akiec": (1.6, 3.5), "df": (1.2, 4.5), "vasc": (1.2, 4.5)}

_E = 1.4  # half-width of a lesion sprite in lesion radii (room for a ragged border and streaks)
_F32 = np.float32
_SKIN = np.array([(242, 200, 188), (236, 190, 172), (226, 172, 150), (240, 184, 162),
                  (218, 165, 138), (246, 214, 206), (236, 180, 184)], _F32)  # before lighting
BLACK, BLUE_GREY, VEIL, WHITE = (50, 32, 34), (95, 105, 135), (150, 160, 190), (228, 218, 218)
RED, DARK_RED, PINK = (185, 70, 80), (120, 40, 45), (218, 148, 150)


def _noise(rng: np.random.Generator, h: int, w: int, cells: float, octaves: int = 1) -> np.ndarray:
    """Smooth value noise of shape (h, w), unit std: random grids upsampled bicubically by PIL."""
    out, amp = np.zeros((h, w), _F32), 1.0
    for _ in range(octaves):
        gh = max(2, int(cells * h / max(h, w)) + 2)
        gw = max(2, int(cells * w / max(h, w)) + 2)
        grid = rng.standard_normal((gh, gw)).astype(_F32)
        out += amp * np.asarray(Image.fromarray(grid, "F").resize((w, h), Image.BICUBIC))
        cells, amp = cells * 2.1, amp * 0.5
    return out / max(float(out.std()), 1e-6)


def _region(field_: np.ndarray, coverage: float, soft: float = 0.35) -> np.ndarray:
    """Soft mask covering about ``coverage`` of a unit-std field (threshold from the normal cdf)."""
    t = NormalDist().inv_cdf(1.0 - min(max(coverage, 1e-3), 0.999))
    return np.clip((field_ - t) / soft, 0.0, 1.0)


def _blend(col: np.ndarray, mask: np.ndarray, rgb, opacity: float = 1.0) -> None:
    """In place: col = col * (1 - m) + rgb * m, with m = mask * opacity. col is (h, w, 3)."""
    m = (mask * _F32(opacity))[..., None]
    col *= 1.0 - m
    col += m * np.asarray(rgb, _F32)


def _jitter(rng: np.random.Generator, rgb, spread: float = 0.12, sd: float = 4.0) -> np.ndarray:
    """A colour near rgb: mostly brighter/darker (one factor), a little hue noise per channel."""
    out = np.asarray(rgb, _F32) * rng.uniform(1 - spread, 1 + spread) + rng.normal(0, sd, 3)
    return np.clip(out, 0, 255).astype(_F32)


def _lesion(dx: str, rng: np.random.Generator, px: int) -> tuple[Image.Image, float]:
    """Draw one lesion in its own frame: an RGBA sprite (side px) and its radius in image units.

    The sprite covers [-_E, _E]^2 lesion radii. The radius is in units of min(width, height).
    """
    a = float(rng.beta(*_ATYPIA[dx]))  # atypia: every sign below is more likely when it is high
    chance = lambda prob: rng.random() < prob  # noqa: E731  (a shorthand used many times)
    radius = 0.16 * np.exp(rng.normal(0, 0.25)) * (1 + 1.1 * a)
    radius *= {"df": 0.6, "vasc": 0.75, "akiec": 1.15, "bkl": 1.1}.get(dx, 1.0)
    radius = float(np.clip(radius, 0.05, 0.42))
    p = int(np.clip(2 * _E * radius * px, 16, 320))  # capped: textures are smooth, PIL upsamples
    t = np.linspace(-_E, _E, p, dtype=_F32)
    u, v = np.meshgrid(t, t)
    rho = np.hypot(u, v)

    # Shape (A, B): odd harmonics break symmetry, high ones notch the border; both grow with a.
    ang = np.linspace(-np.pi, np.pi, 721, dtype=_F32)
    r = 1 + rng.uniform(0, 0.2) * np.cos(2 * ang + rng.uniform(0, 6.3))  # ellipse: symmetric
    for k in (1, 3, 5):
        r += a * rng.uniform(0.0, 0.22) / k**0.3 * np.cos(k * ang + rng.uniform(0, 6.3))
    for k in range(4, 14):
        r += a**1.5 * rng.uniform(0, 0.09) / k**0.4 * np.cos(k * ang + rng.uniform(0, 6.3))
    idx = np.rint((np.arctan2(v, u) + np.pi) * (720 / (2 * np.pi))).astype(np.int32)
    d = rho / np.maximum(r[idx], 0.3) + (0.03 + 0.12 * a) * _noise(rng, p, p, 9, 2) * 0.5
    soft = {"akiec": 0.45, "bcc": 0.25, "bkl": 0.08, "vasc": 0.06}.get(dx, rng.uniform(0.06, 0.3))
    alpha = np.clip((1 - d) / soft, 0, 1)
    inside = np.clip((0.9 - d) / 0.2, 0, 1)  # colour features stay inside the border

    # Base pigment: a light and a dark tone mixed by a per-pixel pigment level.
    side = u * np.cos(psi := rng.uniform(0, 6.3)) + v * np.sin(psi)
    level = (rng.uniform(0.1, 0.7) + 0.4 * a + rng.uniform(-0.2, 0.3) * (1 - rho)
             + a * rng.uniform(0, 0.35) * side + (0.05 + 0.25 * a) * _noise(rng, p, p, 4, 2)
             + (0.06 + 0.1 * a) * _noise(rng, p, p, 20))  # granular texture
    light, dark = _jitter(rng, (188, 128, 88)), _jitter(rng, (92, 54, 40))
    if dx == "bkl":
        light, dark = _jitter(rng, (202, 152, 118)), _jitter(rng, (138, 92, 68))
    elif dx in ("bcc", "akiec") or (dx == "mel" and chance(0.06)):  # incl. amelanotic melanoma
        light, dark = _jitter(rng, PINK, 0.06), _jitter(rng, (175, 100, 100))
        level = level * 0.6
    elif dx == "vasc":
        light, dark = _jitter(rng, (190, 70, 90)), _jitter(rng, (120, 40, 75), 0.2, 10)
    elif dx == "df":
        level = level * np.clip((rho - 0.15) / 0.45, 0.2, 1)  # pale centre, pigmented ring
    level = np.clip(level, 0, 1)[..., None]
    col = light + (dark - light) * level

    # Pigment network: zero-crossings of noise form an irregular mesh; atypical = thick, broken.
    if dx in ("mel", "nv", "df", "akiec") and chance(0.6):
        width = 0.12 + 0.2 * a * (1 + _noise(rng, p, p, 3))
        net = np.exp(-(_noise(rng, p, p, 14 + 8 * rng.random()) / np.maximum(width, 0.05)) ** 2)
        net *= inside * (1 - _region(_noise(rng, p, p, 4), 0.6 * a))
        _blend(col, net, dark * 0.75 if dx != "akiec" else DARK_RED, rng.uniform(0.3, 0.6))

    # C: extra colours, each with an atypia-driven chance (benign lesions get them too, rarely).
    def bias() -> np.ndarray:  # a blob field pushed to one side, more so for atypical lesions
        b = rng.uniform(0, 6.3)
        return _noise(rng, p, p, 3) + 1.2 * a * (u * np.cos(b) + v * np.sin(b))

    melanocytic = dx in ("mel", "nv")
    if chance(0.1 + 0.55 * a):  # dark brown / black blotch off centre
        blotch = _region(bias(), rng.uniform(0.1, 0.3), 0.7) * inside
        _blend(col, blotch, BLACK, rng.uniform(0.4, 0.85))
    if chance((0.04 + 0.55 * a**1.5) * (1 if melanocytic else 0.6)):  # blue-white veil
        veil = _region(bias(), rng.uniform(0.15, 0.35)) * inside
        veil *= 0.8 + 0.2 * _noise(rng, p, p, 12)  # mottled, not a flat patch
        _blend(col, veil, VEIL, rng.uniform(0.5, 0.8))
    if chance(0.03 + 0.35 * a**2):  # regression: white scar-like area
        _blend(col, _region(bias(), rng.uniform(0.1, 0.25)) * inside, WHITE, rng.uniform(0.4, 0.7))
    if chance(0.05 + 0.3 * a):  # reddish / pink areas
        _blend(col, _region(bias(), rng.uniform(0.1, 0.3)) * inside, RED, rng.uniform(0.2, 0.5))
    if dx == "nv" and chance(0.03):  # blue nevus: homogeneous blue-grey
        _blend(col, inside, BLUE_GREY, 0.7)

    # Class-specific structures drawn as shapes (dots, streaks, vessels, lobules), one mask each.
    def to_px(x: float, y: float) -> tuple[float, float]:
        return (x + _E) * p / (2 * _E), (y + _E) * p / (2 * _E)

    def border(th: float) -> float:  # the lesion's radius towards angle th (in [-pi, pi])
        return float(r[int(round((th + np.pi) * 720 / (2 * np.pi))) % 721])

    def stamp(rgb, opacity: float, paint) -> None:
        mask = Image.new("L", (p, p))
        paint(ImageDraw.Draw(mask))
        m = np.asarray(mask.filter(ImageFilter.GaussianBlur(max(0.5, p / 400))), _F32) / 255
        _blend(col, m * np.clip(alpha * 1.5, 0, 1), rgb, opacity)

    def dots(count: int, size: tuple[float, float], where: tuple[float, float]):
        def paint(draw: ImageDraw.ImageDraw) -> None:
            for _ in range(count):
                th = rng.uniform(-np.pi, np.pi)
                rr = rng.uniform(*where) * border(th)
                x, y = to_px(rr * np.cos(th), rr * np.sin(th))
                s = rng.uniform(*size) * p
                draw.ellipse((x - s, y - s, x + s, y + s), fill=int(rng.integers(150, 256)))
        return paint

    def streaks(draw: ImageDraw.ImageDraw) -> None:
        for _ in range(int(rng.integers(4, 16))):
            th = rng.uniform(-np.pi, np.pi)
            c, s, rr = np.cos(th), np.sin(th), border(th)
            draw.line([to_px(0.75 * rr * c, 0.75 * rr * s), to_px(1.2 * rr * c, 1.2 * rr * s)],
                      fill=220, width=max(1, int(0.02 * p)))

    def vessels(draw: ImageDraw.ImageDraw) -> None:  # branching random walks, thinning out
        for _ in range(int(rng.integers(2, 7))):
            x, y, th = rng.uniform(-0.6, 0.6), rng.uniform(-0.6, 0.6), rng.uniform(0, 6.3)
            wid = 0.012 * p + 1
            for _ in range(int(rng.integers(4, 10))):
                step = rng.uniform(0.08, 0.2)
                nx, ny = x + step * np.cos(th), y + step * np.sin(th)
                draw.line([to_px(x, y), to_px(nx, ny)], fill=255, width=max(1, int(wid)))
                x, y, th, wid = nx, ny, th + rng.normal(0, 0.6), wid * 0.85

    def lacunae(draw: ImageDraw.ImageDraw) -> None:  # dark red-purple lobules
        for _ in range(int(rng.integers(3, 12))):
            x, y = to_px(rng.uniform(-0.55, 0.55), rng.uniform(-0.55, 0.55))
            s = rng.uniform(0.1, 0.22) * p / (2 * _E)
            draw.ellipse((x - s, y - s, x + s, y + s), fill=int(rng.integers(150, 256)))

    if chance(0.08 + 0.5 * a):  # black dots / irregular globules, more of them towards the border
        stamp(BLACK, 0.9, dots(int(rng.integers(3, 10 + 30 * a)), (0.004, 0.012 + 0.02 * a),
                               (0.3 + 0.3 * a, 1.0)))
    elif melanocytic and chance(0.3):  # regular brown globules of a globular nevus
        stamp(dark * 0.8, 0.8, dots(int(rng.integers(8, 25)), (0.012, 0.022), (0.0, 0.85)))
    if melanocytic and chance(0.03 + 0.4 * a):  # streaks / pseudopods at the border
        stamp((65, 42, 38), 0.8, streaks)
    if dx == "bkl":  # milia-like cysts, comedo-like openings, cerebriform furrows
        stamp(WHITE, 0.7, dots(int(rng.integers(0, 10)), (0.01, 0.025), (0.0, 0.8)))
        stamp(dark * 0.7, 0.8, dots(int(rng.integers(0, 8)), (0.01, 0.02), (0.0, 0.8)))
        fissure = np.exp(-(_noise(rng, p, p, 7) / 0.12) ** 2) * inside
        _blend(col, fissure, dark * 0.8, rng.uniform(0.0, 0.5))
    if dx == "bcc" or (dx == "mel" and chance(0.1)):  # arborizing vessels, blue-grey nests
        stamp(RED, 0.85, vessels)
        if chance(0.5):
            nest = _region(_noise(rng, p, p, 10), rng.uniform(0.03, 0.12), 0.5) * inside
            _blend(col, nest, BLUE_GREY, rng.uniform(0.4, 0.7))
    if dx == "akiec":  # white-yellow scale
        _blend(col, _region(_noise(rng, p, p, 16, 2), rng.uniform(0.05, 0.25), 0.6) * inside,
               (238, 228, 210), 0.55)
    if dx == "vasc":
        stamp((95, 25, 55), 0.7, lacunae)
    if dx == "df" and chance(0.8):  # central white scar-like patch
        scar = np.clip((rng.uniform(0.25, 0.5) - rho + 0.15 * _noise(rng, p, p, 5)) / 0.2, 0, 1)
        _blend(col, scar, WHITE, rng.uniform(0.3, 0.7))

    opacity = rng.uniform(0.6, 0.9) if dx in ("bcc", "akiec") else rng.uniform(0.85, 1.0)
    rgba = np.dstack([col, alpha * opacity * 255])
    return Image.fromarray(np.clip(rgba, 0, 255).astype(np.uint8), "RGBA"), radius


def _skin(rng: np.random.Generator, base: np.ndarray, w: int, h: int) -> Image.Image:
    """Skin background: colour mottle, fine texture, some redness and freckles.

    Drawn at half resolution and upsampled: skin under a dermatoscope is smooth at that scale,
    and it halves the cost of the most expensive step.
    """
    sw, sh = max(8, w // 2), max(8, h // 2)
    col = np.empty((sh, sw, 3), _F32)
    col[:] = base
    col *= (1 + 0.04 * _noise(rng, sh, sw, 4, 2))[..., None]
    col *= (1 + rng.uniform(0.012, 0.03) * _noise(rng, sh, sw, 50, 2))[..., None]  # fine texture
    redness = _region(_noise(rng, sh, sw, 5, 2), rng.uniform(0, 0.5), 2.5)[..., None]
    col += redness * np.array((2, -12, -8), _F32) * rng.uniform(0.3, 1.0)
    if rng.random() < 0.3:  # background freckles / lentigines
        _blend(col, _region(_noise(rng, sh, sw, 35), rng.uniform(0.02, 0.08), 0.5),
               base * np.array((0.82, 0.72, 0.66), _F32), rng.uniform(0.2, 0.45))
    img = Image.fromarray(np.clip(col, 0, 255).astype(np.uint8), "RGB")
    return img.resize((w, h), Image.BICUBIC)


def _lighting(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Per-pixel RGB gain (as a 0..255 image) for uneven light, white balance and the vignette.

    Smooth, so it is computed at quarter resolution and upsampled; applied with ImageChops.multiply.
    """
    lw, lh, unit = max(8, w // 4), max(8, h // 4), min(w, h)
    x = ((np.arange(lw, dtype=_F32) + 0.5) * (w / lw) - w / 2)[None, :] / unit
    y = ((np.arange(lh, dtype=_F32) + 0.5) * (h / lh) - h / 2)[:, None] / unit
    ang = rng.uniform(0, 6.3)
    light = (0.92 + rng.uniform(0, 0.08) * (x * np.cos(ang) + y * np.sin(ang))
             - rng.uniform(0, 0.3) * (x * x + y * y))
    if rng.random() < 0.6:  # dark circular rim of the dermatoscope, corners (nearly) black
        rv = rng.uniform(0.75, 1.05) * np.hypot(w, h) / 2 / unit  # circle radius in units
        dist = np.hypot(x - rng.normal(0, 0.03), y - rng.normal(0, 0.03))
        light = light * np.clip((rv - dist) / rng.uniform(0.04, 0.12), 0.03, 1)
    balance = rng.normal(1, 0.03, 3)
    gain = light[..., None] * (balance / balance.max() * rng.uniform(0.88, 1.0))
    return Image.fromarray(np.clip(gain * 255, 0, 255).astype(np.uint8), "RGB").resize(
        (w, h), Image.BILINEAR)


def _hairs(rng: np.random.Generator, img: Image.Image, count: int) -> Image.Image:
    """Thin dark curves (quadratic Bezier), drawn on a mask and softened so they are not aliased."""
    w, h = img.size
    unit = min(w, h)
    mask = Image.new("L", (w, h))
    draw = ImageDraw.Draw(mask)
    tt = np.linspace(0, 1, 24)[:, None]
    for _ in range(count):
        p0 = rng.uniform((-0.1 * w, -0.1 * h), (1.1 * w, 1.1 * h))
        th, length = rng.uniform(0, 6.3), rng.uniform(0.2, 0.9) * w
        p2 = p0 + length * np.array((np.cos(th), np.sin(th)))
        p1 = (p0 + p2) / 2 + rng.normal(0, 0.2) * length * np.array((-np.sin(th), np.cos(th)))
        pts = (1 - tt) ** 2 * p0 + 2 * (1 - tt) * tt * p1 + tt**2 * p2
        draw.line([tuple(q) for q in pts], fill=int(rng.integers(170, 256)),
                  width=max(1, int(round(rng.uniform(0.8, 2.2) * unit / 450))), joint="curve")
    mask = mask.filter(ImageFilter.GaussianBlur(max(0.4, 0.6 * unit / 450)))
    tone = tuple(int(q) for q in _jitter(rng, (45, 35, 32), 0.3))
    return Image.composite(Image.new("RGB", (w, h), tone), img, mask)


def render(dx: str, seed: int, key: int, view: int, size: tuple[int, int]) -> Image.Image:
    """One synthetic dermoscopy photo: lesion ``key`` (seeded by ``seed``) in its ``view``-th photo.

    Args:
        dx: HAM10000 code (mel, nv, bcc, akiec, bkl, df, vasc).
        size: (width, height) in pixels.

    Returns:
        An RGB PIL image. The same arguments always give the same pixels.
    """
    w, h = size
    unit = min(w, h)
    lesion_rng = np.random.default_rng([seed, 1, key])  # same lesion and patient in every photo
    rng = np.random.default_rng([seed, 2, key, view])  # this photo's pose, light, hairs
    skin_base = _jitter(lesion_rng, _SKIN[lesion_rng.integers(len(_SKIN))], 0.04)
    hairiness = lesion_rng.uniform(0, 12) if lesion_rng.random() < 0.55 else 0.0
    offset = lesion_rng.normal(0, 0.06, 2)
    orientation = lesion_rng.uniform(0, 2 * np.pi)
    sprite, radius = _lesion(dx, lesion_rng, unit)

    # Skin, then the lesion re-posed for this photo: a repeat is rotated, scaled and shifted a bit.
    img = _skin(rng, skin_base, w, h)
    scale = float(np.exp(rng.normal(0, 0.08))) if view else 1.0
    phi = orientation + (rng.normal(0, 0.25) if view else 0.0)
    cx = w / 2 + unit * (offset[0] + rng.normal(0, 0.03))
    cy = h / 2 + unit * (offset[1] + rng.normal(0, 0.03))
    ext = _E * radius * unit * scale  # sprite corners beyond this radius are empty skin
    x0, y0, side = int(cx - ext), int(cy - ext), int(2 * ext) + 2
    k = sprite.width / (2 * _E * radius * unit * scale)  # sprite px per image px
    c, s, half = k * np.cos(phi), k * np.sin(phi), sprite.width / 2
    bx, by = cx - x0, cy - y0  # lesion centre inside the pasted box
    placed = sprite.transform((side, side), Image.AFFINE, (c, s, half - c * bx - s * by,
                                                           -s, c, half + s * bx - c * by),
                              Image.BILINEAR)
    img.paste(placed, (x0, y0), placed)

    # Photo conditions, then hairs on top.
    img = ImageChops.multiply(img, _lighting(rng, w, h))
    n_hairs = int(rng.poisson(hairiness))
    return _hairs(rng, img, n_hairs) if n_hairs else img
