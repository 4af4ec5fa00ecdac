"""Reading and writing images through SimpleITK, with geometry checks.

Array convention: numpy arrays in SimpleITK order (z, y, x); multi-echo data has the echo on the
last axis (z, y, x, echo). Geometry is SimpleITK's (x, y, z) spacing/origin/direction in LPS.
"""
from __future__ import annotations

import dataclasses
import errno
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


def write_volume(array: np.ndarray, geometry: Geometry, path: str | os.PathLike, dtype=None,
                 compression_level: int = 1) -> None:
    """Write a 3D array (z, y, x) or a 4D array (z, y, x, n) as one image with this geometry.

    Compressed files use a fast zlib level by default: noisy float data hardly compresses more at
    higher levels, and writing is several times faster."""
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
    sitk.WriteImage(image, str(path), useCompression=True, compressionLevel=compression_level)


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
    if array.dtype.kind == "f" and path.name.lower().endswith((".nii", ".nii.gz")):
        _restore_nifti_nonfinite(array, path)
    if array.ndim == 4:
        array = np.moveaxis(array, 0, -1)
    return array.astype(dtype, copy=False), Geometry.from_image(image)


def _restore_nifti_nonfinite(array: np.ndarray, path: Path) -> None:
    """SimpleITK's NIfTI reader turns NaN and Inf into 0, which would pass as valid data (a QSM of
    0 ppm). Read the stored values with nibabel (same storage order, axes reversed) and put the
    non-finite voxels back as NaN, so that they are masked out with a warning downstream."""
    import nibabel

    stored = np.asanyarray(nibabel.load(str(path)).dataobj)
    nonfinite = ~np.isfinite(stored)
    if nonfinite.any():
        nonfinite = nonfinite.transpose(tuple(range(nonfinite.ndim - 1, -1, -1)))  # (x,y,z[,t]) -> (t,z,y,x)
        if nonfinite.shape == array.shape:
            array[nonfinite] = np.nan


