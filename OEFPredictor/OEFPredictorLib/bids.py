"""BIDS: reading a raw data set's mGRE + QSM inputs (pybids), naming derivatives, and writing a
simulated cohort as a BIDS raw data set.

Inputs of one subject (and session) in a raw data set, with the QSM, mask and segmentation either
beside the echoes in anat/ or in a derivatives folder:

    sub-<s>[_ses-<x>]_echo-<n>_part-mag_MEGRE.nii.gz + .json   per-echo magnitudes (EchoTime in s)
    sub-<s>[_ses-<x>]_MEGRE.nii.gz + .json                     or one 4D file (EchoTime a list)
    sub-<s>[_ses-<x>]_Chimap.nii.gz                            QSM (ppm)
    sub-<s>[_ses-<x>]_desc-brain_mask.nii.gz                   optional brain mask
    sub-<s>[_ses-<x>]_dseg.nii.gz + dseg.tsv                   optional tissue labels (index, name)
    sub-<s>[_ses-<x>]_desc-<d>_fieldmap.nii.gz + .json         optional field map on the echoes' grid
                                                               (a derivative; Units in its sidecar),
                                                               for the field-gradient correction

Converters (dcm2niix, heudiconv) add entities: acq-<a> and run-<n> echo sets are separate units,
each with its own outputs (sub-01_run-2_desc-OEF_map.nii.gz), and take the QSM, mask and
segmentation with the same entities, else those without them. A session without its own mask or
segmentation takes the subject-level one (sub-<s>/anat/, no ses-). A raw data set without
derivatives and masks works: each unit then gets a derived mask (see predict).

Derivative names: sub-<s>[_ses-<x>][_acq-<a>][_run-<n>]_desc-<Map>_map.nii.gz with a JSON sidecar
each, the mask as desc-brain_mask (see derivative_name).
"""
from __future__ import annotations

import dataclasses
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from . import __version__, io, phantom, simulate
from .errors import InputError

BIDS_VERSION = "1.10.0"
IMAGE_EXTENSIONS = [".nii.gz", ".nii"]
MAP_SUFFIX = "map"  # derivative maps: sub-X_desc-OEF_map.nii.gz
SIMULATE_PIPELINE = "simulate"  # derivatives/simulate/ of a simulated raw data set: truth, mask, dseg


# --- Names -----------------------------------------------------------------------------------
def label_of(text: str, what: str = "label") -> str:
    """A BIDS label (letters and digits) from 'sub-01' or '01'; InputError otherwise."""
    label = re.sub(r"^(sub|ses)-", "", str(text))
    if not re.fullmatch(r"[A-Za-z0-9]+", label):
        raise InputError(f"{what} {text!r} is not a BIDS label (letters and digits only, e.g. 01 or sub-01).")
    return label


def unit_prefix(subject: str, session: str | None = None, entities: str = "") -> str:
    """'sub-01', 'sub-01_ses-1' or 'sub-01_ses-1_acq-fast_run-2': the start of every file name of a
    unit (subject, session, and the entities that tell its echo sets apart)."""
    return f"sub-{subject}" + (f"_ses-{session}" if session else "") + (f"_{entities}" if entities else "")


# Entities of raw file names that tell one subject's acquisitions apart (BIDS order); echo and part
# belong to one echo of a set, desc/space/label to derivatives.
SET_ENTITIES = ("acq", "ce", "rec", "dir", "run", "flip", "inv", "mt")


def set_entities(path: str | Path) -> str:
    """The acquisition entities of a file name ('acq-fast_run-2'; '' for none): what tells one
    subject's echo sets apart, and which QSM or mask belongs to which."""
    tokens = Path(path).name.split("_")[:-1]  # the last token is the suffix and extension
    return "_".join(t for t in tokens if "-" in t and t.split("-", 1)[0] in SET_ENTITIES)


