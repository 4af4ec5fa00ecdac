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


# The fast lane (`make test-fast`, pytest -m "not slow"): tests that train or load networks on whole
# patients, start Dask clusters, Qt panels or command-line subprocesses, or simulate cohorts are
# marked slow here, by module or by name, from their measured times (--durations); `make test` runs
# everything, as CI does. A test may also carry @pytest.mark.slow itself.
SLOW_MODULES = {
    "test_batch.py", "test_batch_inputs.py", "test_cli_help.py", "test_cli_predict.py", "test_context.py",
    "test_field_strength_and_masks.py", "test_models_jax.py",
    "test_reliability.py", "test_rnst_cli.py", "test_rnst_module.py", "test_rnst_run.py", "test_rnst_widget.py",
    "test_slicer_comparison.py", "test_slicer_logic.py", "test_slicer_widget.py", "test_spatial.py",
    "test_train_evaluate.py",
}
SLOW_TESTS = {
    "test_console_command_simulates_and_draws_a_montage", "test_cat_recovers_noise_free_patient",
    "test_registered_in_evaluate", "test_predict_voxels_contract[cat]",
    "test_engine_equals_plain_model_predict_across_chunks", "test_cli_equals_library",
    "test_training_targets_hold_r2_in_3t_equivalent_time", "test_qsm_is_referenced_to_the_brains_csf_and_a_mask_without_csf_is_named",
    "test_the_engine_with_a_field_map_maps_dephased_echoes_as_the_undephased_ones",
    "test_predict_reads_a_field_map_in_the_unit_given_or_its_sidecar_and_never_assumes_one",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_MODULES or item.name in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


def pytest_ignore_collect(collection_path, config):
    # in the fast lane the slow modules are not even imported (their imports alone take seconds)
    if config.getoption("markexpr") == "not slow" and collection_path.name in SLOW_MODULES:
        return True
    return None
