"""A prediction's files: its inputs read and cross-checked (load_inputs), its maps and mask
written under the names of maptable.MAPS (write_maps), and how they were made (provenance).

The command line (predict, demo) and the cohort runner (cohort) all read and write through here, so
the output conventions hold everywhere. It sits above the engine (it builds predict.PredictionInputs)
and below its callers: the core never imports the command line.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import fieldmap, maptable, physics, predict
from .errors import InputError
from .io import (Geometry, check_same_grid, read_echo_series, read_image, read_json, resolve_field_strength,
                 sidecar_path, write_volume)


def load_inputs(echoes, qsm, mask=None, cbf=None, echo_times_ms=None, field_strength: float | None = None,
                notes: list[str] | None = None, field_map=None, field_map_units: str | None = None):
    """Read and cross-check a prediction's input files -> (predict.PredictionInputs, Geometry).

    echoes: one 4D file, several 3D files in echo order, or a DICOM folder (read_echo_series).
    echo_times_ms / field_strength: given values (numbers) that override what the files say.
    `notes` receives warnings about the files (e.g. given echo times that contradict a sidecar).
    field_map: a field map file for the gradient correction (fieldmap.py), in field_map_units, else
    the unit that its BIDS sidecar's "Units" gives; never assumed."""
    echoes = [echoes] if isinstance(echoes, (str, os.PathLike)) else list(echoes)
    te_ms = None if echo_times_ms is None else [float(t) for t in echo_times_ms]
    array, geometry, tes, field = read_echo_series(echoes, te_ms, notes)
    field = resolve_field_strength(echoes, field_strength, field, notes)  # never assumed
    try:
        protocol = physics.Protocol.from_milliseconds(tes, field)
    except ValueError as exc:
        raise InputError(f"Echo times and field strength of {echoes[0]}: {exc}") from None
    echo_name = f"the echoes ({Path(echoes[0]).name})"

    def read_3d(path, what):
        volume, geom = read_image(path)
        if volume.ndim != 3:
            raise InputError(f"{path}: the {what} must be a 3D volume; it has shape {volume.shape}"
                             + (" (a 2D image)." if volume.ndim == 2 else "."))
        check_same_grid(echo_name, array.shape, geometry, f"the {what} ({Path(path).name})", volume.shape, geom)
        return volume

    qsm_array = read_3d(qsm, "QSM")
    mask_array = None if mask is None else np.nan_to_num(read_3d(mask, "mask")) > 0.5
    cbf_array = None if cbf is None else read_3d(cbf, "CBF")
    field_map_hz = None
    if field_map is not None:
        unit = field_map_unit(field_map, field_map_units)
        field_map_hz = fieldmap.to_hz(read_3d(field_map, "field map"), unit, protocol.field_strength)
    inputs = predict.PredictionInputs(array, qsm_array, protocol, mask_array, cbf_array, geometry.spacing,
                                      field_map_hz)
    return inputs, geometry


def field_map_unit(path, given: str | None) -> str:
    """The unit of a field map: the one given, else its BIDS sidecar's "Units"; never assumed (Hz and
    rad/s differ by 2 pi, and a wrong unit scales the whole correction)."""
    if given is not None:
        unit = fieldmap.unit_named(given)
        if unit is None:
            raise InputError(f"--field-map-units {given}: use one of {', '.join(fieldmap.UNITS)}.")
        return unit
    sidecar = sidecar_path(path)
    said = read_json(sidecar).get("Units") if Path(sidecar).is_file() else None
    unit = None if said is None else fieldmap.unit_named(said)
    if unit is None:
        where = f"its sidecar {Path(sidecar).name} says {said!r}" if said is not None else "it has no BIDS sidecar with Units"
        raise InputError(f"The unit of the field map {Path(path).name} is unknown ({where}); say it in the "
                         f"sidecar (\"Units\": one of {', '.join(fieldmap.UNITS)}) or with --field-map-units.")
    return unit


def write_maps(result, geometry: Geometry, folder: str | os.PathLike, file_name=None,
               mask_file: str | None = None) -> dict[str, Path]:
    """The maps of a PredictionResult as images with the input geometry, and its mask.

    file_name(maptable.MapSpec) -> the file of a map (default its row's `file`; None: not written);
    mask_file: the mask's name (default maptable.MASK_FILE). Returns {map name or 'mask': path}.
    Every map is 0 where nothing was predicted, and 0 is also a valid value (OEF 0 %: Y at its
    bound 0.98), so the mask, the voxels predicted, is always written beside the maps and
    `oefpredictor stats` uses it by default. (NaN instead of 0 would not do: ITK, hence 3D Slicer,
    reads NaN in NIfTI as 0.)"""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, array in result.maps.items():
        spec = maptable.spec(name)
        target = file_name(spec) if file_name else spec.file
        if target:
            write_volume(np.asarray(array, dtype=np.float32), geometry, folder / target)
            written[name] = folder / target
    written["mask"] = folder / (mask_file or maptable.MASK_FILE)
    write_volume(result.mask.astype(np.uint8), geometry, written["mask"])
    return written


def provenance(result, inputs: dict, protocol) -> dict:
    """prediction.json: how the maps were made (method, model, protocol, inputs) and what each is."""
    card = result.model_card or {}
    spatial = card.get("spatial")
    return {"method": result.method, "device": result.device, "elapsed_s": round(result.elapsed_s, 3),
            "n_voxels": result.n_voxels, "mask_derived": result.mask_derived,
            "mask": getattr(result, "mask_source", "given"), "warnings": result.warnings,
            "protocol": {"echo_times_ms": protocol.echo_times_ms, "field_strength_T": protocol.field_strength},
            "model": {"file": card.get("file"), "sha256": card.get("sha256"), "model": card.get("model")},
            "inputs": inputs,
            "maps": {name: {"file": maptable.spec(name).file, "unit": maptable.spec(name).unit,
                            "description": maptable.spec(name).description} for name in result.maps},
            # how the OEF interval was made and calibrated (methods with an interval only)
            "interval": spatial and {"coverage": "90 % (true OEF between oef_p05 and oef_p95)",
                                     "calibration": spatial.get("calibration"),
                                     "interval_scale": spatial.get("interval_scale")},
            # the OEF map's gain about the brain's median, by the data's noise (spatial models; the warnings say
            # when it drew the map towards the median)
            "contrast_gain": spatial and spatial.get("contrast_gain")}
