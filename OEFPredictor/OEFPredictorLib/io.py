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
import uuid
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
    # ITK does not report a failed write (disk full, quota, file size limit): check what is there.
    problem = incomplete_file(path, written=True)
    if problem:
        raise OSError(errno.ENOSPC, f"the file was not written completely ({problem}; disk full?)", str(path))


def read_volume(path: str | os.PathLike, dtype=np.float32) -> tuple[np.ndarray, Geometry]:
    """Read a 3D image (or a 4D one, echo last) into (array, geometry)."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file.")
    problem = incomplete_file(path)
    if problem:
        raise InputError(f"{path}: the file is truncated ({problem}). Copy it again from its source "
                         "(an interrupted copy or download, or a full disk, cuts files short).")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"{path}: not a readable image ({_itk_reason(exc)}).") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                         "give a scalar image.")
    array = sitk.GetArrayFromImage(image)
    if array.dtype.kind == "f" and path.name.lower().endswith((".nii", ".nii.gz")):
        _restore_nifti_nonfinite(array, path)
    if array.ndim == 4:
        array = np.moveaxis(array, 0, -1)
    return array.astype(dtype, copy=False), Geometry.from_image(image)


# --- Truncated files ---------------------------------------------------------------------------
# ITK reads a truncated NIfTI (plain or gzipped) without a word, the missing part as zeros, and
# says "No such file or directory" for a truncated MetaImage; NRRD it refuses itself. So the bytes
# present are compared with what the header describes before reading (and after writing).
_META_TYPE_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
                    "MET_DOUBLE": 8}


def incomplete_file(path: str | os.PathLike, written: bool = False) -> str | None:
    """None when the image file holds all the data its header describes; else what is missing.
    NIfTI (.nii, .nii.gz, .hdr/.img) and MetaImage (.mha, .mhd); other formats: None (their ITK
    readers check this themselves). `written`: a file just written, whose header must be readable."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz", ".hdr", ".img", ".img.gz")):
        return _incomplete_nifti(path, written)
    if name.endswith((".mha", ".mhd")):
        return _incomplete_metaimage(path)
    if written:
        try:
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
        except RuntimeError:
            return "its header cannot be read back"
    return None


def _describe_missing(expected: int, found: int) -> str:
    return f"the header describes {expected} bytes of image data, the file holds {max(found, 0)}"


def _incomplete_nifti(path: Path, written: bool = False) -> str | None:
    import nibabel

    try:
        image = nibabel.load(str(path))
        header = image.header
        data_file = Path(image.file_map["image"].filename)
        expected = int(np.prod(image.shape, dtype=np.int64)) * header.get_data_dtype().itemsize
        offset = int(header.get_data_offset()) if data_file == path else 0
    except Exception:  # not a NIfTI nibabel understands (or no header at all): ITK will say so
        return "its header cannot be read back" if written else None
    if data_file.name.lower().endswith(".gz"):
        found = _gzip_length(data_file, offset + expected)
        return None if found >= offset + expected else _describe_missing(expected, found - offset)
    found = data_file.stat().st_size - offset if data_file.exists() else 0
    return None if found >= expected else _describe_missing(expected, found)


def _gzip_length(path: Path, expected: int) -> int:
    """Bytes a gzip file decompresses to (stops at a truncation). Fast path: the gzip trailer
    stores the length (mod 2^32); a file cut short ends in other bytes, so only then decompress."""
    import struct
    import zlib

    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < 18:  # smaller than an empty gzip member
            return 0
        f.seek(-4, os.SEEK_END)
        if struct.unpack("<I", f.read(4))[0] == expected % 2 ** 32:
            return expected
    n, complete = 0, False
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                while block:
                    n += len(d.decompress(block))
                    block, complete = b"", d.eof
                    if d.eof and d.unused_data:  # concatenated gzip members
                        block, d = d.unused_data, zlib.decompressobj(16 + zlib.MAX_WBITS)
    except zlib.error:
        complete = False
    return n if complete else min(n, expected - 1)


