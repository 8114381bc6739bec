"""The project's data: PNG images in one folder per class (`root/<class>/*.png`), as tensors.

The class folders' sorted names are the labels 0..k-1, as torchvision's ImageFolder numbers
them; `test_root` holds the test images in the same layout (read only by `hpsearch retrain`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def _read(root: Path, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).glob("*.png")):
            with Image.open(path) as image:
                array = np.asarray(image.convert("L"), dtype=np.uint8)
            images.append(array)
            labels.append(label)
    if not images:
        raise ValueError(f"no PNG images under {root}/<class>/")
    x = torch.from_numpy(np.stack(images)).unsqueeze(1)  # uint8 [N, 1, H, W]
    return x, torch.tensor(labels)


def load(root: str, test_root: str | None = None) -> dict[str, torch.Tensor]:
    """Train images from `root`, test images from `test_root`; uint8 pixels, int labels."""
    train = Path(root)
    if not train.is_dir():
        raise FileNotFoundError(f"{train}: no such folder")
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    x, y = _read(train, classes)
    out = {"train_x": x, "train_y": y, "num_classes": len(classes)}
    if test_root is not None:
        out["test_x"], out["test_y"] = _read(Path(test_root), classes)
    return out
