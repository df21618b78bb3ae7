"""Synthetic Raabin-WBC-like dataset: white-blood-cell crops with exact masks, made from a seed.

One centred white blood cell per image on a stained smear with pale red blood cells. Shapes are
signed-distance fields (negative inside); the same fields paint the cell (soft, blurred borders)
and give the exact mask. Colours span the two real staining styles (yellow/cream background with
brownish-purple nuclei; white/pink background with violet nuclei) and sizes match the real crops'
pixel shares (background ~0.69, cytoplasm ~0.19, nucleus ~0.12).

Layouts (the same JPEG in both): <root>/Train/<Class>/<name>.jpg and
<root>/GrTh/Original/<Class>/<name>.jpg + <root>/GrTh/Ground Truth/<Class>/<name>.png (0/128/255).

    python synthetic.py --grid docs/synthetic_grid.png
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw

from utils import DataError

try:
    import fcntl
except ImportError:  # not POSIX: generation is not guarded against a second process
    fcntl = None

CLASSES = ("Basophil", "Eosinophil", "Lymphocyte", "Monocyte", "Neutrophil")
DEFAULT_ROOT: Path = Path(__file__).resolve().parent / "data" / "synthetic"
GENERATOR_VERSION = 1  # bump when the drawing changes so ensure_synthetic regenerates
MASK_GREY = np.array([0, 128, 255], dtype=np.uint8)  # label 0/1/2 -> grey value on disk
JPEG_QUALITY = 95
REFERENCE_SIZE = 128  # all lengths below are in pixels of a 128 px frame
# 400 per class gives test and val splits of 300 images. With 200 (150 test images), a ResNet18
# whose accuracy on 1,500 fresh images is 0.97-0.98 scored 0.940-0.973 on the test split,
# depending on its seed and the CPU's float rounding: too coarse for the figures users compare.
DEFAULT_PER_CLASS = 400

# Cell radius (mean, std, min, max) and nucleus share of the cell area (min, max) per class,
# measured on real Raabin-WBC segmentation crops rescaled to 128 px.
CELL_RADIUS = {"Basophil": (39, 4, 32, 46), "Eosinophil": (44, 3, 37, 49),
               "Lymphocyte": (32, 4, 25, 41), "Monocyte": (43, 5, 33, 52),
               "Neutrophil": (41, 4.5, 32, 51)}
NUCLEUS_SHARE = {"Basophil": (0.36, 0.55), "Eosinophil": (0.24, 0.40),
                 "Lymphocyte": (0.48, 0.72), "Monocyte": (0.38, 0.60),
                 "Neutrophil": (0.22, 0.46)}

# RGB anchors per stain, (yellow/cream style, white/pink style), set from the real crops'
# mean colours per class; a drawn stain mixes the two, plus jitter.
BACKGROUND_RGB = ((253, 244, 150), (255, 253, 255))
RBC_RGB = ((225, 185, 130), (238, 185, 200))
NUCLEUS_RGB = {"Basophil": ((105, 30, 90), (112, 34, 140)),
               "Eosinophil": ((140, 45, 90), (114, 24, 124)),
               "Lymphocyte": ((100, 26, 86), (60, 18, 122)),
               "Monocyte": ((142, 64, 100), (84, 14, 120)),
               "Neutrophil": ((106, 27, 83), (88, 17, 122))}
CYTOPLASM_RGB = {"Basophil": ((190, 128, 120), (208, 124, 190)),
                 "Eosinophil": ((190, 118, 92), (200, 104, 158)),
                 "Lymphocyte": ((188, 160, 128), (210, 150, 222)),
                 "Monocyte": ((204, 166, 132), (194, 148, 200)),
                 "Neutrophil": ((212, 154, 112), (212, 148, 186))}
GRANULE_RGB = {"Basophil": ((70, 25, 80), (60, 20, 100)),
               "Eosinophil": ((175, 85, 45), (200, 70, 110)),
               "Neutrophil": ((170, 105, 105), (180, 110, 165))}


# --------------------------------------------------------------------------- shapes (SDFs)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates (float32) of pixel centres."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Gaussian-blurred white noise rescaled to unit standard deviation."""
    field = cv2.GaussianBlur(rng.standard_normal((size, size), dtype=np.float32), (0, 0), sigma)
    return field / (field.std() + 1e-6)