def _incomplete_metaimage(path: Path) -> str | None:
    fields, header_bytes = {}, 0
    try:
        with open(path, "rb") as f:
            for raw in f:
                header_bytes += len(raw)
                key, sep, value = raw.decode("latin-1").partition("=")
                if sep:
                    fields[key.strip()] = value.strip()
                if key.strip() == "ElementDataFile":
                    break
        dims = [int(v) for v in fields["DimSize"].split()]
        item = _META_TYPE_BYTES[fields["ElementType"]] * int(fields.get("ElementNumberOfChannels", "1"))
        data_name = fields["ElementDataFile"]
    except (OSError, KeyError, ValueError):
        return None  # not a MetaImage header we understand: ITK will say what is wrong
    if int(fields.get("HeaderSize", "0") or 0) != 0 or data_name.split()[0] in ("LIST",) or "%" in data_name:
        return None  # skipped headers, file lists and patterns: left to ITK
    compressed = fields.get("CompressedData", "False").lower() == "true"
    expected = int(np.prod(dims, dtype=np.int64)) * item
    if compressed:
        if "CompressedDataSize" not in fields:
            return None
        expected = int(fields["CompressedDataSize"])
    if data_name == "LOCAL":
        found = path.stat().st_size - header_bytes
    else:
        data_file = path.parent / data_name
        found = data_file.stat().st_size if data_file.exists() else 0
    return None if found >= expected else _describe_missing(expected, found)


def _itk_reason(exc: RuntimeError) -> str:
    """The line of an ITK exception that says what went wrong (its last line, unless an earlier
    one says the data are incomplete)."""
    lines = [l.strip() for l in str(exc).strip().splitlines() if l.strip()]
    for line in lines:
        if any(k in line for k in ("expected", "fread got only", "not read completely", "Premature")):
            return f"truncated or damaged: {line}"
    return lines[-1] if lines else type(exc).__name__


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
# Errors that can only mean "the output could not be written" (disk full, quota, file size limit,
# read-only file system); while atomic_directory sets up or puts the folder in place, any OSError does.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


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
    where = final if existing else final.parent
    _remove_stale_partials(where, final.name)
    # Named here, created inside the try: a signal that arrives right after the mkdir still finds it.
    tmp = where / f".{final.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    in_block = False
    try:
        if not existing:
            final.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        (tmp / OUTPUT_MARKER).write_text("Being written by oefpredictor.\n", encoding="utf-8")
        in_block = True
        yield tmp
        in_block = False
        written = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*")
                         if (p.is_file() or p.is_symlink()) and p.name != OUTPUT_MARKER)
        if existing:
            _replace_files(tmp, final, written, _file_keys(inputs), command)
        else:
            _write_manifest(tmp, dict.fromkeys(written, command))
            os.replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not in_block or exc.errno in WRITE_ERRNOS:  # (in the block, EACCES may be an unreadable input)
            raise write_error(exc, final) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_partials(parent: Path, name: str) -> None:
    """Temporary folders of `name` that a killed run (SIGKILL, power cut) left in `parent`: ours
    (they carry the marker) and their process is gone."""
    for stale in parent.glob(f".{name}.partial-*"):
        pid = stale.name.rsplit(".partial-", 1)[1].split("-")[0]
        if not (stale / OUTPUT_MARKER).exists() or not pid.isdigit() or _process_alive(int(pid)):
            continue
        shutil.rmtree(stale, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but not ours to signal
        return True
    return True


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
def describe_geometry(shape, geometry: Geometry, direction: bool = False) -> str:
    """One line naming a volume's grid, for geometry-mismatch messages (with its direction cosines
    when `direction`: two grids that differ only there look identical otherwise)."""
    size = "x".join(str(s) for s in tuple(shape)[:3][::-1])
    fmt = lambda v: "(" + ", ".join(f"{x:.4g}" for x in v) + ")"
    text = f"size {size} (x, y, z), spacing {fmt(geometry.spacing)} mm, origin {fmt(geometry.origin)}"
    return text + ", " + describe_direction(geometry) if direction else text


def describe_direction(geometry: Geometry) -> str:
    """'direction (1, 0, 0) (0, 1, 0) (0, 0, 1)': the direction cosine matrix, row by row."""
    d = np.round(np.asarray(geometry.direction, dtype=float).reshape(3, 3), 4) + 0.0  # no -0
    return "direction " + " ".join("(" + ", ".join(f"{x:.4g}" for x in row) + ")" for row in d)


def grids_differ_in_direction(geom_a: Geometry, geom_b: Geometry, tol: float = 1e-3) -> bool:
    return not np.allclose(geom_a.direction, geom_b.direction, atol=tol)


def check_same_grid(name_a: str, shape_a, geom_a: Geometry, name_b: str, shape_b, geom_b: Geometry) -> None:
    """Refuse two volumes that are not on the same voxel grid, naming both geometries."""
    if tuple(shape_a)[:3] != tuple(shape_b)[:3] or not geom_a.matches(geom_b):
        d = grids_differ_in_direction(geom_a, geom_b)
        raise InputError(f"{name_b} and {name_a} are not on the same voxel grid: {name_b} has "
                         f"{describe_geometry(shape_b, geom_b, d)}, {name_a} has {describe_geometry(shape_a, geom_a, d)}. "
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
    used = {Path(name).name for names in groups.values() for name in names}
    skipped = [f.name for f in sorted(folder.iterdir()) if f.is_file() and f.name not in used
               and f.name.upper() != "DICOMDIR" and _has_dicom_preamble(f)]
    if skipped:
        raise InputError(f"{folder}: {len(skipped)} DICOM file(s) cannot be read ({', '.join(skipped[:3])}"
                         f"{', ...' if len(skipped) > 3 else ''}: truncated or damaged), so slices would be "
                         "missing. Copy the series again from its source.")
    shared = [te for te, sids in series_of.items() if len(sids) > 1 and te is not None]
    if shared:
        raise InputError(f"{folder}: {len(series_of[shared[0]])} DICOM series share the echo time {shared[0]:g} ms "
                         "(magnitude and phase, or a repeat?); put only the magnitude series in the folder.")
    if None in groups and len(groups) > 1:
        raise InputError(f"{folder}: some DICOM files have an EchoTime and some have none; give one series.")
    return sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or 0.0))


