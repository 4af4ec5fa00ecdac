"""roistats: every statistic against a direct numpy computation on known arrays."""
from __future__ import annotations

import math

import numpy as np
import pytest

from OEFPredictorLib import roistats
from OEFPredictorLib.errors import InputError

SHAPE = (4, 6, 5)
VOXEL_ML = 0.008  # 2 mm isotropic


def row_of(rows, roi, map_name="OEF"):
    (row,) = [r for r in rows if r["roi"] == roi and r["map"] == map_name]
    return row


@pytest.fixture()
def case():
    """A map with NaNs, a reference, two ROIs (one partly outside the mask), a single-voxel ROI and
    an empty one."""
    rng = np.random.default_rng(3)
    values = rng.normal(40.0, 8.0, SHAPE)
    reference = values + rng.normal(1.5, 2.0, SHAPE)
    values[0, 0, :2] = np.nan  # inside roi_a
    reference[1, 1, 1] = np.nan  # inside roi_a: excluded from the pairs only
    values[3, 5, 4] = np.inf  # inside roi_b but outside the mask: dropped by the mask first
    mask = np.ones(SHAPE, bool)
    mask[3] = False
    roi_a = np.zeros(SHAPE, bool)
    roi_a[:2] = True
    roi_b = np.zeros(SHAPE, bool)
    roi_b[2:, 3:] = True  # half of it in slice 3 (outside the mask)
    single = np.zeros(SHAPE, bool)
    single[2, 0, 0] = True
    empty = np.zeros(SHAPE, bool)
    rois = {"a": roi_a, "b": roi_b, "single": single, "empty": empty}
    return values, reference, mask, rois


def expected_describe(v):
    v = np.asarray(v, dtype=np.float64)
    return {"mean": v.mean(), "sd": v.std(ddof=1), "median": np.median(v), "min": v.min(),
            "max": v.max(), "p05": np.percentile(v, 5), "p95": np.percentile(v, 95)}


def test_descriptive_statistics_equal_numpy(case):
    values, reference, mask, rois = case
    rows = roistats.roi_statistics({"OEF": values}, rois, VOXEL_ML, mask=mask)
    assert [(r["roi"], r["map"]) for r in rows] == [(n, "OEF") for n in rois]
    assert all(list(r) == list(roistats.COLUMNS) for r in rows)
    for name in ("a", "b"):
        sel = rois[name] & mask
        v = values[sel]
        v = v[np.isfinite(v)]
        row = row_of(rows, name)
        for key, want in expected_describe(v).items():
            assert row[key] == pytest.approx(want, rel=1e-12), (name, key)
        assert row["n_voxels"] == sel.sum()
        assert row["n_valid"] == v.size
        assert row["n_nonfinite"] == sel.sum() - v.size
        assert row["volume_ml"] == pytest.approx(sel.sum() * VOXEL_ML)
        assert row["n_outside_mask"] == (rois[name] & ~mask).sum()
    assert row_of(rows, "a")["n_nonfinite"] == 2  # the two NaNs
    assert row_of(rows, "b")["n_outside_mask"] == 3 * 5  # slice 3: rows 3..5, all 5 columns
    assert row_of(rows, "b")["n_nonfinite"] == 0  # the inf was outside the mask


def test_nans_excluded_not_propagated():
    values = np.full((1, 1, 4), np.nan)
    values[0, 0, :2] = [10.0, 20.0]
    rows = roistats.roi_statistics({"OEF": values}, {"all": np.ones((1, 1, 4), bool)}, 1.0)
    row = rows[0]
    assert (row["mean"], row["n_valid"], row["n_nonfinite"]) == (15.0, 2, 2)
    assert row["sd"] == pytest.approx(math.sqrt(50.0))  # ddof=1: ((5^2 + 5^2) / 1) ** 0.5


def test_single_voxel_and_empty_rois(case):
    values, reference, mask, rois = case
    rows = roistats.roi_statistics({"OEF": values}, rois, VOXEL_ML, mask=mask,
                                   reference={"OEF": reference})
    one = row_of(rows, "single")
    x = values[2, 0, 0]
    assert one["n_voxels"] == 1 and one["volume_ml"] == pytest.approx(VOXEL_ML)
    for key in ("mean", "median", "min", "max", "p05", "p95"):
        assert one[key] == pytest.approx(x)
    assert math.isnan(one["sd"])  # undefined with one value (ddof=1)
    d = x - reference[2, 0, 0]
    assert one["n_paired"] == 1
    assert one["bias"] == pytest.approx(d) and one["rmse"] == pytest.approx(abs(d))
    assert math.isnan(one["pearson_r"]) and math.isnan(one["ba_loa_upper"])

    empty = row_of(rows, "empty")
    assert (empty["n_voxels"], empty["n_valid"], empty["n_paired"], empty["volume_ml"]) == (0, 0, 0, 0)
    for key in ("mean", "sd", "median", "min", "max", "p05", "p95", "rmse", "mae", "bias",
                "pearson_r", "ba_mean_diff", "ba_loa_lower", "ba_loa_upper"):
        assert math.isnan(empty[key]), key