def unit_dir(subject: str, session: str | None = None) -> Path:
    """sub-01[/ses-1]: the folder of a subject (and session), relative to the data set."""
    return Path(f"sub-{subject}") / (f"ses-{session}" if session else "")


def derivative_name(subject: str, session: str | None, desc: str, suffix: str = MAP_SUFFIX,
                    extension: str = ".nii.gz", entities: str = "") -> str:
    return f"{unit_prefix(subject, session, entities)}_desc-{desc}_{suffix}{extension}"


def read_label_table(path: str | Path) -> dict[int, str]:
    """A BIDS dseg.tsv (columns index and name) -> {index: name}."""
    path = Path(path)
    try:
        lines = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        header = [h.strip() for h in lines[0]]
        i, n = header.index("index"), header.index("name")
        return {int(row[i]): row[n].strip() for row in lines[1:]}
    except (OSError, ValueError, IndexError) as exc:
        raise InputError(f"{path}: not a readable BIDS label table (columns index and name; {exc}).") from None


# --- Reading a raw data set ------------------------------------------------------------------
@dataclasses.dataclass
class UnitInputs:
    """The input files of one subject (and session); `missing` says what could not be found."""

    subject: str
    session: str | None
    echoes: list[str]  # per-echo files in echo order, or one 4D file
    echo_times_ms: list[float] | None  # from the sidecars (pybids metadata, inheritance included)
    field_strength: float | None
    qsm: str | None
    mask: str | None = None
    dseg: str | None = None
    dseg_tsv: str | None = None
    field_map: str | None = None  # a derivative field map on the echoes' grid (its sidecar gives Units)
    missing: list[str] = dataclasses.field(default_factory=list)
    entities: str = ""  # acq-/run- entities of the echo set ('' for most data sets)
    problems: list[str] = dataclasses.field(default_factory=list)  # bad metadata: fails this unit only
    notes: list[str] = dataclasses.field(default_factory=list)  # what was chosen for it (e.g. a subject-level mask)

    @property
    def name(self) -> str:
        return unit_prefix(self.subject, self.session, self.entities)

    @property
    def failure(self) -> str | None:
        """Why this unit cannot run (missing files, bad metadata), or None."""
        reasons = (["missing " + "; ".join(self.missing)] if self.missing else []) + self.problems
        return "; ".join(reasons) or None

    def files(self) -> list[str]:
        """Every input file, sidecars included (what the resumption checksums cover)."""
        images = self.echoes + [p for p in (self.qsm, self.mask, self.dseg, self.field_map) if p]
        extra = [str(io.sidecar_path(p)) for p in images if io.sidecar_path(p).exists()]
        return images + extra + ([self.dseg_tsv] if self.dseg_tsv else [])


def open_layout(bids_dir: str | Path, derivatives: list[str | Path] | None = None):
    """A pybids layout of the raw data set plus the given derivatives folders."""
    import bids

    bids_dir = Path(bids_dir)
    if not (bids_dir / "dataset_description.json").is_file():
        raise InputError(f"{bids_dir} is not a BIDS data set (no dataset_description.json). "
                         "Give the folder that holds dataset_description.json and the sub-* folders.")
    for d in derivatives or []:
        if not (Path(d) / "dataset_description.json").is_file():
            raise InputError(f"--derivatives {d}: not a BIDS derivatives folder (no dataset_description.json).")
    from bids.layout import BIDSLayoutIndexer
    from bids.layout.validation import DEFAULT_LOCATIONS_TO_IGNORE

    # pybids stops on the first JSON file it cannot parse: leave those out of the index, and fail
    # only the units whose sidecars they are (unusable_sidecars).
    broken = {}
    for root in [bids_dir, *map(Path, derivatives or [])]:
        for path in root.rglob("sub-*.json"):
            try:
                io.read_json(path)
            except (OSError, ValueError) as exc:
                broken[str(path.absolute())] = " ".join(str(exc).split())[:120]
    ignore = [*DEFAULT_LOCATIONS_TO_IGNORE, *(re.compile(re.escape("/" + Path(b).name) + "$") for b in broken)]
    try:
        layout = bids.BIDSLayout(str(bids_dir), indexer=BIDSLayoutIndexer(validate=False, ignore=ignore),
                                 derivatives=[str(d) for d in derivatives] if derivatives else False)
    except Exception as exc:  # pybids raises its own types for a broken description
        raise InputError(f"{bids_dir}: pybids cannot read this data set ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]}).") from None
    layout.oefpredictor_broken_json = broken
    return layout


