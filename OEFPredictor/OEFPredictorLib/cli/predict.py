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

from .. import fieldmap, methods
from . import help_literal


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
    p.add_argument("--mask", metavar="FILE", help="brain mask (nonzero inside); default: where the QSM is defined "
                                                  "(finite, not 0), or from echo 1 when the QSM is defined everywhere")
    p.add_argument("--te", metavar="MS,MS,...",
                   help="echo times in milliseconds; default: the BIDS sidecar (EchoTime in seconds) next to "
                        "the echo file, or the DICOM EchoTime tags")
    p.add_argument("--field-strength", type=float, metavar="T",
                   help="B0 field strength in tesla; default: MagneticFieldStrength of the BIDS sidecar, or the DICOM "
                        "tag (0018,0087). Never assumed: without any of these the command stops")
    p.add_argument("--cbf", metavar="FILE", help="CBF map (mL/100 g/min) for a CMRO2 map")
    p.add_argument("--field-map", metavar="FILE",
                   help="field map (the total or background field of a QSM pipeline, on the echoes' grid) to correct "
                        "the echoes for macroscopic field gradients (near the sinuses); recommended: uncorrected, "
                        "such gradients read OEF 4-39 points low where they exceed 1 Hz/mm")
    p.add_argument("--field-map-units", metavar="UNIT",
                   help=f"unit of --field-map: {fieldmap.UNITS_LISTED}; default: Units of its BIDS sidecar (never "
                        "assumed)")
    p.add_argument("--model", metavar="FILE", help="a .keras model with its .json card (default: bundled)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="auto (GPU if the backend sees one, else CPU; default), cpu, or gpu")
    p.add_argument("--method", default=None, choices=list(methods.METHODS), type=str.lower,
                   help=help_literal(f"default: {methods.DEFAULT_METHOD}, or the method the --model file was "
                                     "trained for. " + methods.help_text()))
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist unless --overwrite)")
    p.set_defaults(func=run)


def run_prediction(inputs, predictor, device: str, bar_label: str = "Predicting"):
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
        return predict.predict_maps(inputs, predictor, device, progress=progress)
    finally:
        bar.close()


def run(args) -> int:
    from .. import files, io, maptable, predict
    from . import parse_echo_times_ms

    start = time.perf_counter()
    out = Path(args.out)
    inputs_given = [*args.echoes, args.qsm, args.mask, args.cbf, args.field_map]
    inputs_given += [io.sidecar_path(p) for p in args.echoes]
    names = [m.file for m in maptable.MAPS.values() if m.file] + [maptable.MASK_FILE, maptable.PROVENANCE_FILE]
    io.check_output_dir(out, args.overwrite, inputs_given, names)  # before any work
    method, _ = predict.resolve_method(args.method, args.model)  # a bad model fails before any work
    args.method = method.name
    te_ms = parse_echo_times_ms(args.te).echo_times_ms if args.te else None
    notes = []
    if args.field_strength is not None and not 0 < args.field_strength <= 21:
        raise InputError(f"--field-strength {args.field_strength:g}: give the field strength in tesla (e.g. 3).")
    if args.field_map:  # the unit used, as prediction.json records it (given, or from the sidecar)
        args.field_map_units = files.field_map_unit(args.field_map, args.field_map_units)
    inputs, geometry = files.load_inputs(args.echoes, args.qsm, args.mask, args.cbf, te_ms, args.field_strength,
                                         notes=notes, field_map=args.field_map, field_map_units=args.field_map_units)
    args.field_strength_used = inputs.protocol.field_strength
    for note in notes:
        sys.stderr.write(f"oefpredictor predict: warning: {note}\n")
    # the bundled model that reads this protocol; refuses a model for another one
    predictor = predict.Predictor.build(inputs.protocol, method.name, args.model)
    inputs.validate()  # unusable inputs: one line before the progress bar
    with io.atomic_directory(out, overwrite=args.overwrite, inputs=inputs_given, command="predict") as tmp:
        result = run_prediction(inputs, predictor, args.device)
        result.warnings[:0] = notes
        written = files.write_maps(result, geometry, tmp)
        record = {k: v for k, v in vars(args).items() if k != "func"}
        io.write_json(files.provenance(result, record, inputs.protocol), Path(tmp) / maptable.PROVENANCE_FILE)
    for w in result.warnings[len(notes):]:  # those of loading were printed already
        sys.stderr.write(f"oefpredictor predict: warning: {w}\n")
    if result.mask_derived:
        sys.stderr.write(f"oefpredictor predict: note: no --mask given; the mask ({maptable.MASK_FILE}) is "
                         f"{result.mask_source}.\n")
    if not args.field_map:
        sys.stderr.write(f"oefpredictor predict: note: {fieldmap.NOT_CORRECTED_NOTE}\n")
    sys.stderr.flush()  # the result line comes last
    print(f"OEF maps of {result.n_voxels} voxels written to {out}/ ({', '.join(p.name for p in written.values())}) "
          f"in {time.perf_counter() - start:.1f} s (prediction {result.elapsed_s:.1f} s on the {result.device.upper()}).")
    return 0

