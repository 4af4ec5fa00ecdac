"""The population-prior reference predictor of the evaluation."""
import numpy as np

from OEFPredictorLib import evaluate, phantom, physics, simulate


def test_prior_mean_outputs_each_tissues_design_prior(tiny_dataset):
    predict = evaluate.METHODS["prior_mean"](None)
    patient = simulate.load_patient(tiny_dataset / "P01")
    targets = np.arange(patient.mask.sum())
    out = predict(patient, targets)
    labels = patient.labels[patient.mask]
    for label, tissue in enumerate(phantom.TISSUES, start=1):
        sel = labels == label
        if sel.any():
            assert np.allclose(out["Y"][sel], phantom.TISSUE_PRIORS[tissue]["Y"][0])
            assert np.allclose(out["R2"][sel], phantom.TISSUE_PRIORS[tissue]["R2"][0])
    lesion = np.isin(labels, list(phantom.LESION_LABELS.values()))
    assert lesion.any() and np.allclose(out["Y"][lesion], np.mean([0.58, 0.57]))
    # S0 is scaled so that the prior's own signal reproduces the voxel's echo 1.
    gm = np.flatnonzero(labels == 1)[0]
    p = phantom.TISSUE_PRIORS["cortical_GM"]
    s1 = physics.qbold_signal(out["S0"][gm], p["R2"][0], p["Y"][0], p["v"][0], p["chi_nb"][0],
                              patient.protocol)[0]
    assert np.isclose(s1, patient.echoes[patient.mask][gm, 0], rtol=1e-5)
