"""Recalibrate a trained spatial model's 90 % OEF interval over the acquisitions it reads
(calibration.recalibrate) and write it into the model's card:

    PYTHONPATH=OEFPredictor python -m OEFPredictorLib.training.recalibrate MODEL.keras --patients 60
"""
from __future__ import annotations

import argparse

from .. import models
from . import calibration
from .context import ContextTrainConfig


def main(argv=None) -> int:
    """python -m OEFPredictorLib.training.recalibrate MODEL.keras: recalibrate the model's interval (its
    .json card, written by `oefpredictor train`, is replaced whole, atomically)."""
    parser = argparse.ArgumentParser(prog="python -m OEFPredictorLib.training.recalibrate", description=main.__doc__)
    parser.add_argument("model", help="a spatial model (.keras) with its .json card beside it")
    parser.add_argument("--patients", type=int, default=ContextTrainConfig.calibration_patients)
    args = parser.parse_args(argv)
    bundle = models.load_bundle(args.model)
    config = ContextTrainConfig(calibration_patients=args.patients,
                                voxel_size_mm=float(bundle.card["spatial"]["voxel_size_mm"]))
    found = calibration.recalibrate(bundle, config, lambda i, n, what: print(f"{what}: {i}/{n}", flush=True))
    card = dict(bundle.card, spatial=dict(bundle.card["spatial"], **found))
    path = models.write_card(args.model, card)
    record = found["calibration"]
    lesions = (f"{record['lesion_coverage_before']:.3f} -> {record['lesion_coverage_after']:.3f} in lesions"
               if record["lesion_coverage_after"] is not None else "no lesion voxels")
    print(f"{path}: coverage {record['coverage_before']:.3f} -> {record['coverage_after']:.3f} over the brain, {lesions}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