def unusable_sidecars(layout, images: list[str]) -> list[str]:
    """Why the JSON sidecars of these images cannot be read (those open_layout left out)."""
    broken = getattr(layout, "oefpredictor_broken_json", {})
    problems = []
    for image in images:
        side = str(io.sidecar_path(Path(image).absolute()))
        if side in broken:
            problems.append(f"the sidecar {Path(side).name} is not valid JSON ({broken[side]}): fix or replace it")
    return problems


def find_inputs(layout, participant_labels: list[str] | None = None) -> list[UnitInputs]:
    """The inputs of every subject (and session) of the layout, in order; participant_labels
    restricts to those subjects (InputError for a label the data set lacks)."""
    subjects = sorted(layout.get_subjects())
    if participant_labels:
        wanted = [label_of(s, "--participant-label") for s in participant_labels]
        unknown = [s for s in wanted if s not in subjects]
        if unknown:
            raise InputError(f"No subject {', '.join('sub-' + s for s in unknown)} in {layout.root} "
                             f"(it has {', '.join('sub-' + s for s in subjects[:10]) or 'none'}"
                             f"{', ...' if len(subjects) > 10 else ''}).")
        subjects = wanted
    if not subjects:
        raise InputError(f"{layout.root}: no sub-* folders found.")
    units = []
    for subject in subjects:
        sessions = sorted(layout.get_sessions(subject=subject)) or [None]
        for session in sessions:
            units += _session_units(layout, subject, session)
    return units


def _get(layout, subject, session, **filters) -> list:
    """Image files of a subject and session; those of the derivatives folders first (given by
    option, they are what the user asked for)."""
    query = dict(subject=subject, extension=IMAGE_EXTENSIONS, **filters)
    query["session"] = session if session else layout_none()
    return sorted(layout.get(**query), key=lambda f: (in_raw(f.path, layout), f.path))


def in_raw(path, layout) -> bool:
    """Whether a file of the layout is part of the raw data set (not of a derivatives folder)."""
    root, path = Path(layout.root), Path(path)
    return path.is_relative_to(root) and "derivatives" not in path.relative_to(root).parts


def layout_none():
    from bids.layout import Query

    return Query.NONE


def _session_units(layout, subject: str, session: str | None) -> list[UnitInputs]:
    """The units of one subject and session: one per echo set (acq-/run- entities). A unit whose
    files or metadata are unusable carries the reason (missing / problems), so that it fails alone."""
    echoes = _get(layout, subject, session, suffix="MEGRE", scope="raw")  # not derivatives
    echoes = [f for f in echoes if f.get_entities().get("part") in (None, "mag")]
    sets: dict[str, list] = {}
    for f in echoes:
        sets.setdefault(set_entities(f.path), []).append(f)
    units = []
    for entities in sorted(sets) or [""]:
        try:
            units.append(_unit_inputs(layout, subject, session, entities, sets.get(entities, [])))
        except Exception as exc:  # unreadable metadata of this unit only
            unit = UnitInputs(subject, session, [f.path for f in sets.get(entities, [])], None, None, None,
                              entities=entities)
            unit.problems.append(f"its files cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})")
            units.append(unit)
    return units