def _has_dicom_preamble(path: Path) -> bool:
    """A DICOM Part 10 file: 128 bytes of preamble, then 'DICM'."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _read_dicom_files(files: list[str], where: Path) -> tuple[np.ndarray, Geometry]:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{where}: the DICOM series cannot be read ({_itk_reason(exc)}).") from None
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


def dicom_field_strength(folder: str | os.PathLike) -> float | None:
    """MagneticFieldStrength (tag 0018,0087, tesla) of the first DICOM file of a folder; None when
    the tag is absent or empty."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    for name in sorted(Path(folder).iterdir()):
        if not name.is_file() or not _has_dicom_preamble(name):
            continue
        reader.SetFileName(str(name))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            continue
        if reader.HasMetaDataKey("0018|0087") and reader.GetMetaData("0018|0087").strip():
            text = reader.GetMetaData("0018|0087").strip()
            try:
                value = float(text)
            except ValueError:
                raise InputError(f"{name}: the DICOM MagneticFieldStrength (0018,0087) {text!r} is not a number; "
                                 "give --field-strength in tesla.") from None
            return value if value > 0 else None
        return None
    return None


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


def _sidecar_field_strength(side: Path, data: dict) -> float | None:
    """MagneticFieldStrength (tesla) of a sidecar's data; None when absent."""
    field = data.get("MagneticFieldStrength")
    if field is None:
        return None
    try:
        field = float(field)
    except (TypeError, ValueError):
        field = float("nan")
    if not (np.isfinite(field) and field > 0):
        raise InputError(f"{side}: MagneticFieldStrength {data['MagneticFieldStrength']!r} is not a field strength "
                         "in tesla (e.g. 3); fix the sidecar or give --field-strength.")
    return field


def _sidecar_echo_times_s(path: Path) -> tuple[list[float] | None, float | None] | None:
    """EchoTime (seconds, BIDS; None when absent) and MagneticFieldStrength (tesla; None when
    absent) from the sidecar of `path`; None without a sidecar."""
    side = sidecar_path(path)
    if not side.exists():
        return None
    try:
        data = read_json(side)
    except (OSError, ValueError) as exc:
        raise InputError(f"{side}: not a readable JSON sidecar ({exc}).") from None
    if not isinstance(data, dict):
        raise InputError(f"{side}: not a BIDS sidecar (a JSON object of fields).")
    field = _sidecar_field_strength(side, data)
    te = data.get("EchoTime")
    if te is None:
        return None, field
    try:
        values = [float(t) for t in (te if isinstance(te, (list, tuple)) else [te])]
    except (TypeError, ValueError):
        raise InputError(f"{side}: EchoTime must be numbers (seconds, one per echo); fix the sidecar or give "
                         "--te in milliseconds.") from None
    if not values or not all(np.isfinite(values)) or min(values) <= 0:
        raise InputError(f"{side}: EchoTime must hold positive numbers of seconds, got {te}; fix the sidecar "
                         "or give --te in milliseconds.")
    if max(values) > 1.0:
        raise InputError(f"{side}: EchoTime {values} looks like milliseconds; BIDS sidecars give seconds "
                         "(e.g. 0.0045). Fix the sidecar or give --te in milliseconds.")
    return values, field