def test_roi_entirely_outside_the_mask(case):
    values, _, mask, _ = case
    roi = np.zeros(SHAPE, bool)
    roi[3, :2, :2] = True
    (row,) = roistats.roi_statistics({"OEF": values}, {"out": roi}, VOXEL_ML, mask=mask)
    assert (row["n_voxels"], row["n_outside_mask"]) == (0, 4)
    assert math.isnan(row["mean"])


def test_comparison_statistics_equal_numpy(case):
    values, reference, mask, rois = case
    rows = roistats.roi_statistics({"OEF": values}, rois, VOXEL_ML, mask=mask,
                                   reference={"OEF": reference})
    for name in ("a", "b"):
        sel = rois[name] & mask & np.isfinite(values) & np.isfinite(reference)
        x, y = values[sel], reference[sel]
        d = x - y
        row = row_of(rows, name)
        assert row["n_paired"] == sel.sum()
        assert row["bias"] == pytest.approx(d.mean(), rel=1e-12)
        assert row["ba_mean_diff"] == pytest.approx(d.mean(), rel=1e-12)
        assert row["mae"] == pytest.approx(np.abs(d).mean(), rel=1e-12)
        assert row["rmse"] == pytest.approx(np.sqrt((d ** 2).mean()), rel=1e-12)
        assert row["pearson_r"] == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-12)
        assert row["ba_sd_diff"] == pytest.approx(d.std(ddof=1), rel=1e-12)
        assert row["ba_loa_lower"] == pytest.approx(d.mean() - 1.96 * d.std(ddof=1), rel=1e-12)
        assert row["ba_loa_upper"] == pytest.approx(d.mean() + 1.96 * d.std(ddof=1), rel=1e-12)
    assert row_of(rows, "a")["n_paired"] == row_of(rows, "a")["n_valid"] - 1  # the reference NaN


def test_maps_without_reference_get_nan_comparison(case):
    values, reference, mask, rois = case
    rows = roistats.roi_statistics({"OEF": values, "R2": values / 2}, rois, VOXEL_ML,
                                   reference={"OEF": reference})
    r2 = row_of(rows, "a", "R2")
    assert r2["n_paired"] == 0 and math.isnan(r2["rmse"])
    assert r2["mean"] == pytest.approx(row_of(rows, "a")["mean"] / 2)
    assert r2["unit"] == "Hz" and row_of(rows, "a")["unit"] == "%"


def test_contrast_to_noise_constructed_case():
    lesion_vals = np.array([60.0, 62.0, 64.0, 66.0])  # mean 63, var 20/3
    ref_vals = np.array([40.0, 41.0, 42.0, 43.0, 44.0])  # mean 42, var 2.5
    values = np.full((1, 1, 12), np.nan)
    values[0, 0, :4] = lesion_vals
    values[0, 0, 4:9] = ref_vals
    lesion = np.zeros(values.shape, bool)
    lesion[0, 0, :4] = True
    lesion[0, 0, 9] = True  # a NaN voxel: excluded
    ref = np.zeros(values.shape, bool)
    ref[0, 0, 4:9] = True
    want = (63.0 - 42.0) / math.sqrt((20.0 / 3.0 + 2.5) / 2.0)
    assert roistats.contrast_to_noise(values, lesion, ref) == pytest.approx(want, rel=1e-12)
    assert roistats.cnr_from_values(ref_vals, lesion_vals) == pytest.approx(-want, rel=1e-12)
    # The same number in the table, on the lesion's row, for the map and the reference.
    rows = roistats.roi_statistics({"OEF": values}, {"lesion": lesion, "contralateral_lesion": ref},
                                   1.0, reference={"OEF": values * 2},
                                   contrasts=roistats.contralateral_pairs(["lesion", "contralateral_lesion"]))
    row = row_of(rows, "lesion")
    assert row["contrast_reference"] == "contralateral_lesion"
    assert row["contrast"] == pytest.approx(21.0)
    assert row["cnr"] == pytest.approx(want, rel=1e-12)
    assert row["reference_cnr"] == pytest.approx(want, rel=1e-12)  # scale-invariant
    assert math.isnan(row_of(rows, "contralateral_lesion")["cnr"])
    # Undefined cases: a one-voxel region, or no spread at all.
    one = np.zeros(values.shape, bool)
    one[0, 0, 0] = True
    assert math.isnan(roistats.contrast_to_noise(values, one, ref))
    assert math.isnan(roistats.cnr_from_values(np.ones(3), np.zeros(3)))