def read_json(path: str | os.PathLike) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(data: dict, path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def check_writable_dir(folder: str | os.PathLike) -> Path:
    """A folder that must exist or be creatable, and be writable (checked before any work)."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"Cannot write to {folder}: {existing} is not a writable folder. "
                         "Choose another output location.")
    return folder


def check_writable_parent(path: str | os.PathLike) -> Path:
    """The folder that will receive the file or folder `path`: it must be creatable and writable."""
    return check_writable_dir(Path(path).absolute().parent)


# Written into every folder atomic_directory fills: a JSON manifest {"files": {relative path:
# command}} of the files the tool wrote there. --overwrite works only on folders that carry it (or
# empty ones), and then replaces file by file: a rerun of a command replaces that command's own
# earlier files and nothing else (never an input of the run, never a file another program wrote).
OUTPUT_MARKER = ".oefpredictor-output"
# Errors that mean "the output could not be written" (disk full, quota, file size limit, read-only).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                 errno.EXDEV, errno.EBUSY}


def check_output_dir(folder: str | os.PathLike, overwrite: bool = False, inputs=(), names=()) -> Path:
    """An output folder that may be (re)written: refused, before any work, if it exists and
    `overwrite` is off, if it exists and is not an earlier output of this tool, if it cannot be
    created, or if one of `names` (the files the run may write) in it is one of the run's `inputs`."""
    folder = Path(folder).absolute()
    if folder.exists():
        if not overwrite:
            raise InputError(f"{folder} already exists; choose another folder or pass --overwrite.")
        if not folder.is_dir():
            raise InputError(f"{folder} exists and is not a folder; choose another output folder.")
        if any(folder.iterdir()) and not (folder / OUTPUT_MARKER).exists():
            raise InputError(f"{folder} is not an output folder of oefpredictor (it holds other files); "
                             "--overwrite replaces only earlier outputs. Choose a new or empty folder.")
        if Path.cwd().resolve().is_relative_to(folder.resolve()):
            raise InputError(f"{folder} contains the current working folder; choose another output folder.")
        protected = _file_keys(inputs)
        clash = [name for name in names if _file_key(folder / name) in protected]
        if clash:
            raise InputError(f"{folder / clash[0]} is an input of this run and would be replaced by an output "
                             "of the same name; choose another output folder.")
    check_writable_parent(folder)
    return folder


def _file_key(path: str | os.PathLike):
    """Identity of an existing file (device, inode): the same file under any name or link."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _file_keys(paths) -> set:
    """Keys of the files named by `paths`, and of every file inside the folders among them (a
    DICOM series folder is an input too)."""
    keys = set()
    for p in paths:
        if p is None:
            continue
        p = Path(p)
        files = [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else [p]
        keys.update(k for k in map(_file_key, files) if k is not None)
    return keys


def read_manifest(folder: str | os.PathLike) -> dict[str, str]:
    """{relative path: command} of the files oefpredictor wrote into `folder` ({} when unknown: no
    marker, or the plain-text marker of older versions, which did not list the files)."""
    try:
        files = json.loads((Path(folder) / OUTPUT_MARKER).read_text(encoding="utf-8"))["files"]
        return {str(k): str(v) for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _write_manifest(folder: Path, files: dict[str, str]) -> None:
    tmp = folder / f"{OUTPUT_MARKER}.{os.getpid()}.partial"
    tmp.write_text(json.dumps({"written_by": "oefpredictor", "note": "--overwrite replaces only these files",
                               "files": dict(sorted(files.items()))}, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, folder / OUTPUT_MARKER)


def write_error(exc: OSError, where: str | os.PathLike) -> InputError:
    """An InputError for a failed write (disk full, read-only...), naming where and what to do."""
    reason = exc.strerror or str(exc)
    return InputError(f"Could not write the output in {where} ({reason}); nothing was kept. Free some space "
                      "or choose another output folder.")


@contextmanager
def atomic_directory(final: str | os.PathLike, overwrite: bool = False, inputs=(), command: str = "oefpredictor"):
    """Build the outputs under a temporary name and put them in place only when the block succeeds:
    a failure, a cancel, Ctrl-C or SIGTERM leaves nothing behind (see cli.main for the signals).

    A new folder is built beside `final` and renamed into place. An existing one (--overwrite) is
    updated file by file from a temporary folder built inside it (so it works on a mount point):
    the block's files replace those of the same name; files that `command` wrote there earlier and
    did not write now are removed; every other file stays, and no file among `inputs` is replaced
    or removed."""
    final = check_output_dir(final, overwrite)
    existing = final.is_dir()
    try:
        if not existing:
            final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final if existing else final.parent))
    except OSError as exc:
        raise write_error(exc, final) from None
    try:
        yield tmp
        written = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file() or p.is_symlink())
        if existing:
            _replace_files(tmp, final, written, _file_keys(inputs), command)
        else:
            _write_manifest(tmp, dict.fromkeys(written, command))
            os.replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in _WRITE_ERRNOS:
            raise write_error(exc, final) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)


def _replace_files(tmp: Path, final: Path, written: list[str], protected: set, command: str) -> None:
    clash = [name for name in written if _file_key(final / name) in protected]
    if clash:
        raise InputError(f"{final / clash[0]} is an input of this run and would be replaced by an output of the "
                         "same name; nothing was written. Choose another output folder.")
    before = read_manifest(final)
    for name in written:
        (final / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / name, final / name)
    for name, owner in before.items():  # this command's earlier files that this run did not write
        if owner == command and name not in written and _file_key(final / name) not in protected:
            (final / name).unlink(missing_ok=True)
    files = {name: owner for name, owner in before.items() if (final / name).exists()}
    files.update(dict.fromkeys(written, command))
    _write_manifest(final, files)


# --- Reading the prediction inputs: echo series, QSM, mask, CBF ------------------------------
def describe_geometry(shape, geometry: Geometry) -> str:
    """One line naming a volume's grid, for geometry-mismatch messages."""
    size = "x".join(str(s) for s in tuple(shape)[:3][::-1])
    fmt = lambda v: "(" + ", ".join(f"{x:.4g}" for x in v) + ")"
    return f"size {size} (x, y, z), spacing {fmt(geometry.spacing)} mm, origin {fmt(geometry.origin)}"


def check_same_grid(name_a: str, shape_a, geom_a: Geometry, name_b: str, shape_b, geom_b: Geometry) -> None:
    """Refuse two volumes that are not on the same voxel grid, naming both geometries."""
    if tuple(shape_a)[:3] != tuple(shape_b)[:3] or not geom_a.matches(geom_b):
        raise InputError(f"{name_b} and {name_a} are not on the same voxel grid: {name_b} has "
                         f"{describe_geometry(shape_b, geom_b)}, {name_a} has {describe_geometry(shape_a, geom_a)}. "
                         "Resample them onto one grid (e.g. with 3D Slicer's Resample Scalar Volume).")


def _dicom_echo_groups(folder: Path) -> list[tuple[float | None, list[str]]]:
    """Files of a DICOM folder grouped by echo time (ms, from tag 0018|0081), in echo order; each
    group in GDCM's slice order. Several series in one folder are read as one echo set (scanners
    often write one series per echo), but two series with the same echo time (e.g. magnitude and
    phase) are refused."""
    import SimpleITK as sitk

    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"{folder}: no DICOM series found in this folder.")
    groups: dict[float | None, list[str]] = {}
    series_of: dict[float | None, set[str]] = {}
    reader = sitk.ImageFileReader()
    for sid in series:
        for name in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid):
            reader.SetFileName(name)
            reader.ReadImageInformation()
            te = None
            if reader.HasMetaDataKey("0018|0081") and reader.GetMetaData("0018|0081").strip():
                te = round(float(reader.GetMetaData("0018|0081")), 4)
            groups.setdefault(te, []).append(name)
            series_of.setdefault(te, set()).add(sid)
    shared = [te for te, sids in series_of.items() if len(sids) > 1 and te is not None]
    if shared:
        raise InputError(f"{folder}: {len(series_of[shared[0]])} DICOM series share the echo time {shared[0]:g} ms "
                         "(magnitude and phase, or a repeat?); put only the magnitude series in the folder.")
    if None in groups and len(groups) > 1:
        raise InputError(f"{folder}: some DICOM files have an EchoTime and some have none; give one series.")
    return sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or 0.0))


