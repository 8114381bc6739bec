"""Write FashionMNIST as PNG files in the layout own_model.data reads: images/{train,test}/<class>/.

    python make_images.py [--train 3000] [--test 1000] [--out images]

Reads the idx files hpsearch finds (Debian's dataset-fashion-mnist, $HPSEARCH_DATA, ./data).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

import trainers

CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
           "bag", "boot")


def write(out: Path, train: int, test: int) -> None:
    data = trainers.load_data(trainers.DataConfig(dataset="fashion_mnist", val_fraction=0.0,
                                                  normalize=False), include_test=True)
    for split, part, count in (("train", data.train, train), ("test", data.test, test)):
        pixels = (part.x[:count, 0] * 255).round().byte().numpy()
        for i, (image, label) in enumerate(zip(pixels, part.y[:count].tolist(), strict=True)):
            folder = out / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:05d}.png")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--out", default="images")
    args = parser.parse_args()
    write(Path(args.out), args.train, args.test)
    print(f"wrote {args.train} train and {args.test} test images under {args.out}/")
