"""Procedural conveyor photos: products on a moving belt, seen from an overhead camera.

Each class is a product *design* (shape, body colour, label pattern) fixed by its index, so sets
generated with different seeds share their classes; each photo varies pose, scale, position,
lighting, shadow, motion blur, sensor noise, partial occlusion and JPEG quality. Same seed, same
bytes. The layout is an ImageFolder tree (``OUT/<label>/<label>-<n>.jpg``) plus ``skus.json``.

``hard=True`` is the catalogue a recipe can fail on (the default one saturates at 1.000): products come
in families of three that share shape and body colour and differ only in their print (its colour, or
its pattern), as flavours of one product line do; each photo shows one of several poses (lying on its
printed face, on its side, foreshortened, or upside down with only a small label showing), neighbouring
parcels cut by the frame, loose clutter (tape, slips) and specular glare.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from sorter.errors import ConfigError

KINDS = ("box", "bottle", "can", "pouch", "tube", "jar", "bag", "tray")
COLOURS = {  # RGB, chosen far apart so lighting changes do not carry one into another
    "red": (200, 30, 35),
    "green": (40, 160, 60),
    "blue": (35, 70, 200),
    "yellow": (235, 205, 40),
    "white": (235, 235, 230),
    "black": (30, 30, 34),
    "orange": (240, 125, 25),
    "purple": (130, 50, 160),
    "brown": (150, 100, 60),
    "teal": (20, 150, 150),
}
PATTERNS = ("stripes", "dots", "band", "checker", "logo", "plain")
INKS = ("red", "blue", "green")  # print colours of the fine-grained catalogue's variants
FAMILY = 3  # hard catalogue: designs per family (same shape and body colour)
POSES = {"face": 0.6, "side": 0.3, "back": 0.1}  # hard photos: which side of the item the camera sees


@dataclass(frozen=True)
class ProductDesign:
    kind: str
    colour: str
    pattern: str
    sku: str
    ink: str | None = None  # print colour; None: black or white, whichever contrasts with the body

    @property
    def label(self) -> str:
        return f"{self.kind}-{self.colour}-{self.pattern}" + (f"-{self.ink}-ink" if self.ink else "")


def _sku(i: int) -> str:
    return f"SKU-{100000 + 7919 * i % 900000:06d}"


def fine_catalog(n: int) -> list[ProductDesign]:
    """The hard catalogue: families of ``FAMILY`` designs sharing shape and body colour. In a family, the
    second design differs from the first only by the colour of its print, the third only by its pattern."""
    if n < 1:
        raise ConfigError("need at least one class")
    colours = list(COLOURS)
    families = 32  # (kind, colour) pairs the family index walks through before it repeats one
    if n > families * FAMILY:
        raise ConfigError(f"at most {families * FAMILY} classes can be generated")
    designs = []
    for i in range(n):
        f, member = divmod(i, FAMILY)
        kind, colour = KINDS[f % len(KINDS)], colours[(f * 3 + f // len(KINDS)) % len(colours)]
        pattern = PATTERNS[f % (len(PATTERNS) - 1)]  # never "plain": the print is what tells them apart
        if member == 1:
            designs.append(ProductDesign(kind, colour, pattern, _sku(i), ink=next(c for c in INKS if c != colour)))
        elif member == 2:
            designs.append(ProductDesign(kind, colour, PATTERNS[(f + 2) % (len(PATTERNS) - 1)], _sku(i)))
        else:
            designs.append(ProductDesign(kind, colour, pattern, _sku(i)))
    if len({d.label for d in designs}) != len(designs):  # pragma: no cover - guarded by the limit above
        raise ConfigError("the hard catalogue repeated a class")
    return designs


def catalog(n: int, hard: bool = False) -> list[ProductDesign]:
    """The first ``n`` product designs: the same list for every seed. Designs differ in shape first,
    then colour, then pattern, so small catalogs are made of clearly different products (``hard``:
    the fine-grained families of ``fine_catalog``)."""
    if hard:
        return fine_catalog(n)
    if n < 1:
        raise ConfigError("need at least one class")
    combos = list(itertools.product(range(len(PATTERNS)), range(len(COLOURS)), range(len(KINDS))))
    if n > len(combos):
        raise ConfigError(f"at most {len(combos)} classes can be generated")
    colours = list(COLOURS)
    designs = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        colour = colours[(i * 3 + i // len(KINDS)) % len(colours)]
        pattern = PATTERNS[(i + i // len(KINDS) * 2) % len(PATTERNS)]
        designs.append(ProductDesign(kind, colour, pattern, sku=_sku(i)))
    labels = [d.label for d in designs]
    if len(set(labels)) != len(labels):  # fall back to exhaustive enumeration for very large catalogs
        designs = [ProductDesign(KINDS[k], colours[c], PATTERNS[p], _sku(i)) for i, (p, c, k) in enumerate(combos[:n])]
    return designs


def _contrast(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return (20, 20, 24) if sum(rgb) > 420 else (240, 240, 235)


def _shape_mask(kind: str, w: int, h: int) -> np.ndarray:
    """Silhouette of the product in its own frame (w x h), as a uint8 mask."""
    m = np.zeros((h, w), np.uint8)
    if kind == "box":
        m[:] = 255
    elif kind == "bottle":
        cv2.rectangle(m, (int(w * 0.15), int(h * 0.3)), (int(w * 0.85), h - 1), 255, -1)
        cv2.ellipse(m, (w // 2, int(h * 0.3)), (int(w * 0.35), int(h * 0.12)), 0, 180, 360, 255, -1)
        cv2.rectangle(m, (int(w * 0.38), 0), (int(w * 0.62), int(h * 0.25)), 255, -1)
    elif kind == "can":
        cv2.circle(m, (w // 2, h // 2), min(w, h) // 2 - 1, 255, -1)
    elif kind == "pouch":
        pts = np.array([[w * 0.1, h * 0.12], [w * 0.9, h * 0.12], [w, h - 1], [0, h - 1]], np.int32)
        cv2.fillPoly(m, [pts], 255)
        for x in range(0, w, max(4, w // 12)):  # zig-zag seal
            cv2.line(m, (x, int(h * 0.12)), (x + w // 24, 0), 255, max(2, w // 24))
    elif kind == "tube":
        cv2.rectangle(m, (int(w * 0.3), int(h * 0.1)), (int(w * 0.7), h - 1), 255, -1)
        cv2.rectangle(m, (int(w * 0.25), 0), (int(w * 0.75), int(h * 0.12)), 255, -1)
    elif kind == "jar":
        cv2.ellipse(m, (w // 2, h // 2), (w // 2 - 1, int(h * 0.42)), 0, 0, 360, 255, -1)
        cv2.rectangle(m, (int(w * 0.2), 0), (int(w * 0.8), int(h * 0.18)), 255, -1)
    elif kind == "bag":
        pts = np.array(
            [[w * 0.2, 0], [w * 0.8, h * 0.05], [w, h * 0.5], [w * 0.85, h - 1], [w * 0.1, h * 0.95], [0, h * 0.45]],
            np.int32,
        )
        cv2.fillPoly(m, [pts], 255)
    elif kind == "tray":
        cv2.rectangle(m, (0, int(h * 0.2)), (w - 1, int(h * 0.8)), 255, -1)
    return m


def _shape_size(kind: str) -> tuple[float, float]:
    return {
        "box": (1.0, 0.75),
        "bottle": (0.45, 1.0),
        "can": (0.7, 0.7),
        "pouch": (0.7, 0.85),
        "tube": (0.4, 1.1),
        "jar": (0.65, 0.8),
        "bag": (0.85, 0.9),
        "tray": (1.1, 0.9),
    }[kind]


def _paint_product(design: ProductDesign, w: int, h: int, rng: np.random.Generator, pose: str = "face") -> np.ndarray:
    body = np.array(COLOURS[design.colour], np.float32)
    body = np.clip(body * rng.uniform(0.9, 1.1) + rng.normal(0, 6, 3), 0, 255)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = body.astype(np.uint8)
    ink = COLOURS[design.ink] if design.ink else _contrast(COLOURS[design.colour])
    s = max(4, min(w, h) // 10)
    if pose == "back":  # upside down: a plain back with a small price label in the print colour
        x0, y0 = int(w * rng.uniform(0.15, 0.45)), int(h * rng.uniform(0.15, 0.5))
        cv2.rectangle(img, (x0, y0), (x0 + w // 3, y0 + h // 5), (240, 240, 236), -1)
        cv2.rectangle(img, (x0 + 2, y0 + 2), (x0 + w // 10, y0 + h // 5 - 2), ink, -1)
        return img
    if design.pattern == "stripes":
        for y in range(0, h, 2 * s):
            cv2.rectangle(img, (0, y), (w, y + s // 2 + 2), ink, -1)
    elif design.pattern == "dots":
        for y in range(s, h, 2 * s):
            for x in range(s, w, 2 * s):
                cv2.circle(img, (x, y), max(2, s // 2), ink, -1)
    elif design.pattern == "band":
        cv2.rectangle(img, (0, int(h * 0.4)), (w, int(h * 0.65)), (245, 245, 240), -1)
        for x in range(int(w * 0.15), int(w * 0.85), max(3, s // 3)):  # barcode on the band
            cv2.line(img, (x, int(h * 0.45)), (x, int(h * 0.6)), ink if design.ink else (15, 15, 15), max(1, s // 6))
    elif design.pattern == "checker":
        for y in range(0, h, s):
            for x in range(0, w, s):
                if (x // s + y // s) % 2 == 0:
                    cv2.rectangle(img, (x, y), (x + s - 1, y + s - 1), ink, -1)
    elif design.pattern == "logo":
        r = min(w, h) // 4
        cv2.circle(img, (w // 2, h // 2), r, ink, -1)
        cv2.circle(img, (w // 2, h // 2), r // 2, tuple(int(c) for c in body), -1)
    # every product carries a printed code label, like real packaging
    cv2.putText(
        img,
        design.sku[-4:],
        (int(w * 0.12), int(h * 0.9)),
        cv2.FONT_HERSHEY_SIMPLEX,
        max(0.3, w / 260),
        ink,
        max(1, w // 120),
        cv2.LINE_AA,
    )
    return img


def _belt(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    grey = rng.uniform(45, 95)
    tint = rng.normal(0, 4, 3)
    texture = rng.standard_normal((height, width, 1), dtype=np.float32) * 7
    belt = np.clip(grey + tint.astype(np.float32) + texture, 0, 255).astype(np.uint8)
    belt = cv2.GaussianBlur(belt, (3, 3), 0)
    offset, pitch = rng.integers(0, 200), rng.integers(140, 260)
    for x in range(int(offset) % int(pitch), width, int(pitch)):  # belt seams, across the direction of travel
        cv2.line(belt, (x, 0), (x, height), (int(grey * 0.6),) * 3, 2)
    rail = max(6, height // 20)
    metal = (170, 172, 176)
    cv2.rectangle(belt, (0, 0), (width, rail), metal, -1)
    cv2.rectangle(belt, (0, height - rail), (width, height), metal, -1)
    return belt


Where = Callable[[np.random.Generator], tuple[float, float, float]]  # draws (angle, cx, cy)


def _place(
    frame: np.ndarray, design: ProductDesign, rng: np.random.Generator, base: float, where: Where, pose: str = "face"
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, int, int]]:
    """Paint ``design`` at the angle and centre ``where`` draws (after the paint: the draws' order is part of
    "same seed, same bytes"); returns the item's RGB layer, its alpha and ``(cx, cy, w, h)``."""
    height, width = frame.shape[:2]
    fw, fh = _shape_size(design.kind)
    w, h = max(16, int(base * fw)), max(16, int(base * fh))
    product = _paint_product(design, w, h, rng, pose)
    mask = _shape_mask(design.kind, w, h)
    if pose == "side":  # lying on its side, seen at a slant: the printed face foreshortened
        squash = rng.uniform(0.45, 0.7)
        h = max(12, int(h * squash))
        product = cv2.resize(product, (w, h), interpolation=cv2.INTER_AREA)
        mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    diag = int(math.hypot(w, h)) + 4
    canvas_p = np.zeros((diag, diag, 3), np.uint8)
    canvas_m = np.zeros((diag, diag), np.uint8)
    y0, x0 = (diag - h) // 2, (diag - w) // 2
    canvas_p[y0 : y0 + h, x0 : x0 + w] = product
    canvas_m[y0 : y0 + h, x0 : x0 + w] = mask
    angle, cx, cy = where(rng)
    rot = cv2.getRotationMatrix2D((diag / 2, diag / 2), angle, 1.0)
    rot[:, 2] += (cx - diag / 2, cy - diag / 2)
    warped = cv2.warpAffine(canvas_p, rot, (width, height), flags=cv2.INTER_LINEAR)
    alpha = cv2.warpAffine(canvas_m, rot, (width, height), flags=cv2.INTER_LINEAR).astype(np.float32) / 255
    return warped, alpha, (cx, cy, w, h)


