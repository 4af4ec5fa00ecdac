"""The table of maps: every reader of a map's name, file, desc label and unit gets them from one row."""
from __future__ import annotations

import re

from OEFPredictorLib import maptable, roistats


def test_rows_are_consistent():
    files = [m.file for m in maptable.MAPS.values() if m.file]
    assert len(files) == len(set(files)) and maptable.MASK_FILE not in files
    for m in maptable.MAPS.values():
        assert re.fullmatch(r"[A-Za-z0-9]+", m.desc), m.desc  # a BIDS desc- label
        assert m.group in ("base", "interval", "cbf")
        assert m.display_range is None or m.display_range[0] < m.display_range[1]
    assert "OEF" in maptable.BASE and "OEF_width" in maptable.INTERVAL


def test_file_names_and_desc_labels_lead_back_to_their_map():
    for name, m in maptable.MAPS.items():
        assert maptable.name_of_file(m.desc) == name
        if m.file:
            assert roistats.map_name_from_path(f"/out/{m.file}") == name
        assert roistats.map_name_from_path(f"P01_desc-truth_{m.desc}map.nii.gz") == name
    assert roistats.map_name_from_path("other.nii.gz") == "other"


def test_a_map_without_a_row_gets_a_plain_one():
    spec = maptable.spec("T2star_x")
    assert spec.unit == "" and spec.colors == "grey" and spec.desc == "T2starx" and spec.file == "T2star_x.nii.gz"
