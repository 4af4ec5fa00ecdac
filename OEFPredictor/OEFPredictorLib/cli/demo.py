"""`oefpredictor demo`: the README's main job on the bundled demo patient."""
from __future__ import annotations

import time
from pathlib import Path

# The demo patient: deterministic, 2 mm (a whole brain predicts in about a minute on 2 CPU cores),
# a test-split patient with lesions.
DEMO_SEED = 2024
DEMO_VOXEL_SIZE = 2.0


def register(sub):
    p = sub.add_parser("demo", help="run the main job on the demo patient",
                       description="Simulate the demo virtual patient (deterministic), predict its OEF "
                                   "maps with the bundled model, and write maps, a figure and statistics.")
    p.add_argument("--out", default="demo_output", help="output folder (default demo_output)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=run)


def make_demo_patient(folder: Path) -> Path:
    """Simulate the demo patient into folder/P03 and return that patient folder."""
    from .. import simulate

    simulate.simulate_dataset(folder, n_patients=1, seed=DEMO_SEED, voxel_size=DEMO_VOXEL_SIZE,
                              independent_fraction=0.0, lesions=True, first_index=3, overwrite=True)
    return folder / "P03"


def run(args) -> int:
    from .. import figures, io

    start = time.perf_counter()
    with io.atomic_directory(args.out, overwrite=args.overwrite) as tmp:
        patient = make_demo_patient(Path(tmp) / "patient")
        figures.patient_montage(patient, Path(tmp) / "virtual_patient.png")
    print(f"Demo patient and montage written to {args.out} in {time.perf_counter() - start:.1f} s.")
    return 0