def _matching(files: list, entities: str) -> list:
    """Files of a unit's echo set: those with the same acq-/run- entities, else those without any
    (they serve every echo set of the subject and session)."""
    same = [f for f in files if set_entities(f.path) == entities]
    return same or [f for f in files if set_entities(f.path) == ""]


def _unit_inputs(layout, subject: str, session: str | None, entities: str, echoes: list) -> UnitInputs:
    missing, problems, notes = [], [], []
    # a part-mag file per echo, or one 4D file (no echo entity)
    echoes = sorted(echoes, key=lambda f: int(f.get_entities().get("echo", 0)))
    echo_numbers = [int(f.get_entities().get("echo", 0)) for f in echoes]
    tes, field = None, None
    if not echoes:
        missing.append("mGRE magnitudes (*_echo-<n>_part-mag_MEGRE.nii.gz or one 4D *_MEGRE.nii.gz)")
    elif len(set(echo_numbers)) != len(echo_numbers):
        problems.append(f"several files for the same echo ({', '.join(Path(f.path).name for f in echoes[:4])}...): "
                        "name each echo set with its own acq- or run- entity")
    elif unusable_sidecars(layout, [f.path for f in echoes]):
        problems += unusable_sidecars(layout, [f.path for f in echoes])
    else:
        meta = [f.get_metadata() for f in echoes]
        values = []
        for m in meta:
            te = m.get("EchoTime")
            values += [] if te is None else list(te if isinstance(te, list) else [te])
        try:
            values = [float(t) for t in values]
        except (TypeError, ValueError):
            problems.append(f"EchoTime {values} in the MEGRE JSON sidecars is not a list of numbers (seconds)")
            values = []
        if problems:
            pass
        elif len(values) >= 2 and len(values) >= len(echoes):
            if max(values) > 1.0:
                problems.append(f"EchoTime {values} looks like milliseconds; BIDS sidecars give seconds "
                                "(e.g. 0.0045): fix the MEGRE JSON sidecars")
            elif min(values) <= 0 or not all(np.isfinite(values)):
                problems.append(f"EchoTime {values} must hold positive numbers of seconds")
            else:
                tes = [t * 1000.0 for t in values]
        else:
            missing.append("EchoTime (seconds) in the MEGRE JSON sidecars")
        fields = {m.get("MagneticFieldStrength") for m in meta} - {None}
        try:
            fields = {float(f) for f in fields}
        except (TypeError, ValueError):
            problems.append(f"MagneticFieldStrength {sorted(map(str, fields))} in the MEGRE JSON sidecars is not a "
                            "number (tesla)")
            fields = set()
        if len(fields) > 1:
            problems.append(f"the MEGRE JSON sidecars give different MagneticFieldStrength values {sorted(fields)}")
        elif fields:
            field = fields.pop()
    qsm = _matching(_get(layout, subject, session, suffix="Chimap"), entities)
    if not qsm:
        missing.append("QSM (*_Chimap.nii.gz in anat/ or in a --derivatives folder)")
    # 'desc' is an entity of derivatives only (pybids refuses it as a filter on a raw-only layout
    # and does not parse it in raw anat/), so the names decide
    def masks(ses):
        return _matching([f for f in _get(layout, subject, ses, suffix="mask") if "_desc-brain_" in Path(f.path).name],
                         entities)

    def segmentations(ses):
        return _matching([f for f in _get(layout, subject, ses, suffix="dseg") if "_desc-" not in Path(f.path).name],
                         entities)

    mask, dseg = masks(session), segmentations(session)
    if session and not mask:  # BIDS inheritance: the subject-level mask serves every session
        mask = masks(None)
        if mask:
            notes.append(f"the subject-level mask {Path(mask[0].path).name}")
    if session and not dseg:
        dseg = segmentations(None)
    dseg_tsv = _label_table_for(dseg[0].path, layout) if dseg else None
    if dseg and dseg_tsv is None:
        missing.append(f"the label table of {Path(dseg[0].path).name} (a dseg.tsv with index and name)")
    # a QSM pipeline's field map, resampled to the echoes: derivatives only (a raw fmap/ acquisition
    # has its own grid and is not what the correction needs)
    field_maps = _matching([f for f in _get(layout, subject, session, suffix="fieldmap") if not in_raw(f.path, layout)],
                           entities)
    return UnitInputs(subject, session, [f.path for f in echoes], tes, field,
                      qsm[0].path if qsm else None, mask[0].path if mask else None,
                      dseg[0].path if dseg else None, dseg_tsv, field_maps[0].path if field_maps else None,
                      missing, entities, problems, notes)


