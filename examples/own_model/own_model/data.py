"""The project's data: PNG images in one folder per class (`root/<class>/*.png`), read lazily.

`load` returns `torch.utils.data.Dataset`s, so hpsearch streams them through a DataLoader
(decoded by its workers, a batch at a time) instead of holding every image in memory. The class
folders' sorted names are the labels 0..k-1, as torchvision's ImageFolder numbers them;
`test_root` holds the test images in the same layout (read only by `hpsearch retrain`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset


class PngFolder(Dataset):
    """Grayscale PNGs as uint8 [1, H, W] tensors with integer labels."""

    def __init__(self, root: Path, classes: list[str]) -> None:
        self.files = [(path, label) for label, name in enumerate(classes)
                      for path in sorted((root / name).glob("*.png"))]
        if not self.files:
            raise ValueError(f"no PNG images under {root}/<class>/")
        self.classes = classes
        self.targets = [label for _, label in self.files]  # lets hpsearch filter classes

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.files[i]
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"), dtype=np.uint8)
        return torch.from_numpy(pixels.copy()).unsqueeze(0), label


def load(root: str, test_root: str | None = None) -> dict[str, object]:
    """Train images from `root`, test images from `test_root`."""
    train = Path(root)
    if not train.is_dir():
        raise FileNotFoundError(f"{train}: no such folder")
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    out: dict[str, object] = {"train": PngFolder(train, classes), "num_classes": len(classes)}
    if test_root is not None:
        out["test"] = PngFolder(Path(test_root), classes)
    return out
