"""Image I/O details that would silently corrupt data if wrong."""
import numpy as np
import pytest

from OEFPredictorLib import io


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
def test_nonfinite_voxels_survive_a_round_trip(tmp_path, suffix):
    # SimpleITK alone reads NaN/Inf in NIfTI as 0, which would pass as a valid QSM of 0 ppm.
    geometry = io.Geometry((1.0, 2.0, 3.0), (10.0, -5.0, 2.0))
    volume = np.ones((4, 5, 6), np.float32)
    volume[1, 2, 3], volume[2, 2, 2] = np.nan, np.inf
    io.write_volume(volume, geometry, tmp_path / f"v{suffix}")
    back, g = io.read_volume(tmp_path / f"v{suffix}")
    assert g.matches(geometry)
    assert [tuple(i) for i in np.argwhere(~np.isfinite(back))] == [(1, 2, 3), (2, 2, 2)]
    echoes = np.ones((3, 4, 5, 2), np.float32)
    echoes[0, 1, 2, 1] = np.nan
    io.write_volume(echoes, geometry, tmp_path / f"e{suffix}")
    back, _ = io.read_volume(tmp_path / f"e{suffix}")
    assert back.shape == echoes.shape
    assert [tuple(i) for i in np.argwhere(~np.isfinite(back))] == [(0, 1, 2, 1)]


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with io.atomic_directory(tmp_path / "out") as tmp:
            (tmp / "half_written.nii.gz").write_bytes(b"partial")
            raise RuntimeError("failed half-way")
    assert list(tmp_path.iterdir()) == []
    with io.atomic_directory(tmp_path / "out") as tmp:
        (tmp / "done.txt").write_text("ok")
    assert (tmp_path / "out" / "done.txt").read_text() == "ok"
    with pytest.raises(io.InputError, match="--overwrite"):
        with io.atomic_directory(tmp_path / "out"):
            pass


def test_overwrite_replaces_only_earlier_outputs(tmp_path):
    inputs = tmp_path / "sub-01"
    inputs.mkdir()
    (inputs / "sub-01_MEGRE.nii.gz").write_bytes(b"precious")
    with pytest.raises(io.InputError, match="not an output folder"):
        with io.atomic_directory(inputs, overwrite=True):
            pass
    assert (inputs / "sub-01_MEGRE.nii.gz").read_bytes() == b"precious"
    with io.atomic_directory(tmp_path / "out") as tmp:  # an earlier output carries the marker
        (tmp / "oef.nii.gz").write_text("old")
    with io.atomic_directory(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "oef.nii.gz").write_text("new")
    assert (tmp_path / "out" / "oef.nii.gz").read_text() == "new"
    (tmp_path / "empty").mkdir()
    with io.atomic_directory(tmp_path / "empty", overwrite=True) as tmp:
        (tmp / "a").write_text("a")
    assert (tmp_path / "empty" / "a").exists()


def test_load_inputs_takes_given_echo_times_and_field_as_numbers(tiny_dataset, tmp_path):
    """The cohort's path: echo times and field strength come in as numbers (no text round trip)
    and override the sidecar; the maps are written under the table's names."""
    from OEFPredictorLib import files, maptable, predict, simulate

    paths = simulate.patient_files(tiny_dataset / "P01")
    notes = []
    inputs, geometry = files.load_inputs(paths["echoes"], paths["qsm"], paths["mask"], notes=notes)
    assert inputs.protocol.field_strength == 3.0 and inputs.mask.any() and inputs.spacing == geometry.spacing
    tes = [t + 0.5 for t in inputs.protocol.echo_times_ms]
    given, _ = files.load_inputs([paths["echoes"]], paths["qsm"], echo_times_ms=tes, field_strength=7.0, notes=notes)
    assert given.protocol.echo_times_ms == tes and given.protocol.field_strength == 7.0 and given.mask is None
    assert notes and "contradicts" in notes[0]
    shape = inputs.qsm.shape
    result = predict.PredictionResult({"OEF": np.ones(shape, np.float32), "OEF_width": np.ones(shape, np.float32)},
                                      inputs.mask, [], 0.0, "cpu", None)
    written = files.write_maps(result, geometry, tmp_path)
    assert {n: p.name for n, p in written.items()} == {"OEF": maptable.MAPS["OEF"].file, "mask": maptable.MASK_FILE}
