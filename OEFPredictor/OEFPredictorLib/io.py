"""Reading and writing images through SimpleITK, with geometry checks.

Array convention: numpy arrays in SimpleITK order (z, y, x); multi-echo data has the echo on the
last axis (z, y, x, echo). Geometry is SimpleITK's (x, y, z) spacing/origin/direction in LPS.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import InputError


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Image geometry in SimpleITK terms (x, y, z order), LPS."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (1, 0, 0, 0, 1, 0, 0, 0, 1)

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_image(cls, image) -> "Geometry":
        dim = image.GetDimension()
        spacing = image.GetSpacing()[:3]
        origin = image.GetOrigin()[:3]
        d = np.array(image.GetDirection()).reshape(dim, dim)[:3, :3]
        return cls(tuple(float(s) for s in spacing), tuple(float(o) for o in origin),
                   tuple(float(x) for x in d.ravel()))

    def apply_to(self, image) -> None:
        """Set this geometry on a 3D or 4D SimpleITK image (the 4th axis gets unit spacing)."""
        if image.GetDimension() == 3:
            image.SetSpacing(self.spacing)
            image.SetOrigin(self.origin)
            image.SetDirection(self.direction)
        else:
            image.SetSpacing(tuple(self.spacing) + (1.0,))
            image.SetOrigin(tuple(self.origin) + (0.0,))
            d4 = np.eye(4)
            d4[:3, :3] = np.array(self.direction).reshape(3, 3)
            image.SetDirection(tuple(d4.ravel()))

    def matches(self, other: "Geometry", tol: float = 1e-3) -> bool:
        return (np.allclose(self.spacing, other.spacing, atol=tol, rtol=tol)
                and np.allclose(self.origin, other.origin, atol=max(tol, tol * max(self.spacing)))
                and np.allclose(self.direction, other.direction, atol=tol))

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix from (i, j, k) voxel indices to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = np.array(self.direction).reshape(3, 3) @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m


def write_volume(array: np.ndarray, geometry: Geometry, path: str | os.PathLike, dtype=None) -> None:
    """Write a 3D array (z, y, x) or a 4D array (z, y, x, n) as one image with this geometry."""
    import SimpleITK as sitk

    a = np.asarray(array if dtype is None else array.astype(dtype))
    if a.dtype == np.float64:
        a = a.astype(np.float32)
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if a.ndim == 4:
        image = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(a, -1, 0)), isVector=False)
    elif a.ndim == 3:
        image = sitk.GetImageFromArray(a)
    else:
        raise ValueError(f"Expected a 3D or 4D array, got shape {a.shape}.")
    geometry.apply_to(image)
    sitk.WriteImage(image, str(path), useCompression=True)


def read_volume(path: str | os.PathLike, dtype=np.float32) -> tuple[np.ndarray, Geometry]:
    """Read a 3D image (or a 4D one, echo last) into (array, geometry)."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file.")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"{path}: not a readable image ({str(exc).strip().splitlines()[-1]}).") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                         "give a scalar image.")
    array = sitk.GetArrayFromImage(image)
    if array.ndim == 4:
        array = np.moveaxis(array, 0, -1)
    return array.astype(dtype, copy=False), Geometry.from_image(image)


def read_json(path: str | os.PathLike) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(data: dict, path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def check_writable_parent(path: str | os.PathLike) -> Path:
    """The folder that will receive `path`: it must exist or be creatable, and be writable."""
    path = Path(path).absolute()
    parent = path.parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"Cannot write to {path}: {existing} is not a writable folder. "
                         "Choose another output location.")
    return parent


@contextmanager
def atomic_directory(final: str | os.PathLike, overwrite: bool = False):
    """Build a folder under a temporary name beside `final`, and move it into place only when the
    block succeeds: a failure or a cancel leaves nothing behind."""
    final = Path(final).absolute()
    if final.exists() and not overwrite:
        raise InputError(f"{final} already exists; choose another folder or pass --overwrite.")
    check_writable_parent(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        backup = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, backup)
        os.replace(tmp, final)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(tmp, final)