def _label_table_for(dseg_path: str, layout) -> str | None:
    """The dseg.tsv of a segmentation: the same name with .tsv, else the nearest dseg.tsv up to
    the data set's root (BIDS inheritance)."""
    image = Path(dseg_path)
    same = io.sidecar_path(image).with_suffix(".tsv")
    if same.exists():
        return str(same)
    folder = image.parent
    while True:
        candidate = folder / "dseg.tsv"
        if candidate.exists():
            return str(candidate)
        if (folder / "dataset_description.json").exists() or folder.parent == folder:
            return None
        folder = folder.parent


# --- Derivative descriptions -----------------------------------------------------------------
def derivative_description(name: str, generated_by: dict, source: str | Path | None = None) -> dict:
    """dataset_description.json of a derivatives data set."""
    desc = {"Name": name, "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
            "GeneratedBy": [generated_by]}
    if source is not None:
        desc["SourceDatasets"] = [{"URL": Path(source).absolute().as_uri()}]
        desc["DatasetLinks"] = {"raw": Path(source).absolute().as_uri()}
    return desc


def source_uri(path: str | Path, raw_root: str | Path) -> str:
    """A BIDS URI (bids:raw:sub-01/anat/...) for an input file under the raw data set, else its
    absolute path."""
    path, raw_root = Path(path).absolute(), Path(raw_root).absolute()
    try:
        return f"bids:raw:{path.relative_to(raw_root).as_posix()}"
    except ValueError:
        return path.as_uri()


# --- A simulated cohort as a BIDS raw data set --------------------------------------------------
def check_raw_output(out: str | Path, pids: list[str], overwrite: bool = False) -> None:
    """Refuse, before any work, a raw data set folder that already holds these subjects."""
    out = Path(out)
    io.check_writable_dir(out)
    existing = [p for p in pids if (out / f"sub-{p}").exists()]
    if existing and not overwrite:
        raise InputError(f"{out} already holds {', '.join('sub-' + p for p in existing)}; choose another "
                         "folder or pass --overwrite.")


