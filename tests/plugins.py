"""An installed package that registers hpsearch plugins, as pip leaves one: a dist-info folder
with its entry points beside the package's modules (put the folder on PYTHONPATH)."""

from __future__ import annotations

from pathlib import Path


def install_package(folder: Path, name: str, *, models: dict[str, str],
                    datasets: dict[str, str]) -> None:
    """Write `name`'s dist-info into `folder`, registering `models` and `datasets` (plugin
    name → `module:callable`); the modules themselves are the caller's to write there."""
    info = folder / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    groups = {"hpsearch.models": models, "hpsearch.datasets": datasets}
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()) + "\n"
        for group, entries in groups.items()))
