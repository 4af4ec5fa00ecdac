"""mGRE + QSM synthesis from truth maps, and the virtual-patient data set on disk.

Data set layout (BIDS-like; one folder per virtual patient):

    DIR/dataset_description.json        how the set was made (seed, SNR, QSM noise, protocol)
    DIR/participants.tsv                patient, split (train/test), lesions
    DIR/P01/P01_MEGRE.nii.gz            the echo magnitudes, 4D (echo on the 4th axis)
    DIR/P01/P01_MEGRE.json              sidecar: EchoTime (s), MagneticFieldStrength (T), noise
    DIR/P01/P01_Chimap.nii.gz           QSM (ppm)
    DIR/P01/P01_desc-brain_mask.nii.gz  brain mask (1 inside, CSF included)
    DIR/P01/P01_desc-truth_<P>map.nii.gz  truth maps, P in S0, R2 (Hz), Y, v, chinb (ppm), OEF (%)
    DIR/P01/P01_dseg.nii.gz + .tsv      tissue / lesion labels (phantom.LABELS)
    DIR/P01/P01_desc-lesions_dseg.nii.gz + .tsv  lesions and their contralateral mirrors
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from . import io, maptable, phantom, physics
from .errors import InputError

N_PATIENTS = 17
# The paper's split: these six train/validate, the other eleven test.
TRAIN_PATIENTS = ("P01", "P02", "P10", "P14", "P15", "P17")
TRAINING_INDEPENDENT_FRACTION = 0.5  # physics.md: half the training voxels tissue-independent

# Cohorts: 'paper' (the 17-patient split of the paper, for the LSTM and DNN) and 'stroke'
# (stroke-like patients, phantom.PatientConfig.stroke; every patient is a test patient: the spatial
# model makes its own training patients).
COHORTS = ("paper", "stroke")

TRUTH_FILE_KEYS = {n: maptable.MAPS[n].desc for n in ("S0", "R2", "Y", "v", "chi_nb", "OEF")}  # file name part


def patient_id(index: int) -> str:
    return f"P{index:02d}"


def split_of(pid: str, cohort: str = "paper") -> str:
    return "train" if cohort == "paper" and pid in TRAIN_PATIENTS else "test"


def cohort_of(dataset: str | Path) -> str:
    """The cohort a data set was simulated as (its dataset_description.json; 'paper' when it says none)."""
    path = Path(dataset) / "dataset_description.json"
    try:
        return io.read_json(path).get("Cohort", "paper") if path.exists() else "paper"
    except (OSError, ValueError, InputError):
        return "paper"


@dataclasses.dataclass
class NoiseModel:
    """Rician magnitude noise at an SNR (sigma = mean brain S(TE1) / SNR) and Gaussian QSM noise."""

    snr: float | None = 100.0  # None: noise-free
    qsm_noise_ppb: float = 2.0

    def __post_init__(self):
        if self.snr is not None and not (np.isfinite(self.snr) and self.snr > 0):
            raise InputError(f"SNR must be a positive number, got {self.snr}.")
        if not (np.isfinite(self.qsm_noise_ppb) and self.qsm_noise_ppb >= 0):
            raise InputError(f"QSM noise must be zero or a positive number of ppb, got {self.qsm_noise_ppb}.")

    @property
    def noise_free(self) -> bool:
        return self.snr is None

    def describe(self) -> str:
        if self.noise_free:
            return "noise-free"
        return f"SNR {self.snr:g}, QSM noise {self.qsm_noise_ppb:g} ppb"


def synthesize(params: dict, mask: np.ndarray, protocol: physics.Protocol, noise: NoiseModel,
               rng: np.random.Generator, chunk_voxels: int = 1_000_000):
    """Echo magnitudes (z, y, x, echo) and QSM (ppm) of the truth maps, with noise.

    Returns (echoes float32, qsm float32, magnitude noise sigma). Outside the mask the signal is 0
    (plus noise, as in a real magnitude image); QSM is 0 outside the mask, as QSM pipelines give.
    """
    shape = mask.shape
    echoes = np.zeros(shape + (protocol.n_echoes,), dtype=np.float32)
    qsm = np.zeros(shape, dtype=np.float32)
    idx = np.flatnonzero(mask)
    flat = {k: v.reshape(-1) for k, v in params.items()}
    e_flat = echoes.reshape(-1, protocol.n_echoes)
    q_flat = qsm.reshape(-1)
    for start in range(0, idx.size, chunk_voxels):  # bounded memory for large volumes
        sel = idx[start:start + chunk_voxels]
        p = {k: flat[k][sel].astype(np.float64) for k in physics.PARAMETER_NAMES}
        e_flat[sel] = physics.qbold_signal(p["S0"], p["R2"], p["Y"], p["v"], p["chi_nb"], protocol)
        q_flat[sel] = physics.qsm_value(p["Y"], p["v"], p["chi_nb"])
    sigma = 0.0
    if not noise.noise_free:
        sigma = float(e_flat[idx, 0].mean() / noise.snr)
        for e in range(protocol.n_echoes):  # Rician: modulus of complex Gaussian noise
            re = echoes[..., e] + np.float32(sigma) * rng.standard_normal(shape, dtype=np.float32)
            im = np.float32(sigma) * rng.standard_normal(shape, dtype=np.float32)
            echoes[..., e] = np.hypot(re, im)
        if noise.qsm_noise_ppb > 0:
            qsm[mask] += np.float32(noise.qsm_noise_ppb * 1e-3) * rng.standard_normal(idx.size, dtype=np.float32)
    return echoes, qsm, sigma


def patient_files(folder: Path, pid: str | None = None) -> dict[str, Path]:
    """Paths of every file of one patient folder."""
    folder = Path(folder)
    pid = pid or folder.name
    files = {
        "echoes": folder / f"{pid}_MEGRE.nii.gz",
        "sidecar": folder / f"{pid}_MEGRE.json",
        "qsm": folder / f"{pid}_Chimap.nii.gz",
        "mask": folder / f"{pid}_desc-brain_mask.nii.gz",
        "labels": folder / f"{pid}_dseg.nii.gz",
        "labels_tsv": folder / f"{pid}_dseg.tsv",
        "lesions": folder / f"{pid}_desc-lesions_dseg.nii.gz",
        "lesions_tsv": folder / f"{pid}_desc-lesions_dseg.tsv",
    }
    for name, key in TRUTH_FILE_KEYS.items():
        files[f"truth_{name}"] = folder / f"{pid}_desc-truth_{key}map.nii.gz"
    return files


def write_patient(folder: Path, pid: str, patient: phantom.VirtualPatient, echoes, qsm,
                  protocol: physics.Protocol, noise: NoiseModel, sigma: float, seed_info: dict) -> None:
    """Write one patient's files into `folder` (which the caller moves into place atomically)."""
    files = patient_files(folder, pid)
    g = patient.geometry
    io.write_volume(echoes, g, files["echoes"])
    io.write_json({**protocol.to_dict(), "EchoTimeUnits": "s", "MRAcquisitionType": "3D",
                   "ImageType": ["ORIGINAL", "PRIMARY", "M"], "Noise": noise.describe(),
                   "NoiseSigma": sigma, "SNR": noise.snr, "QSMNoisePPB": noise.qsm_noise_ppb,
                   "VirtualPatient": seed_info}, files["sidecar"])
    io.write_volume(qsm, g, files["qsm"])
    io.write_volume(patient.mask.astype(np.uint8), g, files["mask"])
    for name in physics.PARAMETER_NAMES:
        io.write_volume(patient.params[name], g, files[f"truth_{name}"])
    io.write_volume(patient.oef_percent.astype(np.float32), g, files["truth_OEF"])
    io.write_volume(patient.labels, g, files["labels"])
    io.write_volume(patient.lesion_map, g, files["lesions"])
    _write_lut(phantom.LABELS, files["labels_tsv"])
    _write_lut(phantom.LESION_MAP_LABELS, files["lesions_tsv"])


