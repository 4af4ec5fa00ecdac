"""Shared fixtures: small virtual patients made once per test session (real phantom, real files)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "OEFPredictor"))  # also works without `pip install -e .`


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """Two noise-free 4 mm virtual patients (P01 train split, P02 train split), with lesions."""
    from OEFPredictorLib import simulate

    out = tmp_path_factory.mktemp("tiny_dataset")
    simulate.simulate_dataset(out, n_patients=2, seed=11, voxel_size=4.0, lesions=True,
                              noise=simulate.NoiseModel(snr=None, qsm_noise_ppb=0.0))
    return out


@pytest.fixture(scope="session")
def tiny_noisy_dataset(tmp_path_factory) -> Path:
    """Three 4 mm virtual patients at SNR 100, QSM noise 2 ppb (P01-P03: two train, one test)."""
    from OEFPredictorLib import simulate

    out = tmp_path_factory.mktemp("tiny_noisy_dataset")
    simulate.simulate_dataset(out, n_patients=3, seed=12, voxel_size=4.0, lesions=True,
                              noise=simulate.NoiseModel(snr=100.0, qsm_noise_ppb=2.0))
    return out