def _read_dicom_files(files: list[str], where: Path) -> tuple[np.ndarray, Geometry]:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{where}: the DICOM series cannot be read ({str(exc).strip().splitlines()[-1]}).") from None
    return sitk.GetArrayFromImage(image).astype(np.float32), Geometry.from_image(image)


def read_dicom_series(folder: str | os.PathLike) -> tuple[np.ndarray, Geometry, list[float] | None]:
    """A DICOM folder -> (array, geometry, echo times in ms or None). One echo time: a 3D array;
    several (a multi-echo series): a 4D array, echo last, in increasing echo time."""
    folder = Path(folder)
    groups = _dicom_echo_groups(folder)
    volumes, geometry = [], None
    for te, files in groups:
        array, geom = _read_dicom_files(files, folder)
        if volumes and (array.shape != volumes[0].shape or not geom.matches(geometry)):
            raise InputError(f"{folder}: the echo at {te} ms has another grid than the first echo.")
        volumes.append(array)
        geometry = geom
    tes = [te for te, _ in groups] if groups[0][0] is not None else None
    if len(volumes) == 1:
        return volumes[0], geometry, tes
    return np.stack(volumes, axis=-1), geometry, tes


def read_image(path: str | os.PathLike, dtype=np.float32) -> tuple[np.ndarray, Geometry]:
    """An image file (NIfTI, NRRD, MHA, ...) or a DICOM series folder -> (array, geometry)."""
    path = Path(path)
    if path.is_dir():
        array, geometry, _ = read_dicom_series(path)
        return array.astype(dtype, copy=False), geometry
    return read_volume(path, dtype)


