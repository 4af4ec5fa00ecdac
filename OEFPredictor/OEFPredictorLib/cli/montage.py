"""`oefpredictor montage`: a PNG of one virtual patient (echo 1, QSM, truth OEF, labels)."""
from __future__ import annotations

from pathlib import Path


def register(sub):
    p = sub.add_parser("montage", help="PNG montage of one virtual patient",
                       description="Axial slice of a virtual patient: echo 1, QSM, truth OEF and labels.")
    p.add_argument("patient", help="patient folder written by `oefpredictor simulate` (e.g. data/P03)")
    p.add_argument("--out", required=True, help="PNG file to write, or a folder (then FOLDER/<patient>_montage.png)")
    p.add_argument("--slice", type=int, default=None, help="axial slice index (default: through the lesion "
                                                          "or the brain's centre)")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import figures, io

    out = figures.montage_path(args.out, Path(args.patient).name)
    io.check_writable_parent(out)
    path = figures.patient_montage(args.patient, out, args.slice)
    print(f"Wrote {path}")
    return 0
