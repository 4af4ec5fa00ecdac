"""`oefpredictor simulate`: write virtual patients (mGRE + QSM + truth maps)."""
from __future__ import annotations

import time

from ..errors import InputError


def register(sub):
    p = sub.add_parser("simulate", help="simulate virtual patients (mGRE, QSM, truth maps)",
                       description="Simulate virtual patients with the QQ forward model on deformed "
                                   "MNI152 anatomy. Writes one BIDS-like folder per patient (P01, P02, ...).")
    p.add_argument("--out", required=True, help="output data-set folder")
    p.add_argument("--patients", type=int, default=17, help="number of patients (default 17, the paper's)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files")
    p.add_argument("--snr", type=float, default=100.0,
                   help="magnitude SNR: mean brain S(TE1) / Rician sigma (default 100)")
    p.add_argument("--qsm-noise-ppb", type=float, default=2.0, help="Gaussian QSM noise SD in ppb (default 2)")
    p.add_argument("--no-noise", action="store_true", help="noise-free echoes and QSM")
    p.add_argument("--te", default=None,
                   help="echo times in milliseconds, comma-separated (default 4.5,9.5,...,39.5)")
    p.add_argument("--field-strength", type=float, default=3.0, help="B0 in tesla (default 3)")
    p.add_argument("--voxel-size", type=float, default=1.0, help="isotropic voxel size in mm (default 1)")
    p.add_argument("--independent-fraction", type=float, default=None,
                   help="share of brain voxels with tissue-independent parameters; default: 0.5 for "
                        "the training patients (P01, P02, P10, P14, P15, P17), 0 for the test patients")
    p.add_argument("--cohort", choices=("paper", "stroke"), default="paper",
                   help="paper (default): the paper's 17-patient split, 0-2 lesions; stroke: stroke-like test "
                        "patients, 2-6 lesions of both kinds (spheres, blobs, wedges, cortical territories, "
                        "3-25 mm), every patient a test patient")
    p.add_argument("--no-lesions", action="store_true", help="lesion-free patients (specificity checks)")
    p.add_argument("--overwrite", action="store_true", help="replace patient folders that exist")
    p.add_argument("--bids", action="store_true",
                   help="write a BIDS raw data set instead (sub-P01/anat/ per-echo MEGRE files and Chimap; "
                        "mask, labels and truth maps under derivatives/simulate/), the input of `oefpredictor batch`")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import physics, simulate
    from . import parse_echo_times_ms, progress_bar

    if args.te is None:
        protocol = physics.Protocol.default()
        if args.field_strength != 3.0:
            protocol = physics.Protocol(protocol.echo_times, args.field_strength)
    else:
        protocol = parse_echo_times_ms(args.te, args.field_strength)
    if not args.no_noise and args.snr <= 0:
        raise InputError(f"--snr must be positive (e.g. 100), got {args.snr:g}.")
    if args.qsm_noise_ppb < 0:
        raise InputError(f"--qsm-noise-ppb must be zero or positive (e.g. 2), got {args.qsm_noise_ppb:g}.")
    if not 0.3 <= args.voxel_size <= 8:
        raise InputError(f"--voxel-size {args.voxel_size:g} mm is not usable; choose 0.3-8 mm.")
    if args.independent_fraction is not None and not 0 <= args.independent_fraction <= 1:
        raise InputError("--independent-fraction must lie between 0 and 1.")
    noise = simulate.NoiseModel(None if args.no_noise else args.snr, 0.0 if args.no_noise else args.qsm_noise_ppb)

    simulate.check_dataset_output(args.out, args.patients, args.overwrite)  # before any work
    target = args.out
    if args.bids:  # simulate into a scratch folder beside the output, then convert
        import shutil
        import tempfile
        from pathlib import Path

        from .. import bids

        bids.check_raw_output(args.out, [simulate.patient_id(i + 1) for i in range(args.patients)], args.overwrite)
        Path(args.out).absolute().parent.mkdir(parents=True, exist_ok=True)
        target = tempfile.mkdtemp(prefix=".simulate-", dir=Path(args.out).absolute().parent)
    start = time.perf_counter()
    bar = progress_bar(args.patients, "Simulating", unit="patient")

    def progress(done, total, pid):
        bar.set_postfix_str(pid)
        bar.update(1)

    try:
        folders = simulate.simulate_dataset(
            target, args.patients, args.seed, protocol, noise, args.voxel_size,
            args.independent_fraction, lesions=False if args.no_lesions else None, overwrite=args.overwrite,
            progress=progress, cohort=args.cohort)
        if args.bids:
            folders = bids.write_simulated_bids(target, args.out, args.overwrite)
    finally:
        bar.close()
        if args.bids:
            shutil.rmtree(target, ignore_errors=True)
    print(f"Wrote {len(folders)} virtual patients ({protocol.describe()}; {noise.describe()}; "
          f"{args.voxel_size:g} mm) to {args.out} in {time.perf_counter() - start:.1f} s.")
    return 0