def _composite(frame: np.ndarray, warped: np.ndarray, alpha: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Soft shadow cast away from the light, then the item over the belt."""
    height, width = frame.shape[:2]
    shift = np.float32([[1, 0, rng.uniform(4, 14)], [0, 1, rng.uniform(4, 14)]])
    shadow = cv2.GaussianBlur(cv2.warpAffine(alpha, shift, (width, height)), (0, 0), 6)
    frame *= (1 - 0.5 * shadow)[..., None]
    return frame * (1 - alpha[..., None]) + warped.astype(np.float32) * alpha[..., None]


def _neighbours(
    frame: np.ndarray, others: Sequence[ProductDesign], rng: np.random.Generator, base: float
) -> np.ndarray:
    """One or two other products on the belt before or after this one, cut by the frame's edge."""
    height, width = frame.shape[:2]
    for _ in range(int(rng.integers(1, 3))):
        other = others[int(rng.integers(len(others)))]
        side = rng.choice([-1, 1])
        pose = rng.choice(list(POSES), p=list(POSES.values()))

        def edge(r: np.random.Generator, side: int = side) -> tuple[float, float, float]:
            cx = width / 2 + side * width * r.uniform(0.5, 0.62)
            return r.uniform(0, 360), cx, r.uniform(height * 0.3, height * 0.7)

        warped, alpha, _ = _place(frame, other, rng, base * rng.uniform(0.8, 1.1), edge, pose)
        frame = _composite(frame, warped, alpha, rng)
    return frame


def _clutter(frame: np.ndarray, rng: np.random.Generator) -> None:
    """Loose tape, delivery slips and debris anywhere on the belt (over the item too)."""
    height, width = frame.shape[:2]
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        long, short = rng.uniform(0.05, 0.2) * width, rng.uniform(0.01, 0.04) * width
        box = cv2.boxPoints(((cx, cy), (long, short), rng.uniform(0, 180))).astype(np.int32)
        colour = [(200, 170, 110), (235, 235, 230), (120, 110, 100)][int(rng.integers(3))]  # tape, paper, dirt
        cv2.fillPoly(frame, [box], colour)


def _glare(frame: np.ndarray, alpha: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A specular highlight from the tunnel's lights on the item's glossy film, saturating part of it."""
    height, width = frame.shape[:2]
    ys, xs = np.nonzero(alpha > 0.5)
    if len(xs) == 0:
        return frame
    k = int(rng.integers(len(xs)))
    sx, sy = rng.uniform(0.04, 0.12) * width, rng.uniform(0.03, 0.08) * width
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    blob = np.exp(-(((xx - xs[k]) / sx) ** 2 + ((yy - ys[k]) / sy) ** 2))
    return frame + (rng.uniform(120, 260) * blob * alpha)[..., None]


def render(
    design: ProductDesign,
    rng: np.random.Generator,
    size: tuple[int, int] = (640, 480),
    quality: int | None = None,
    *,
    hard: bool = False,
    others: Sequence[ProductDesign] = (),
) -> bytes:
    """One JPEG photo of ``design`` on a belt (``hard``: a random pose, neighbours drawn from ``others``,
    clutter and glare; see the module's docstring)."""
    width, height = size
    frame = _belt(width, height, rng).astype(np.float32)

    base = min(width, height) * rng.uniform(0.45, 0.65)
    pose = rng.choice(list(POSES), p=list(POSES.values())) if hard else "face"
    if hard and others and rng.random() < 0.6:
        frame = _neighbours(frame, others, rng, base)

    def middle(r: np.random.Generator) -> tuple[float, float, float]:
        # random rotation (overhead camera: any angle), position mostly inside the frame
        return r.uniform(0, 360), r.uniform(width * 0.3, width * 0.7), r.uniform(height * 0.35, height * 0.65)

    warped, alpha, (cx, cy, w, h) = _place(frame, design, rng, base, middle, pose)
    frame = _composite(frame, warped, alpha, rng)
    if hard and rng.random() < 0.4:
        frame = _glare(frame, alpha, rng)
    if hard and rng.random() < 0.5:
        _clutter(frame, rng)

    # partial occlusion: a guard bar or a neighbouring parcel's corner over part of the item
    if rng.random() < 0.3:
        ox = int(cx + rng.choice([-1, 1]) * w * rng.uniform(0.3, 0.6))
        oy = int(cy + rng.uniform(-0.4, 0.4) * h)
        half = int(base * rng.uniform(0.2, 0.35))
        colour = (165, 125, 85) if rng.random() < 0.5 else (60, 60, 64)  # cardboard or steel
        cv2.rectangle(frame, (ox - half, oy - half), (ox + half, oy + half), colour, -1)

    # lighting: global gain, a gradient across the belt, colour temperature
    gx = np.linspace(rng.uniform(0.75, 1.0), rng.uniform(1.0, 1.25), width, dtype=np.float32)
    gain = rng.uniform(0.8, 1.15)
    temperature = np.array([1 + rng.uniform(-0.06, 0.06), 1.0, 1 + rng.uniform(-0.06, 0.06)], np.float32)
    frame = frame * gain * gx[None, :, None] * temperature

    # motion blur along the belt (x), then sensor noise
    if rng.random() < 0.6:
        k = int(rng.integers(3, 10))
        kernel = np.zeros((1, k), np.float32)
        kernel[0, :] = 1.0 / k
        frame = cv2.filter2D(frame, -1, kernel)
    frame += rng.standard_normal(frame.shape, dtype=np.float32) * rng.uniform(1.5, 5)
    rgb = np.clip(frame, 0, 255).astype(np.uint8)

    q = int(quality if quality is not None else rng.integers(55, 95))
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, q])
    if not ok:  # pragma: no cover - OpenCV always encodes a valid uint8 image
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def generate(
    classes: int, per_class: int, seed: int = 0, size: tuple[int, int] = (640, 480), hard: bool = False
) -> Iterator[tuple[ProductDesign, int, bytes]]:
    """Yield ``(design, index, jpeg_bytes)``; deterministic in ``(classes, per_class, seed, size, hard)``."""
    designs = catalog(classes, hard)
    for class_index, design in enumerate(designs):
        rng = np.random.default_rng([seed, class_index])
        for n in range(per_class):
            yield design, n, render(design, rng, size, hard=hard, others=designs)


def write_dataset(
    out: Path,
    classes: int,
    per_class: int,
    seed: int = 0,
    size: tuple[int, int] = (640, 480),
    progress=None,
    hard: bool = False,
) -> list[ProductDesign]:
    """Write an ImageFolder tree under ``out`` and ``out/skus.json`` (label -> SKU)."""
    designs = catalog(classes, hard)
    out.mkdir(parents=True, exist_ok=True)
    for design, n, data in generate(classes, per_class, seed, size, hard):
        folder = out / design.label
        folder.mkdir(exist_ok=True)
        (folder / f"{design.label}-{n:05d}.jpg").write_bytes(data)
        if progress is not None:
            progress()
    (out / "skus.json").write_text(json.dumps({d.label: d.sku for d in designs}, indent=2) + "\n")
    return designs