def sidecar_path(image_path: str | os.PathLike) -> Path:
    """The BIDS JSON sidecar of an image: the same name with .json instead of .nii(.gz)/.nrrd/..."""
    p = Path(image_path)
    name = p.name
    for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.endswith(ext):
            return p.with_name(name[: -len(ext)] + ".json")
    return p.with_suffix(".json")


def _sidecar_echo_times_s(path: Path) -> tuple[list[float], float | None] | None:
    """EchoTime (seconds, BIDS) and MagneticFieldStrength from the sidecar of `path`, if any."""
    side = sidecar_path(path)
    if not side.exists():
        return None
    try:
        data = read_json(side)
    except (OSError, ValueError) as exc:
        raise InputError(f"{side}: not a readable JSON sidecar ({exc}).") from None
    te = data.get("EchoTime")
    if te is None:
        return None
    values = [float(t) for t in (te if isinstance(te, (list, tuple)) else [te])]
    if max(values) > 1.0:
        raise InputError(f"{side}: EchoTime {values} looks like milliseconds; BIDS sidecars give seconds "
                         "(e.g. 0.0045). Fix the sidecar or give --te in milliseconds.")
    return values, data.get("MagneticFieldStrength")


def read_echo_series(paths, te_ms: list[float] | None = None):
    """Echoes from one 4D file, several 3D files in echo order, or a DICOM series folder.

    Returns (echoes (z, y, x, E) float32, geometry, echo times in ms, field strength in T or None).
    Echo times: `te_ms` (the command line's --te) when given, else the BIDS sidecar(s) next to the
    echo file(s) (seconds), else the DICOM EchoTime tags; InputError when none of these exists.
    """
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    if not paths:
        raise InputError("No echo images given.")
    found_te, field = None, None
    if len(paths) == 1 and paths[0].is_dir():
        echoes, geometry, found_te = read_dicom_series(paths[0])
    elif len(paths) == 1:
        echoes, geometry = read_volume(paths[0])
        side = _sidecar_echo_times_s(paths[0])
        if side:
            found_te, field = [t * 1000.0 for t in side[0]], side[1]
    else:
        volumes, geometry, tes = [], None, []
        for p in paths:
            array, geom = read_image(p)
            if array.ndim != 3:
                raise InputError(f"{p}: with several echo files each must be one 3D echo; this one has shape "
                                 f"{array.shape}.")
            if volumes:
                check_same_grid(f"echo 1 ({paths[0].name})", volumes[0].shape, geometry, f"echo {len(volumes) + 1} "
                                f"({p.name})", array.shape, geom)
            else:
                geometry = geom
            volumes.append(array)
            side = _sidecar_echo_times_s(p) if not p.is_dir() else None
            tes.append(side[0][0] * 1000.0 if side and len(side[0]) == 1 else None)
            if side:
                field = side[1]
        echoes = np.stack(volumes, axis=-1)
        found_te = tes if all(t is not None for t in tes) else None
    if echoes.ndim != 4:
        raise InputError(f"{paths[0]}: the echoes have shape {echoes.shape}; give one 4D image (echo on the 4th "
                         "axis), several 3D files in echo order, or a DICOM multi-echo series folder"
                         + (" (this is a 2D image)." if echoes.ndim == 2 else "."))
    tes = te_ms if te_ms is not None else found_te
    if tes is None:
        raise InputError(f"No echo times for {paths[0]}: give --te in milliseconds (e.g. --te 4.5,9.5,...) or "
                         f"put a BIDS sidecar {sidecar_path(paths[0]).name} with EchoTime in seconds next to it.")
    if len(tes) != echoes.shape[-1]:
        raise InputError(f"{len(tes)} echo times for {echoes.shape[-1]} echoes in {paths[0]}; give one echo time "
                         "per echo.")
    return echoes, geometry, [float(t) for t in tes], (float(field) if field else None)
