"""A PNG overview of an image with its labels: axial, coronal and sagittal slices plus text lines."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence, Tuple, Union

import numpy as np

from medautolabel.geometry import reorient
from medautolabel.image import Image
from medautolabel.io.atomic import atomic_output
from medautolabel.text import printable

Color = Tuple[float, float, float]
PANEL_PX = 320  # each view is scaled to this height (aspect kept in millimetres)


def _window(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return (np.clip((values.astype(np.float32) - low) / (high - low), 0.0, 1.0) * 255).astype(np.uint8)


def _views(image: Image, labels: Image) -> Sequence[Tuple[str, np.ndarray, np.ndarray, Tuple[float, float]]]:
    """(name, grey slice, label slice, (row mm, column mm)) through the labels' centre, radiological display."""
    img, m = reorient(image.array, image.ijk_to_ras, "RAS")  # (k, j, i) = (S, A, R)
    lab, _ = reorient(labels.array, labels.ijk_to_ras, "RAS")
    sp_i, sp_j, sp_k = np.linalg.norm(m[:3, :3], axis=0)
    where = np.argwhere(lab > 0)
    k, j, i = (where.mean(axis=0).round().astype(int) if len(where) else np.array(lab.shape) // 2)
    # Rows run superior->inferior / anterior->posterior; the patient's right is on the viewer's left.
    return [
        ("axial", img[k, ::-1, ::-1], lab[k, ::-1, ::-1], (sp_j, sp_i)),
        ("coronal", img[::-1, j, ::-1], lab[::-1, j, ::-1], (sp_k, sp_i)),
        ("sagittal", img[::-1, :, i][:, ::-1], lab[::-1, :, i][:, ::-1], (sp_k, sp_j)),
    ]


def overview_png(image: Image, labels: Image, colors: Dict[int, Color], lines: Sequence[str],
                 path: Union[str, Path], window: Tuple[float, float] = (-200.0, 600.0)) -> Path:
    """Write ``path``: three slices with each label value drawn in its colour (half transparent), then ``lines``
    (which quote label names: made inert, one line each)."""
    from PIL import Image as PILImage
    from PIL import ImageDraw, ImageFont

    if labels.array.shape != image.array.shape or not np.allclose(labels.ijk_to_ras, image.ijk_to_ras, atol=1e-4):
        raise ValueError("the labels must be on the image's grid")
    panels = []
    for name, grey, lab, (row_mm, col_mm) in _views(image, labels):
        rgb = np.repeat(_window(grey, *window)[..., None], 3, axis=2).astype(np.float32)
        for value, color in colors.items():
            mask = lab == value
            rgb[mask] = 0.45 * rgb[mask] + 0.55 * 255 * np.asarray(color, dtype=np.float32)
        panel = PILImage.fromarray(rgb.astype(np.uint8))
        height_mm, width_mm = grey.shape[0] * row_mm, grey.shape[1] * col_mm
        size = (max(1, round(PANEL_PX * width_mm / height_mm)), PANEL_PX)
        panel = panel.resize(size, PILImage.NEAREST)
        ImageDraw.Draw(panel).text((6, 4), name, fill=(255, 255, 0))
        panels.append(panel)
    font = ImageFont.load_default(size=15)
    text_h = 22 * max(1, len(lines)) + 10
    width = sum(p.width for p in panels) + 10 * (len(panels) + 1)
    canvas = PILImage.new("RGB", (width, PANEL_PX + 20 + text_h), (0, 0, 0))
    x = 10
    for p in panels:
        canvas.paste(p, (x, 10))
        x += p.width + 10
    draw = ImageDraw.Draw(canvas)
    for n, line in enumerate(lines):
        draw.text((10, PANEL_PX + 20 + 22 * n), printable(line), fill=(255, 255, 255), font=font)
    target = Path(path)
    with atomic_output(target) as tmp:
        canvas.save(tmp, format="PNG")
    return target