def test_rois_from_labels_and_names():
    labels = np.zeros(SHAPE, np.uint8)
    labels[0] = 2
    labels[1, :2] = 6
    rois = roistats.rois_from_labels(labels, {1: "cortical_GM", 2: "WM"})
    assert list(rois) == ["WM", "label_6"]
    assert rois["WM"].dtype == bool and rois["WM"].sum() == labels[0].size
    assert rois["label_6"].sum() == 2 * SHAPE[2]
    with_empty = roistats.rois_from_labels(labels, {0: "background", 1: "cortical_GM", 2: "WM"},
                                           include_empty=True)
    assert list(with_empty) == ["cortical_GM", "WM", "label_6"] and not with_empty["cortical_GM"].any()
    with pytest.raises(InputError, match="non-integer"):
        roistats.rois_from_labels(np.full(SHAPE, 0.5))


def test_shape_mismatch_names_the_arrays(case):
    values, reference, mask, rois = case
    with pytest.raises(InputError, match=r"reference 'OEF' has shape \(4, 6, 4\)"):
        roistats.roi_statistics({"OEF": values}, rois, VOXEL_ML, reference={"OEF": reference[..., :4]})
    with pytest.raises(InputError, match=r"mask has shape"):
        roistats.roi_statistics({"OEF": values}, rois, VOXEL_ML, mask=mask[:2])
    with pytest.raises(InputError, match=r"ROI 'x' has shape"):
        roistats.roi_statistics({"OEF": values}, {"x": np.ones((2, 2, 2), bool)}, VOXEL_ML)


def test_csv_round_trip_and_markdown(case, tmp_path):
    values, reference, mask, rois = case
    rows = roistats.roi_statistics({"OEF": values}, rois, VOXEL_ML, mask=mask,
                                   reference={"OEF": reference})
    path = roistats.write_csv(rows, tmp_path / "s.csv")
    back = roistats.read_csv(path)
    assert [list(r) for r in back] == [list(roistats.COLUMNS)] * len(rows)
    for got, want in zip(back, rows):
        for key in roistats.COLUMNS:
            if isinstance(want[key], float) and math.isnan(want[key]):
                assert math.isnan(got[key]), key
            else:
                assert got[key] == want[key], key  # floats round-trip exactly
    assert [p.name for p in tmp_path.iterdir()] == ["s.csv"]  # no temporary left
    table = roistats.format_table(rows)
    assert table.count("\n") == len(rows) + 2 and "| single | OEF | 1 |" in table


def test_helpers():
    assert roistats.voxel_volume_ml((2.0, 2.0, 2.0)) == pytest.approx(0.008)
    assert roistats.map_name_from_path("out/oef.nii.gz") == "OEF"
    assert roistats.map_name_from_path("chi_nb.nii.gz") == "chi_nb"
    assert roistats.map_name_from_path("P03_desc-truth_chinbmap.nii.gz") == "chi_nb"
    assert roistats.map_name_from_path("P03_desc-truth_OEFmap.nii.gz") == "OEF"
    assert roistats.map_name_from_path("my_map.nrrd") == "my_map"
    d = roistats.difference_map(np.array([[[1.0, np.nan, 3.0]]]), np.array([[[0.5, 1.0, np.inf]]]))
    assert d[0, 0, 0] == 0.5 and np.isnan(d[0, 0, 1:]).all()


def test_box_roi_axis_aligned_and_rotated():
    # Grid: 2 mm voxels, origin (10, 20, 30); shape (z, y, x) = (5, 6, 7).
    m = np.eye(4)
    m[:3, :3] = np.diag([2.0, 2.0, 2.0])
    m[:3, 3] = [10.0, 20.0, 30.0]
    # Centres x = 10 + 2i: a box from x 13 to 19 holds i = 2, 3, 4; y 20..24 holds j = 0..2
    # (faces count as inside); z 33..35 holds k = 2.
    box = roistats.box_roi((5, 6, 7), m, center=(16.0, 22.0, 34.0), size=(6.0, 4.0, 2.0))
    want = np.zeros((5, 6, 7), bool)
    want[2, 0:3, 2:5] = True
    np.testing.assert_array_equal(box, want)
    # The same box turned 90 degrees about z: its first axis along world y, its second along -x.
    axes = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    # Sides 4 mm along world y (j = 0..2) and 8 mm along world x (x 12..20: i = 1..5).
    turned = roistats.box_roi((5, 6, 7), m, center=(16.0, 22.0, 34.0), size=(4.0, 8.0, 2.0), axes=axes)
    want_turned = np.zeros((5, 6, 7), bool)
    want_turned[2, 0:3, 1:6] = True
    np.testing.assert_array_equal(turned, want_turned)
    unturned = roistats.box_roi((5, 6, 7), m, center=(16.0, 22.0, 34.0), size=(4.0, 8.0, 2.0))
    assert not np.array_equal(unturned, want_turned)
    assert not roistats.box_roi((5, 6, 7), m, center=(0.0, 0.0, 0.0), size=(1.0, 1.0, 1.0)).any()