def _write_lut(labels: dict, path: Path) -> None:
    lines = ["index\tname"] + [f"{k}\t{v}" for k, v in labels.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@dataclasses.dataclass
class PatientData:
    """One patient folder, loaded."""

    pid: str
    echoes: np.ndarray  # (z, y, x, echo)
    qsm: np.ndarray
    mask: np.ndarray
    protocol: physics.Protocol
    geometry: io.Geometry
    truth: dict[str, np.ndarray] | None = None  # S0, R2, Y, v, chi_nb, OEF (percent)
    labels: np.ndarray | None = None
    lesion_map: np.ndarray | None = None
    sidecar: dict | None = None

    @property
    def metric_mask(self) -> np.ndarray:
        """The brain without CSF: where accuracy is measured."""
        if self.labels is None:
            return self.mask
        return self.mask & (self.labels != phantom.CSF_LABEL)


def load_patient(folder: str | Path, with_truth: bool = True) -> PatientData:
    folder = Path(folder)
    files = patient_files(folder)
    if not files["echoes"].exists():
        raise InputError(f"{folder} is not a virtual-patient folder (no {files['echoes'].name}).")
    echoes, geometry = io.read_volume(files["echoes"])
    sidecar = io.read_json(files["sidecar"])
    qsm, _ = io.read_volume(files["qsm"])
    mask, _ = io.read_volume(files["mask"], dtype=np.uint8)
    try:
        protocol = physics.Protocol.from_dict(sidecar)
    except KeyError as exc:  # the field strength of data is never assumed
        raise InputError(f"{files['sidecar']}: no {exc.args[0]} (EchoTime in seconds, MagneticFieldStrength in "
                         "tesla); add it to the sidecar.") from None
    except (TypeError, ValueError) as exc:
        raise InputError(f"{files['sidecar']}: {exc}") from None
    data = PatientData(folder.name, echoes, qsm, mask.astype(bool), protocol, geometry, sidecar=sidecar)
    if with_truth:
        data.truth = {name: io.read_volume(files[f"truth_{name}"])[0] for name in TRUTH_FILE_KEYS}
        data.labels = io.read_volume(files["labels"], dtype=np.uint8)[0]
        data.lesion_map = io.read_volume(files["lesions"], dtype=np.uint8)[0]
    return data


def list_patients(dataset: str | Path, split: str | None = None) -> list[Path]:
    """Patient folders of a data set, in order; split 'train' or 'test' filters by the paper's split."""
    dataset = Path(dataset)
    if not dataset.is_dir():
        raise InputError(f"{dataset}: no such data set folder. Make one with `oefpredictor simulate`.")
    folders = sorted(p for p in dataset.iterdir() if p.is_dir() and patient_files(p)["echoes"].exists())
    if split is not None:
        cohort = cohort_of(dataset)
        folders = [p for p in folders if split_of(p.name, cohort) == split]
    return folders


def patient_seed(seed: int, index: int) -> np.random.SeedSequence:
    """Each patient's random stream depends only on the data-set seed and the patient number, so
    `--patients 2` gives the same P01 and P02 as `--patients 17`."""
    return np.random.SeedSequence([int(seed), int(index)])


def simulate_dataset(out: str | Path, n_patients: int = N_PATIENTS, seed: int = 0,
                     protocol: physics.Protocol | None = None, noise: NoiseModel | None = None,
                     voxel_size: float = 1.0, independent_fraction: float | None = None,
                     lesions: bool | None = None, overwrite: bool = False, progress=None,
                     first_index: int = 1, cohort: str = "paper", r2_field_exponent: float = 0.0,
                     patient_overrides: dict | None = None) -> list[Path]:
    """Simulate and write virtual patients P01..Pnn into `out`.

    Each patient folder is built under a temporary name and moved into place only when complete.
    `independent_fraction` None means the default policy: the training-split patients get half
    their voxels tissue-independent (physics.md), the test patients none (plausible brains).
    `progress(done, total, message)` is called after each patient. cohort 'stroke' makes stroke-like
    patients (2-6 lesions of all shapes; `lesions=False` for lesion-free ones) with the population
    priors, no tissue-independent voxels. `r2_field_exponent` p: R2 is the 3 T value x (B0 / 3)^p (tissue
    R2 grows with the field, roughly p = 0.5-1; 0 keeps the 3 T values). `patient_overrides`: fields of
    phantom.PatientConfig (e.g. other tissue priors or lesion shapes, for held-out tests).
    """
    if cohort not in COHORTS:
        raise InputError(f"Unknown cohort {cohort!r}; use one of {', '.join(COHORTS)}.")
    protocol = protocol or physics.Protocol.default()
    noise = noise or NoiseModel()
    out = Path(out)
    pids = check_dataset_output(out, n_patients, overwrite, first_index)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for n, pid in enumerate(pids):
        index = first_index + n
        anatomy_seed, noise_seed = patient_seed(seed, index).spawn(2)
        fraction = independent_fraction
        if fraction is None:
            fraction = TRAINING_INDEPENDENT_FRACTION if split_of(pid, cohort) == "train" else 0.0
        overrides = dict(patient_overrides or {}, independent_fraction=fraction)
        if cohort == "stroke":
            config = phantom.PatientConfig.stroke(voxel_size, lesions=True if lesions is None else lesions, **overrides)
        else:
            config = phantom.PatientConfig(voxel_size=voxel_size, lesions=lesions, **overrides)
        patient = phantom.make_patient(anatomy_seed, config)
        if r2_field_exponent:
            r2 = patient.params["R2"] * (protocol.field_strength / 3.0) ** r2_field_exponent
            r2 = np.where(patient.mask, np.clip(r2, *physics.BOUNDS["R2"]), 0.0)
            patient = dataclasses.replace(patient, params=dict(patient.params, R2=r2))
        echoes, qsm, sigma = synthesize(patient.params, patient.mask, protocol, noise,
                                        np.random.default_rng(noise_seed))
        info = {"DatasetSeed": seed, "PatientIndex": index, "VoxelSizeMM": voxel_size, "Cohort": cohort,
                "IndependentFraction": fraction, "Lesions": patient.lesions}
        with io.atomic_directory(out / pid, overwrite=overwrite, command="simulate") as tmp:
            write_patient(tmp, pid, patient, echoes, qsm, protocol, noise, sigma, info)
        written.append(out / pid)
        _update_dataset_index(out, pid, patient, seed, protocol, noise, voxel_size, fraction, cohort)
        if progress:
            progress(n + 1, n_patients, pid)
    return written


def check_dataset_output(out: str | Path, n_patients: int, overwrite: bool = False,
                         first_index: int = 1) -> list[str]:
    """Refuse, before any work, what simulate_dataset could not write. Returns the patient ids."""
    if not 1 <= n_patients <= 99:
        raise InputError(f"--patients must be between 1 and 99, got {n_patients}.")
    out = Path(out)
    io.check_writable_dir(out)
    pids = [patient_id(first_index + i) for i in range(n_patients)]
    existing = [pid for pid in pids if (out / pid).exists()]
    if existing and not overwrite:
        raise InputError(f"{out} already holds {', '.join(existing)}; choose another folder or pass --overwrite.")
    return pids


def _update_dataset_index(out: Path, pid, patient, seed, protocol, noise, voxel_size, fraction, cohort="paper"):
    """dataset_description.json and participants.tsv, rewritten after each patient."""
    io.write_json({"Name": "OEFPredictor virtual patients", "BIDSVersion": "1.9.0",
                   "DatasetType": "derivative", "GeneratedBy": [{"Name": "oefpredictor simulate"}],
                   "Seed": seed, "Protocol": protocol.to_dict(), "Noise": noise.describe(),
                   "SNR": noise.snr, "QSMNoisePPB": noise.qsm_noise_ppb, "VoxelSizeMM": voxel_size,
                   "Cohort": cohort, "TrainPatients": list(TRAIN_PATIENTS) if cohort == "paper" else [],
                   "Anatomy": "MNI ICBM152 2009a symmetric templates (nilearn), randomly deformed"},
                  out / "dataset_description.json")
    table = out / "participants.tsv"
    rows = {}
    if table.exists():
        for line in table.read_text(encoding="utf-8").splitlines()[1:]:
            rows[line.split("\t")[0]] = line
    lesions = ";".join(f"{l['type']}({l.get('radius_mm', l.get('size_mm'))}mm)" for l in patient.lesions) or "none"
    rows[pid] = f"{pid}\t{split_of(pid, cohort)}\t{fraction:g}\t{lesions}"
    header = "participant_id\tsplit\tindependent_fraction\tlesions"
    table.write_text("\n".join([header] + [rows[k] for k in sorted(rows)]) + "\n", encoding="utf-8")
