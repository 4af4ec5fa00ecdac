"""`oefpredictor predict`: OEF and QQ parameter maps from echo images + QSM (the main job on real data).

Output names are a contract other tools rely on: DIR/oef.nii.gz (percent), S0, R2 (Hz), Y, v,
chi_nb (ppm), quality, cmro2 (with --cbf), mask (the voxels predicted; every map is 0 outside it),
and prediction.json (provenance). Methods with an interval (the spatial models: context, the default,
and unet) add
oef_p05.nii.gz and oef_p95.nii.gz: the bounds of the 90 % interval of OEF (percent), calibrated to
hold 90 % of the true values of held-out virtual patients (see the model card's calibration).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from .. import methods
from ..errors import InputError
from . import help_literal

OUTPUT_FILES = {"OEF": "oef.nii.gz", "S0": "S0.nii.gz", "R2": "R2.nii.gz", "Y": "Y.nii.gz", "v": "v.nii.gz",
                "chi_nb": "chi_nb.nii.gz", "quality": "quality.nii.gz", "CMRO2": "cmro2.nii.gz",
                "OEF_p05": "oef_p05.nii.gz", "OEF_p95": "oef_p95.nii.gz"}  # OEF_width: p95 - p05, not written
MASK_FILE = "mask.nii.gz"
PROVENANCE_FILE = "prediction.json"


def register(sub):
    p = sub.add_parser(
        "predict", help="predict OEF maps from mGRE echoes + QSM",
        description="Predict OEF (percent), S0, R2, Y, v, chi_nb and a quality map (and CMRO2 with --cbf) "
                    "from multi-echo GRE magnitude images and a QSM map, with the spatial context network "
                    "(default; also the 90 % OEF interval, oef_p05/oef_p95), the paper's LSTM (--method lstm), "
                    "another method, or your model. Outputs have the geometry of the inputs; 0 outside mask.nii.gz, the "
                    "voxels predicted.")
    p.add_argument("--echoes", nargs="+", required=True, metavar="FILE",
                   help="one 4D image (echo on the 4th axis), several 3D images in echo order, or a DICOM "
                        "multi-echo series folder")
    p.add_argument("--qsm", required=True, metavar="FILE", help="QSM map in ppm (image or DICOM folder)")
    p.add_argument("--mask", metavar="FILE", help="brain mask (nonzero inside); default: derived from echo 1")
    p.add_argument("--te", metavar="MS,MS,...",
                   help="echo times in milliseconds; default: the BIDS sidecar (EchoTime in seconds) next to "
                        "the echo file, or the DICOM EchoTime tags")
    p.add_argument("--cbf", metavar="FILE", help="CBF map (mL/100 g/min) for a CMRO2 map")
    p.add_argument("--model", metavar="FILE", help="a .keras model with its .json card (default: bundled)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="auto (GPU if the backend sees one, else CPU; default), cpu, or gpu")
    p.add_argument("--method", default=None, choices=list(methods.METHODS), type=str.lower,
                   help=help_literal(f"default: {methods.DEFAULT_METHOD}, or the method the --model file was "
                                     "trained for. " + methods.help_text()))
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist unless --overwrite)")
    p.set_defaults(func=run)


def load_inputs(args):
    """Read and cross-check the input files -> (PredictionInputs, geometry)."""
    from .. import io, physics, predict
    from . import parse_echo_times_ms

    te_ms = parse_echo_times_ms(args.te).echo_times_ms if args.te else None
    notes = []
    echoes, geometry, tes, field = io.read_echo_series(args.echoes, te_ms, notes)
    for note in notes:
        sys.stderr.write(f"oefpredictor predict: warning: {note}\n")
    args.load_warnings = notes
    try:
        protocol = physics.Protocol.from_milliseconds(tes, field or 3.0)
    except ValueError as exc:
        raise InputError(f"Echo times of {args.echoes[0]}: {exc}") from None
    echo_name = f"the echoes ({Path(args.echoes[0]).name})"

    def read_3d(path, what):
        array, geom = io.read_image(path)
        if array.ndim != 3:
            raise InputError(f"{path}: the {what} must be a 3D volume; it has shape {array.shape}"
                             + (" (a 2D image)." if array.ndim == 2 else "."))
        io.check_same_grid(echo_name, echoes.shape, geometry, f"the {what} ({Path(path).name})", array.shape, geom)
        return array

    qsm = read_3d(args.qsm, "QSM")
    mask = None
    if args.mask:
        m = read_3d(args.mask, "mask")
        mask = np.nan_to_num(m) > 0.5
    cbf = read_3d(args.cbf, "CBF") if args.cbf else None
    return predict.PredictionInputs(echoes, qsm, protocol, mask, cbf, geometry.spacing), geometry


def write_maps(result, geometry, folder: Path) -> list[Path]:
    """The maps of a PredictionResult as NIfTI files with the input geometry, and its mask.

    Every map is 0 where nothing was predicted, and 0 is also a valid value (OEF 0 %: Y at its
    bound 0.98), so mask.nii.gz, the voxels predicted, is always written beside the maps and
    `oefpredictor stats` uses it by default. (NaN instead of 0 would not do: ITK, hence 3D Slicer,
    reads NaN in NIfTI as 0.)"""
    from .. import io

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, array in result.maps.items():
        if name not in OUTPUT_FILES:
            continue
        path = folder / OUTPUT_FILES[name]
        io.write_volume(array.astype(np.float32), geometry, path)
        written.append(path)
    io.write_volume(result.mask.astype(np.uint8), geometry, folder / MASK_FILE)
    written.append(folder / MASK_FILE)
    return written


def output_file(map_name: str) -> str:
    """The file of a map: OUTPUT_FILES, else NAME.nii.gz (maps added to the engine later)."""
    return OUTPUT_FILES.get(map_name, f"{map_name}.nii.gz")


def provenance(result, args_dict: dict, protocol) -> dict:
    card = result.model_card or {}
    return {"method": result.method, "device": result.device, "elapsed_s": round(result.elapsed_s, 3),
            "n_voxels": result.n_voxels, "mask_derived": result.mask_derived, "warnings": result.warnings,
            "protocol": {"echo_times_ms": protocol.echo_times_ms, "field_strength_T": protocol.field_strength},
            "model": {"file": card.get("file"), "sha256": card.get("sha256"), "model": card.get("model")},
            "inputs": args_dict,
            "units": {"OEF": "%", "S0": "input units", "R2": "Hz", "Y": "fraction", "v": "fraction",
                      "chi_nb": "ppm", "quality": "normalised RMS residual (see OEFPredictorLib.predict)",
                      "CMRO2": "umol/100 g/min", "OEF_p05": "% (5th percentile of the 90 % interval)",
                      "OEF_p95": "% (95th percentile of the 90 % interval)"},
            "interval": _interval_note(card)}


def _interval_note(card: dict) -> dict | None:
    """How the OEF interval was made and calibrated (methods with an interval only)."""
    info = card.get("spatial")
    if not info:
        return None
    return {"coverage": "90 % (true OEF between oef_p05 and oef_p95)",
            "calibration": info.get("calibration"), "interval_scale": info.get("interval_scale")}


def run_prediction(inputs, args, bar_label: str = "Predicting"):
    """predict_maps with a progress bar on stderr."""
    from .. import predict
    from . import progress_bar

    bar = progress_bar(1000, bar_label, unit="")
    bar.bar_format = "{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}"

    def progress(fraction, message):
        bar.n = int(round(1000 * min(max(fraction, 0.0), 1.0)))
        bar.set_postfix_str(message, refresh=False)
        bar.refresh()

    try:
        return predict.predict_maps(inputs, model=getattr(args, "model_bundle", None) or args.model,
                                    device=args.device, method=args.method, progress=progress)
    finally:
        bar.close()


def run(args) -> int:
    from .. import io, predict

    start = time.perf_counter()
    out = Path(args.out)
    inputs_given = [*args.echoes, args.qsm, args.mask, args.cbf]
    inputs_given += [io.sidecar_path(p) for p in args.echoes]
    names = [*OUTPUT_FILES.values(), MASK_FILE, PROVENANCE_FILE]
    io.check_output_dir(out, args.overwrite, inputs_given, names)  # before any work
    method, args.model_bundle = predict.resolve_method(args.method, args.model)  # a bad model fails before any work
    args.method = method.name
    inputs, geometry = load_inputs(args)
    expected = args.model_bundle.protocol if args.model_bundle is not None else None
    inputs.validate(expected)
    with io.atomic_directory(out, overwrite=args.overwrite, inputs=inputs_given, command="predict") as tmp:
        result = run_prediction(inputs, args)
        result.warnings[:0] = args.load_warnings
        write_maps(result, geometry, Path(tmp))
        record = {k: v for k, v in vars(args).items() if k not in ("func", "model_bundle", "load_warnings")}
        io.write_json(provenance(result, record, inputs.protocol), Path(tmp) / PROVENANCE_FILE)
    for w in result.warnings[len(args.load_warnings):]:  # those of loading were printed already
        sys.stderr.write(f"oefpredictor predict: warning: {w}\n")
    n = result.n_voxels
    print(f"OEF maps of {n} voxels written to {out}/ ({', '.join(OUTPUT_FILES[k] for k in result.maps if k in OUTPUT_FILES)}"
          f", {MASK_FILE}) in {time.perf_counter() - start:.1f} s "
          f"(prediction {result.elapsed_s:.1f} s on the {result.device.upper()}).")
    return 0