def write_simulated_bids(sim_dir: str | Path, out: str | Path, overwrite: bool = False) -> list[Path]:
    """Convert a data set of `simulate_dataset` into a BIDS raw data set: per-echo MEGRE files with
    sidecars and the QSM (Chimap) in sub-*/anat/; the mask, tissue labels and truth maps under
    derivatives/simulate/. Each subject's folders are written atomically."""
    sim_dir, out = Path(sim_dir), Path(out)
    folders = simulate.list_patients(sim_dir)
    check_raw_output(out, [f.name for f in folders], overwrite)
    out.mkdir(parents=True, exist_ok=True)
    deriv = out / "derivatives" / SIMULATE_PIPELINE
    deriv.mkdir(parents=True, exist_ok=True)
    description = io.read_json(sim_dir / "dataset_description.json")
    generated = {"Name": "oefpredictor simulate", "Version": __version__}
    io.write_json({"Name": "OEFPredictor virtual patients", "BIDSVersion": BIDS_VERSION, "DatasetType": "raw",
                   "GeneratedBy": [generated],
                   "HowToAcknowledge": "Synthetic data of OEFPredictor (QQ model on deformed MNI152 anatomy).",
                   **{k: description[k] for k in ("Seed", "Noise", "VoxelSizeMM") if k in description}},
                  out / "dataset_description.json")
    (out / "README").write_text(
        "Virtual patients simulated by `oefpredictor simulate --bids`: multi-echo GRE magnitudes (MEGRE, "
        "part-mag, one file per echo) and QSM (Chimap, ppm). The brain mask, tissue labels (dseg) and the "
        f"truth maps are under derivatives/{SIMULATE_PIPELINE}/.\n", encoding="utf-8")
    io.write_json(derivative_description("OEFPredictor virtual patients: truth, masks, labels", generated,
                                         out), deriv / "dataset_description.json")
    _write_tsv(deriv / "dseg.tsv", ["index", "name"], [[k, v] for k, v in phantom.LABELS.items()])
    rows = []
    table = sim_dir / "participants.tsv"
    lines = table.read_text(encoding="utf-8").splitlines() if table.exists() else []
    header = lines[0].split("\t") if lines else ["participant_id"]
    for line in lines[1:]:
        values = line.split("\t")
        rows.append(["sub-" + values[0]] + values[1:])
    for folder in folders:
        _write_simulated_subject(folder, out, deriv, overwrite)
    _write_tsv(out / "participants.tsv", header, rows)
    return [out / f"sub-{f.name}" for f in folders]


def _write_simulated_subject(folder: Path, out: Path, deriv: Path, overwrite: bool) -> None:
    pid = folder.name
    files = simulate.patient_files(folder)
    data = simulate.load_patient(folder, with_truth=True)
    sidecar = io.read_json(files["sidecar"])
    common = {k: v for k, v in sidecar.items() if k not in ("EchoTime", "EchoTimeUnits")}
    with io.atomic_directory(out / f"sub-{pid}", overwrite=overwrite) as tmp:
        anat = tmp / "anat"
        anat.mkdir()
        for e, te in enumerate(data.protocol.echo_times, start=1):
            stem = anat / f"sub-{pid}_echo-{e}_part-mag_MEGRE"
            io.write_volume(data.echoes[..., e - 1], data.geometry, f"{stem}.nii.gz")
            io.write_json({"EchoTime": te, **common}, f"{stem}.json")
        shutil.copyfile(files["qsm"], anat / f"sub-{pid}_Chimap.nii.gz")
        io.write_json({"Units": "ppm", "Description": "Simulated QSM (QQ model of the truth maps, with noise)"},
                      anat / f"sub-{pid}_Chimap.json")
    with io.atomic_directory(deriv / f"sub-{pid}", overwrite=overwrite) as tmp:
        anat = tmp / "anat"
        anat.mkdir()
        shutil.copyfile(files["mask"], anat / f"sub-{pid}_desc-brain_mask.nii.gz")
        shutil.copyfile(files["labels"], anat / f"sub-{pid}_dseg.nii.gz")
        shutil.copyfile(files["lesions"], anat / f"sub-{pid}_desc-lesions_dseg.nii.gz")
        shutil.copyfile(files["lesions_tsv"], anat / f"sub-{pid}_desc-lesions_dseg.tsv")
        for name, key in simulate.TRUTH_FILE_KEYS.items():
            shutil.copyfile(files[f"truth_{name}"], anat / derivative_name(pid, None, "truth" + key))


def _write_tsv(path: Path, header: list[str], rows: list[list]) -> None:
    lines = ["\t".join(header)] + ["\t".join(str(v) for v in row) for row in rows]
    tmp = Path(tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)[1])
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)


def simulated_truth_oef(bids_dir: str | Path, subject: str) -> np.ndarray:
    """The truth OEF map (percent) of a simulated subject (for tests and benchmarks)."""
    path = (Path(bids_dir) / "derivatives" / SIMULATE_PIPELINE / f"sub-{subject}" / "anat"
            / derivative_name(subject, None, "truthOEF"))
    return io.read_volume(path)[0]