def read_echo_series(paths, te_ms: list[float] | None = None, notes: list[str] | None = None):
    """Echoes from one 4D file, several 3D files in echo order, or a DICOM series folder.

    Returns (echoes (z, y, x, E) float32, geometry, echo times in ms, field strength in T or None).
    Echo times: `te_ms` (the command line's --te) when given, else the BIDS sidecar(s) next to the
    echo file(s) (seconds), else the DICOM EchoTime tags; InputError when none of these exists.
    `notes`: a list that receives warnings (e.g. a --te that contradicts the sidecar).
    """
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    if not paths:
        raise InputError("No echo images given.")
    found_te, field = None, None
    if len(paths) == 1 and paths[0].is_dir():
        echoes, geometry, found_te = read_dicom_series(paths[0])
        field = dicom_field_strength(paths[0])
        if found_te is None:  # read as one volume: the echoes' slices would be mixed up
            raise InputError(f"{paths[0]}: the DICOM files have no EchoTime tag (0018,0081), so the echoes cannot "
                             "be told apart. Export the series with its EchoTime tags, or give one 3D file per "
                             "echo, in echo order, with --te.")
    elif len(paths) == 1:
        echoes, geometry = read_volume(paths[0])
        side = _sidecar_echo_times_s(paths[0])
        if side:
            found_te, field = side[0] and [t * 1000.0 for t in side[0]], side[1]
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
            tes.append(side[0][0] * 1000.0 if side and side[0] and len(side[0]) == 1 else None)
            file_field = dicom_field_strength(p) if p.is_dir() else side and side[1]
            if file_field and field and abs(file_field - field) > 1e-3:
                raise InputError(f"The echo files disagree on the field strength: {field:g} T and {file_field:g} T "
                                 f"({p.name}); give echoes of one acquisition.")
            field = file_field or field
        echoes = np.stack(volumes, axis=-1)
        found_te = tes if all(t is not None for t in tes) else None
    if echoes.ndim != 4:
        raise InputError(f"{paths[0]}: the echoes have shape {echoes.shape}; give one 4D image (echo on the 4th "
                         "axis), several 3D files in echo order, or a DICOM multi-echo series folder"
                         + (" (this is a 2D image)." if echoes.ndim == 2 else "."))
    if te_ms is not None and found_te is not None and notes is not None and (
            len(te_ms) != len(found_te) or not np.allclose(te_ms, found_te, rtol=1e-3, atol=1e-3)):
        source = "DICOM EchoTime tags" if paths[0].is_dir() else f"sidecar {sidecar_path(paths[0]).name}"
        notes.append(f"--te ({', '.join(f'{t:g}' for t in te_ms)} ms) contradicts the {source} "
                     f"({', '.join(f'{t:g}' for t in found_te)} ms); --te was used, as the command line "
                     "overrides the files. Check which is right.")
    tes = te_ms if te_ms is not None else found_te
    if tes is None:
        raise InputError(f"No echo times for {paths[0]}: give --te in milliseconds (e.g. --te 4.5,9.5,...) or "
                         f"put a BIDS sidecar {sidecar_path(paths[0]).name} with EchoTime in seconds next to it.")
    if len(tes) != echoes.shape[-1]:
        raise InputError(f"{len(tes)} echo times for {echoes.shape[-1]} echoes in {paths[0]}; give one echo time "
                         "per echo.")
    return echoes, geometry, [float(t) for t in tes], (float(field) if field else None)


def field_strength_source(echoes) -> tuple[str, str]:
    """(what the echo files lack, where to add the field strength), for messages."""
    first = Path(echoes[0])
    if len(echoes) == 1 and first.is_dir():
        return "its DICOM files have no MagneticFieldStrength tag (0018,0087)", ""
    side = sidecar_path(first)
    lack = f"its BIDS sidecar {side.name} has no MagneticFieldStrength" if side.exists() else \
        f"it has no BIDS sidecar ({side.name})"
    return lack, f", or add MagneticFieldStrength (tesla) to {side.name}"


def resolve_field_strength(echoes, given: float | None, found: float | None, notes: list[str] | None) -> float:
    """The field strength of a prediction: the given one (command line, panel) or the files' one;
    never assumed. A given value that contradicts the files is used, with a note."""
    if given is not None:
        if found is not None and abs(given - found) > 1e-3 and notes is not None:
            notes.append(f"--field-strength {given:g} T contradicts the field strength of the echo files ({found:g} T); "
                         f"{given:g} T was used, as the command line overrides the files. Check which is right.")
        return float(given)
    if found is None:
        lack, add = field_strength_source(echoes)
        raise InputError(f"The field strength of {Path(echoes[0]).name} is unknown ({lack}), and it changes every "
                         f"map: give --field-strength in tesla (e.g. --field-strength 3){add}.")
    return float(found)
