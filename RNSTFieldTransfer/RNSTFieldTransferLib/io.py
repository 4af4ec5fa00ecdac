"""Reading and writing volumes with SimpleITK; outputs are written atomically."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import RNSTInputError


def read_volume(path: str | Path, what: str):
    """(SimpleITK image, float32 array (k, j, i)); a 2D image becomes one slice."""
    import SimpleITK as sitk
    path = Path(path)
    if not path.is_file():
        raise RNSTInputError(f"{what} image not found: {path}")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise RNSTInputError(f"{what} image {path} cannot be read: "
                             f"{str(exc).strip().splitlines()[-1]}") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise RNSTInputError(f"{what} image {path} has {image.GetNumberOfComponentsPerPixel()} "
                             "components per voxel; give a scalar (grey) volume")
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() not in (2, 3):
        raise RNSTInputError(f"{what} image {path} is {image.GetDimension()}D; "
                             "give a 2D or 3D image")
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    if array.ndim == 2:
        array = array[None]
    if not np.all(np.isfinite(array)):
        raise RNSTInputError(f"{what} image {path} has NaN or infinite voxels")
    return image, array


def direction_matrix(image) -> np.ndarray:
    d = np.asarray(image.GetDirection(), float)
    if d.size == 4:  # 2D: embed in 3D, the missing axis along z
        m = np.eye(3)
        m[:2, :2] = d.reshape(2, 2)
        return m
    return d.reshape(3, 3)


def geometry(image):
    """volume.Geometry of a SimpleITK image (a 2D image gets a 1 mm third axis)."""
    from .volume import Geometry
    if image.GetDimension() == 2:
        return Geometry(tuple(image.GetOrigin()) + (0.0,), tuple(image.GetSpacing()) + (1.0,),
                        tuple(direction_matrix(image).ravel()))
    return Geometry(tuple(image.GetOrigin()), tuple(image.GetSpacing()),
                    tuple(image.GetDirection()))


def write_like(array: np.ndarray, like, path: str | Path) -> None:
    """Write `array` with the geometry of `like`: a temporary file then a rename, so that a
    failure or a cancel never leaves a partial output."""
    import SimpleITK as sitk
    path = Path(path)
    if like.GetDimension() == 2:
        array = array[0]
    out = sitk.GetImageFromArray(np.asarray(array, np.float32))
    out.CopyInformation(like)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=".rnst-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        sitk.WriteImage(out, tmp, True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