def _ellipse_sdf(yy, xx, cy: float, cx: float, a: float, b: float, angle: float) -> np.ndarray:
    """Approximate signed distance to an ellipse (exact for circles; fine for soft shapes)."""
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    u, v = (dx * c + dy * s) / a, (-dx * s + dy * c) / b
    return (np.sqrt(u * u + v * v) - 1.0) * min(a, b)


def _capsule_sdf(yy, xx, p0: np.ndarray, p1: np.ndarray, half_width: float) -> np.ndarray:
    """Signed distance to a thick segment: the thin chromatin strand between two lobes."""
    d = p1 - p0
    t = np.clip(((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / (d @ d + 1e-6), 0.0, 1.0)
    return np.hypot(yy - p0[0] - t * d[0], xx - p0[1] - t * d[1]) - half_width


def _wobbly_disc_sdf(rng, yy, xx, cy: float, cx: float, radius: float, wobble: float) -> np.ndarray:
    """Disc whose polar radius carries a few random low harmonics (irregular round outline).

    cos(k*theta + phase) is the real part of exp(i*phase) * u**k with u = exp(i*theta),
    which avoids arctan2/cos over the whole grid.
    """
    z = (xx - cx) + 1j * (yy - cy)
    dist = np.abs(z)
    u = z / np.maximum(dist, 1e-6)
    r, power = np.ones_like(dist), u
    for k in range(2, 6):
        power = power * u
        amplitude = wobble / k * rng.uniform(0.3, 1.0)
        r += amplitude * (np.exp(1j * rng.uniform(0, 2 * np.pi)) * power).real
    return dist - radius * r


def _window(size: int, cy: float, cx: float, reach: float) -> tuple[slice, slice]:
    """Pixel box around (cy, cx) of half-side ``reach``, clipped to the frame (may be empty)."""
    y0, x0 = max(0, int(cy - reach)), max(0, int(cx - reach))
    return slice(y0, max(y0, min(size, int(cy + reach) + 2))), slice(x0, max(x0, min(size, int(cx + reach) + 2)))


# --------------------------------------------------------------------------- nucleus shapes
def _lobe_centres(rng, n: int, spacing: float, turn: float) -> np.ndarray:
    """Random walk of ``n`` points that keeps turning one way mostly (C / S shaped chains)."""
    heading, side = rng.uniform(0, 2 * np.pi), rng.choice([-1.0, 1.0])
    points = [np.zeros(2)]
    for _ in range(n - 1):
        heading += side * turn * rng.uniform(0.4, 1.3)
        if rng.random() < 0.15:
            side = -side
        points.append(points[-1] + spacing * rng.uniform(0.85, 1.15) *
                      np.array([np.sin(heading), np.cos(heading)]))
    points = np.array(points)
    return points - points.mean(axis=0)


def _lobed_nucleus_sdf(rng, yy, xx, centre, radius: float, n_lobes: int, share: float,
                       spacing: float, strand: float, max_elongation: float, roughness) -> np.ndarray:
    """Lobes (ellipses) on a curved chain joined by thin strands (neutrophil/eosinophil/basophil).

    The strands are added after the outline ``roughness`` so that noise never cuts them.
    """
    lobe_r = radius * np.sqrt(share / n_lobes)
    points = _lobe_centres(rng, n_lobes, spacing * lobe_r, turn=rng.uniform(0.9, 1.7))
    reach = np.abs(points).max() + lobe_r
    points *= min(1.0, 0.82 * radius / (reach + 1e-6))  # keep the chain inside the cell
    points += centre + rng.normal(0, 0.05 * radius, 2)
    lobes, strands = np.full(yy.shape, np.inf, np.float32), np.full(yy.shape, np.inf, np.float32)
    for i, (py, px) in enumerate(points):
        along = points[min(i + 1, n_lobes - 1)] - points[max(i - 1, 0)]  # lobes lie along the chain
        elongation = rng.uniform(1.0, max_elongation)
        a, b = lobe_r * np.sqrt(elongation), lobe_r / np.sqrt(elongation)
        angle = np.arctan2(along[0], along[1]) + rng.normal(0, 0.3)
        lobes = np.minimum(lobes, _ellipse_sdf(yy, xx, py, px, a, b, angle))
        if i:
            strands = np.minimum(strands, _capsule_sdf(yy, xx, points[i - 1], points[i], strand))
    return np.minimum(lobes + roughness, strands)


def _kidney_nucleus_sdf(rng, yy, xx, centre, radius: float, share: float, notch: float) -> np.ndarray:
    """Ellipse with a disc bitten out of one long side (monocyte kidney / folded nucleus)."""
    a = radius * np.sqrt(share / 0.85) * rng.uniform(1.0, 1.2)
    b = radius ** 2 * share / 0.85 / a
    angle = rng.uniform(0, np.pi)
    cy, cx = centre + rng.normal(0, 0.06 * radius, 2)
    sdf = _ellipse_sdf(yy, xx, cy, cx, a, b, angle)
    normal = np.array([np.cos(angle), -np.sin(angle)])  # (dy, dx) along the minor axis
    bite = np.array([cy, cx]) + normal * b * rng.uniform(0.8, 1.1)
    bite_sdf = _ellipse_sdf(yy, xx, bite[0], bite[1], notch * radius, notch * radius * 0.8, angle)
    return np.maximum(sdf, -bite_sdf)


def _nucleus_sdf(rng, class_name: str, yy, xx, centre, radius: float, roughness) -> np.ndarray:
    """Class-specific nucleus outline; ``share`` is the wanted nucleus/cell area ratio."""
    share = rng.uniform(*NUCLEUS_SHARE[class_name])
    if class_name == "Neutrophil":
        n = int(rng.integers(3, 6))
        return _lobed_nucleus_sdf(rng, yy, xx, centre, radius, n, share * 1.1,
                                  spacing=rng.uniform(2.0, 2.8), strand=radius * rng.uniform(0.045, 0.08),
                                  max_elongation=1.4, roughness=roughness)
    if class_name == "Eosinophil":
        return _lobed_nucleus_sdf(rng, yy, xx, centre, radius, 2, share * 1.05,
                                  spacing=rng.uniform(1.8, 2.6), strand=radius * rng.uniform(0.05, 0.09),
                                  max_elongation=1.25, roughness=roughness)
    if class_name == "Basophil":
        return _lobed_nucleus_sdf(rng, yy, xx, centre, radius, int(rng.integers(2, 4)), share * 1.2,
                                  spacing=rng.uniform(1.0, 1.5), strand=radius * 0.12,
                                  max_elongation=1.4, roughness=roughness)
    if class_name == "Monocyte":
        return _kidney_nucleus_sdf(rng, yy, xx, centre, radius, share * 0.95, rng.uniform(0.25, 0.45)) + roughness
    # Lymphocyte: round dense nucleus pushed to one side, sometimes slightly indented.
    nuc_r = radius * np.sqrt(share)
    offset = (radius - nuc_r) * rng.uniform(0.2, 0.9)
    direction = rng.uniform(0, 2 * np.pi)
    cy, cx = centre + offset * np.array([np.sin(direction), np.cos(direction)])
    sdf = _wobbly_disc_sdf(rng, yy, xx, cy, cx, nuc_r, wobble=0.08) + roughness
    if rng.random() < 0.3:
        return np.maximum(sdf, -_ellipse_sdf(yy, xx, cy + nuc_r * np.sin(direction + np.pi),
                                             cx + nuc_r * np.cos(direction + np.pi),
                                             0.3 * nuc_r, 0.3 * nuc_r, 0.0))
    return sdf


def _cell_geometry(rng, class_name: str, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Signed distances of the whole cell and of the nucleus (clipped inside the cell)."""
    scale = size / REFERENCE_SIZE
    yy, xx = _pixel_grid(size)
    mean, std, low, high = CELL_RADIUS[class_name]
    radius = float(np.clip(rng.normal(mean, std), low, high)) * scale
    centre = np.array([size / 2 - 0.5, size / 2 - 0.5]) + rng.normal(0, 2.0 * scale, 2)
    cell = _wobbly_disc_sdf(rng, yy, xx, *centre, radius, wobble=rng.uniform(0.03, 0.09))
    cell += 0.8 * scale * _smooth_noise(rng, size, 3.0 * scale)
    roughness = 0.025 * radius * _smooth_noise(rng, size, 4.0 * scale)
    nucleus = _nucleus_sdf(rng, class_name, yy, xx, centre, radius, roughness)
    rim = rng.uniform(1.0, 3.0) * scale  # the nucleus never touches the cell outline
    return cell, np.maximum(nucleus, cell + rim), centre, radius


# --------------------------------------------------------------------------- painting
def _mix(anchors, t: float, rng, jitter: float) -> np.ndarray:
    """Colour between the yellow (t=0) and white (t=1) stain anchors, with random jitter."""
    yellow, white = (np.array(a, np.float32) for a in anchors)
    return (1 - t) * yellow + t * white + rng.normal(0, jitter, 3).astype(np.float32)


def _alpha(sdf: np.ndarray, softness: float) -> np.ndarray:
    """Soft coverage: 0.5 exactly on the outline, so the hard mask sits mid-edge."""
    return np.clip(0.5 - sdf / softness, 0.0, 1.0)[..., None]


def _granules(rng, size: int, density: float, sigma: float) -> np.ndarray:
    """Blurred random dots in [0, 1]: cytoplasmic granules."""
    dots = (rng.random((size, size), dtype=np.float32) < density).astype(np.float32)
    dots = cv2.GaussianBlur(dots, (0, 0), sigma)
    return np.clip(dots / (dots.max() + 1e-6) * 1.6, 0, 1)[..., None]


def _paint_red_cells(rng, image, t: float, yy, xx, centre, radius: float, size: int) -> None:
    """Pale red blood cells behind the WBC; many cut by the frame or by the WBC edge."""
    scale = size / REFERENCE_SIZE
    colour = _mix(RBC_RGB, t, rng, 6)
    for _ in range(int(rng.integers(1, 9))):
        r = rng.uniform(11, 19) * scale
        for _attempt in range(10):  # keep the centre outside the WBC (overlap at its edge only)
            cy, cx = rng.uniform(-0.15 * size, 1.15 * size, 2)
            if np.hypot(cy - centre[0], cx - centre[1]) > radius + 0.3 * r:
                break
        box = _window(size, cy, cx, 1.2 * r + 4 * scale)
        d = _wobbly_disc_sdf(rng, yy[box], xx[box], cy, cx, r, wobble=0.08)
        inside = np.clip(0.5 - d / (1.2 * scale), 0, 1)
        ring = np.exp(-((d + 1.2 * scale) / (1.3 * scale)) ** 2)
        pallor = np.clip(1 - np.hypot(yy[box] - cy, xx[box] - cx) / (0.6 * r), 0, 1)
        tint = rng.uniform(0.05, 0.45) * (1 - 0.6 * pallor) * inside + rng.uniform(0.3, 0.8) * ring
        tint = np.clip(tint, 0, 1)[..., None]
        image[box] = image[box] * (1 - tint) + tint * colour


def _paint_debris(rng, image, t: float, yy, xx, size: int) -> None:
    """Occasional platelets and a neighbouring cell cut by the frame (all background)."""
    scale = size / REFERENCE_SIZE
    colour = _mix(NUCLEUS_RGB["Neutrophil"], t, rng, 10) * rng.uniform(1.0, 1.4)
    blobs = [(rng.uniform(0, size, 2), rng.uniform(1.5, 3.5) * scale)
             for _ in range(int(rng.poisson(0.8)))]
    if rng.random() < 0.15:  # a neighbouring white cell peeking in at a side
        side = rng.uniform(0, 2 * np.pi)
        blobs.append((size / 2 + 0.72 * size * np.array([np.sin(side), np.cos(side)]),
                      rng.uniform(12, 20) * scale))
    for (cy, cx), r in blobs:
        box = _window(size, cy, cx, 1.3 * r + 3 * scale)
        d = _wobbly_disc_sdf(rng, yy[box], xx[box], cy, cx, r, 0.2)
        a = _alpha(d, 1.5 * scale) * rng.uniform(0.5, 0.9)
        image[box] = image[box] * (1 - a) + colour * a


def _paint_cell(rng, image, class_name: str, t: float, cell, nucleus, size: int) -> None:
    """Cytoplasm (granules, darker membrane) then nucleus (chromatin texture) over the smear."""
    scale = size / REFERENCE_SIZE
    soft = rng.uniform(0.8, 2.2) * scale
    cyto = _mix(CYTOPLASM_RGB[class_name], t, rng, 10)
    texture = 1 + 0.05 * _smooth_noise(rng, size, 1.2 * scale)[..., None]
    cyto_img = cyto * texture
    if class_name in ("Neutrophil", "Eosinophil"):
        coarse = class_name == "Eosinophil"
        g = _granules(rng, size, 0.12 if coarse else 0.25, (0.9 if coarse else 0.6) * scale)
        g *= rng.uniform(0.5, 0.9) if coarse else rng.uniform(0.2, 0.5)
        cyto_img = cyto_img * (1 - g) + _mix(GRANULE_RGB[class_name], t, rng, 8) * g
    membrane = np.exp(np.minimum(cell, 0) / (rng.uniform(1.0, 2.5) * scale))[..., None]
    cyto_img *= 1 - rng.uniform(0.08, 0.4) * membrane
    a = _alpha(cell, soft)
    image[:] = image * (1 - a) + cyto_img * a

    nuc = _mix(NUCLEUS_RGB[class_name], t, rng, 8) * rng.uniform(0.8, 1.12)
    nuc += rng.uniform(0.0, 0.25) * (cyto - nuc)  # some smears show little nucleus contrast
    chromatin = 1 + rng.uniform(0.04, 0.12) * _smooth_noise(rng, size, 1.5 * scale)[..., None]
    edge = np.exp(np.minimum(nucleus, 0) / (1.5 * scale))[..., None]
    a = _alpha(nucleus, soft)
    image[:] = image * (1 - a) + nuc * chromatin * (1 - 0.12 * edge) * a
    if class_name == "Basophil":  # dark granules over cytoplasm and nucleus alike
        g = _granules(rng, size, 0.15, 0.8 * scale) * rng.uniform(0.5, 0.9) * _alpha(cell, soft)
        image[:] = image * (1 - g) + _mix(GRANULE_RGB["Basophil"], t, rng, 8) * g


def _camera_finish(rng, image: np.ndarray, size: int) -> np.ndarray:
    """Uneven light, defocus blur, global stain shift and sensor noise; returns uint8 RGB."""
    scale = size / REFERENCE_SIZE
    image *= 1 + 0.025 * _smooth_noise(rng, size, 20 * scale)[..., None]
    image = cv2.GaussianBlur(image, (0, 0), (0.4 + 1.4 * rng.random() ** 2) * scale)
    rgb = np.clip(image, 0, 255).astype(np.uint8)
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.normal(0, 2)) % 180
    hsv[..., 1] *= rng.uniform(0.8, 1.2)
    hsv[..., 2] *= rng.uniform(0.98, 1.06)
    rgb = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    rgb += rng.uniform(0.5, 3.0) * rng.standard_normal(rgb.shape, dtype=np.float32)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def _stain_mix(rng) -> float:
    """0 = yellow/cream style, 1 = white/pink style; mostly near one of them, as in the data."""
    kind = rng.choice(3, p=[0.55, 0.35, 0.1])
    return float((rng.uniform(0, 0.25), rng.uniform(0.85, 1.0), rng.uniform(0, 1))[kind])


def render_cell(rng: np.random.Generator, class_name: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw one smear crop of ``class_name``.

    Returns an ``image_size``x``image_size``x3 uint8 RGB image and a label mask of the same
    size (uint8: 0 background incl. red cells and debris, 1 cytoplasm, 2 nucleus).
    """
    if class_name not in CLASSES:
        raise ValueError(f"unknown class {class_name!r}; expected one of {CLASSES}")
    yy, xx = _pixel_grid(image_size)
    t = _stain_mix(rng)
    cell, nucleus, centre, radius = _cell_geometry(rng, class_name, image_size)
    background = _mix(BACKGROUND_RGB, t, rng, 4)
    background[2] += (1 - t) * rng.normal(0, 18)  # cream backgrounds vary most in blue
    image = np.broadcast_to(np.minimum(background, 255), (image_size, image_size, 3)).copy()
    image *= 1 + 0.015 * _smooth_noise(rng, image_size, 1.5)[..., None]
    _paint_red_cells(rng, image, t, yy, xx, centre, radius, image_size)
    _paint_debris(rng, image, t, yy, xx, image_size)
    _paint_cell(rng, image, class_name, t, cell, nucleus, image_size)
    mask = np.zeros((image_size, image_size), np.uint8)
    mask[cell < 0] = 1
    mask[nucleus < 0] = 2
    return _camera_finish(rng, image, image_size), mask


# --------------------------------------------------------------------------- dataset on disk
def _parameters(per_class: int, image_size: int, seed: int) -> dict:
    return {"generator_version": GENERATOR_VERSION, "classes": list(CLASSES),
            "per_class": per_class, "image_size": image_size, "seed": seed}


def _encode(array: np.ndarray, fmt: str) -> bytes:
    """JPEG (RGB image) or PNG (grey mask) bytes; encoding in memory lets one JPEG serve both layouts."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **({"quality": JPEG_QUALITY} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _write_class(folder: Path, class_index: int, per_class: int, image_size: int, seed: int) -> None:
    """Write one class in both layouts; each image has its own seed, independent of per_class."""
    name = CLASSES[class_index]
    dirs = [folder / "Train" / name, folder / "GrTh" / "Original" / name, folder / "GrTh" / "Ground Truth" / name]
    for d in dirs:
        d.mkdir(parents=True)
    for i in range(per_class):
        image, mask = render_cell(np.random.default_rng([seed, class_index, i]), name, image_size)
        jpeg = _encode(image, "JPEG")
        (dirs[0] / f"{i:04d}.jpg").write_bytes(jpeg)
        (dirs[1] / f"{i:04d}.jpg").write_bytes(jpeg)
        (dirs[2] / f"{i:04d}.png").write_bytes(_encode(MASK_GREY[mask], "PNG"))


def _replace_dir(new: Path, root: Path) -> None:
    """Move ``new`` to ``root``; an old synthetic ``root`` is moved aside first, then deleted."""
    old = None
    if root.exists():
        if any(root.iterdir()) and not (root / "synthetic.json").exists():
            raise DataError(f"{root} exists and is not a synthetic dataset; refusing to replace it "
                            f"(move it away, or pass --data to train on it)")
        old = root.with_name(f".{root.name}.{os.getpid()}.old.tmp")
        root.rename(old)
    new.rename(root)
    if old is not None:
        shutil.rmtree(old)


def generate_synthetic(root: Path, per_class: int = DEFAULT_PER_CLASS, image_size: int = 128,
                       seed: int = 0) -> Path:
    """Write the dataset to ``root`` (replacing an older synthetic one) and return ``root``.

    Everything goes to a temporary sibling folder that is renamed into place at the end, with
    ``synthetic.json`` written last, so an interrupted run never looks like a complete dataset.
    """
    if per_class < 1 or image_size < 32:
        raise ValueError("per_class must be >= 1 and image_size >= 32")
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".{root.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for class_index in range(len(CLASSES)):
            _write_class(tmp, class_index, per_class, image_size, seed)
        (tmp / "synthetic.json").write_text(json.dumps(_parameters(per_class, image_size, seed), indent=2) + "\n")
        _replace_dir(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _read_parameters(root: Path) -> dict | None:
    try:
        return json.loads((root / "synthetic.json").read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _generation_lock(root: Path) -> Iterator[None]:
    """Held while one process generates ``root``: torchrun ranks and parallel jobs that all find
    it missing would otherwise rename it away under each other."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.with_name(f".{root.name}.lock"), "w") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def ensure_synthetic(root: Path | None = None, per_class: int = DEFAULT_PER_CLASS, image_size: int = 128,
                     seed: int = 0) -> Path:
    """Return ``root`` (default ``DEFAULT_ROOT``), generating it first if missing or made differently."""
    root = Path(root) if root is not None else DEFAULT_ROOT
    wanted = _parameters(per_class, image_size, seed)
    if _read_parameters(root) == wanted:
        return root
    with _generation_lock(root):
        if _read_parameters(root) != wanted:  # another process may have made it while this one waited
            print(f"generating synthetic WBC data: {per_class} x {len(CLASSES)} images of "
                  f"{image_size}px (seed {seed}) in {root}", flush=True)
            generate_synthetic(root, per_class, image_size, seed)
    return root


# --------------------------------------------------------------------------- preview
def _colour_mask(grey: np.ndarray) -> np.ndarray:
    """Grey mask -> RGB: background black, cytoplasm teal, nucleus magenta."""
    palette = np.array([[0, 0, 0], [40, 170, 170], [200, 40, 160]], np.uint8)
    return palette[np.searchsorted(MASK_GREY, grey).clip(0, 2)]


def save_preview_grid(root: Path, out_png: Path, per_class: int = 5) -> None:
    """One row per class: ``per_class`` images, each followed by its coloured mask."""
    root, out_png = Path(root), Path(out_png)
    tile, label_w, gap = 128, 96, 4
    canvas = Image.new("RGB", (label_w + per_class * (2 * tile + gap), len(CLASSES) * (tile + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, name in enumerate(CLASSES):
        files = sorted((root / "GrTh" / "Original" / name).glob("*.jpg"))[:per_class]
        if not files:
            raise FileNotFoundError(f"no images in {root / 'GrTh' / 'Original' / name}")
        top = row * (tile + gap)
        draw.text((6, top + tile // 2 - 6), name, fill="black")
        for col, path in enumerate(files):
            grey = np.array(Image.open(root / "GrTh" / "Ground Truth" / name / f"{path.stem}.png").convert("L"))
            left = label_w + col * (2 * tile + gap)
            canvas.paste(Image.open(path).convert("RGB").resize((tile, tile), Image.BILINEAR), (left, top))
            mask = Image.fromarray(_colour_mask(grey)).resize((tile, tile), Image.NEAREST)
            canvas.paste(mask, (left + tile, top))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_png)


# --------------------------------------------------------------------------- CLI
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Generate a synthetic Raabin-WBC-like dataset.")
    parser.add_argument("--out", type=Path, default=DEFAULT_ROOT, help="dataset root folder")
    parser.add_argument("--per-class", type=int, default=DEFAULT_PER_CLASS, help="images per class")
    parser.add_argument("--image-size", type=int, default=128, help="square image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=Path, default=None, help="also save a preview grid PNG here")
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    return parser


def main(args: argparse.Namespace) -> None:
    if args.force:
        print(f"generating synthetic WBC data in {args.out}", flush=True)
        generate_synthetic(args.out, args.per_class, args.image_size, args.seed)
    else:
        ensure_synthetic(args.out, args.per_class, args.image_size, args.seed)
    if args.grid is not None:
        save_preview_grid(args.out, args.grid)
        print(f"preview grid written to {args.grid}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
