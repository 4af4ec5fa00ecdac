"""Accuracy of OEF methods on the test patients: the paper's Tables 2 and 3, and what they lack.

Per test patient, inside the metric mask (brain without CSF): RMSE and bias of S0 (relative to the
voxel's echo-1 magnitude), R2 (Hz), Y, v, chi_nb (ppm) and OEF (percentage points), averaged over
patients; the lesion-vs-contralateral OEF contrast; and each method's wall time per brain. Results
are always labelled with the data set's SNR and QSM noise.

Methods are a registry, `METHODS: dict[str, factory]`. A factory takes a `MethodContext` (data set,
model paths, training patients, seed) and returns `predict(patient, targets) -> dict` where
`patient` is a `simulate.PatientData`, `targets` are positions in the patient's in-mask voxel list
(C order, `patient.echoes[patient.mask]` rows) and the dict holds float arrays S0 (input units), R2,
Y, v, chi_nb for exactly those voxels. Adding a method is one line:

    evaluate.METHODS["nlls"] = lambda ctx: my_predict      # e.g. from baselines.py

The factory runs once per evaluation (load models, build databases there), predict once per patient.
Every method is given exactly the same target voxels. Built in: the trained models of methods.METHODS
('context', 'unet', 'lstm', 'dnn'), run through the engine users run (predict.predict_maps), and 'tissue_mean' (the trivial predictor: each tissue label's mean parameters over the
training patients' truth; it uses the test patient's true healthy-tissue labels, lesions get the
healthy-brain mean) and 'tissue_oracle' (each voxel gets its own patient's true tissue mean: not a
method, the bar a method must pass to resolve anything within a tissue).
"""
from __future__ import annotations

import csv
import dataclasses
import io as _io
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from . import baselines, maptable, methods, models, phantom, physics, simulate
from .errors import InputError

# Specificity: an invented lesion is a cluster of at least this many voxels whose predicted OEF departs
# from the brain's median by more than the threshold while the true OEF does not.
INVENTED_THRESHOLD_PP, INVENTED_MIN_VOXELS = 10.0, 8
LOW_SIGNAL_QUANTILE = 0.2  # "low-SNR regions": the brain's darkest fifth on echo 1
METRIC_NAMES = ("S0", "R2", "Y", "v", "chi_nb", "OEF")
# errors: S0 relative to the echo-1 magnitude, OEF as a difference of percentages
METRIC_UNITS = {**{n: maptable.unit(n) for n in METRIC_NAMES}, "S0": "rel. echo 1", "OEF": maptable.PERCENTAGE_POINTS}
LESION_CODES = (1, 2)  # phantom.LESION_MAP_LABELS: the lesions themselves (3, 4 are their mirror regions)


@dataclasses.dataclass
class MethodContext:
    """What a method factory may use. `models` maps method name -> model file (None: bundled)."""

    dataset: Path
    models: dict[str, str | None] = dataclasses.field(default_factory=dict)
    train_patients: tuple[str, ...] = simulate.TRAIN_PATIENTS
    seed: int = 0


Predict = Callable[[simulate.PatientData, np.ndarray], dict]


# --- Built-in methods -------------------------------------------------------------------------
def engine_predictor(method: methods.Method, model=None) -> Predict:
    """predict() for a trained model: the call users run (predict.predict_maps on the whole brain:
    the model's protocol check, the clamp to physical bounds, the OEF interval), the targets' rows out.
    model: a ModelBundle or file, or None for the method's bundled model that reads each patient's protocol."""
    from . import predict

    def run(patient: simulate.PatientData, targets: np.ndarray) -> dict:
        predictor = predict.Predictor.build(patient.protocol, method.name, model)
        inputs = predict.PredictionInputs(patient.echoes, patient.qsm, patient.protocol, mask=patient.mask,
                                          spacing=patient.geometry.spacing)
        result = predict.predict_maps(inputs, predictor)
        return {k: v[patient.mask][targets] for k, v in result.maps.items()}

    run.whole_brain = True  # its time is a whole brain's, whatever the targets
    return run


def keras_method(name: str):
    def factory(ctx: MethodContext) -> Predict:
        # predict's rule: the given model file, else the method's bundled one, checked against the method
        from . import predict

        method, _ = predict.resolve_method(name, ctx.models.get(name))  # a bad model fails here, in one line
        return engine_predictor(method, ctx.models.get(name))

    return factory


def tissue_mean_factory(ctx: MethodContext) -> Predict:
    """The trivial predictor: every voxel gets its tissue's mean truth over the training patients."""
    sums, counts = {}, {}
    for folder in simulate.list_patients(ctx.dataset):
        if folder.name not in ctx.train_patients:
            continue
        p = simulate.load_patient(folder)
        m = p.metric_mask
        echo1 = p.echoes[..., 0][m]
        rel = {n: (p.truth[n][m] / echo1 if n == "S0" else p.truth[n][m]) for n in physics.PARAMETER_NAMES}
        labels = p.labels[m]
        for lab in np.unique(labels):
            sel = labels == lab
            sums.setdefault(int(lab), np.zeros(5))
            sums[int(lab)] += [rel[n][sel].sum(dtype=np.float64) for n in physics.PARAMETER_NAMES]
            counts[int(lab)] = counts.get(int(lab), 0) + int(sel.sum())
    if not counts:
        raise InputError(f"{ctx.dataset} holds none of the training patients {', '.join(ctx.train_patients)}; "
                         "the trivial predictor needs their truth.")
    # lesions are not a tissue class the trivial predictor may know: they get the healthy-brain mean
    lesion = set(phantom.LESION_LABELS.values())
    means = {lab: sums[lab] / counts[lab] for lab in counts if lab not in lesion}
    overall = (sum(sums[lab] for lab in means) / sum(counts[lab] for lab in means)) if means else \
        sum(sums.values()) / sum(counts.values())

    return label_lookup_predictor(means, overall)


def label_lookup_predictor(table: dict[int, np.ndarray], default: np.ndarray) -> Predict:
    """A predictor that gives every voxel the parameters (S0 / S(TE1), R2, Y, v, chi_nb) listed for
    its tissue label, `default` for labels not listed; S0 is scaled back by the voxel's echo 1."""
    lookup = np.array([table.get(lab, default) for lab in range(256)])

    def predict(patient: simulate.PatientData, targets: np.ndarray) -> dict:
        values = lookup[patient.labels[patient.mask][targets]]
        out = {n: values[:, i].astype(np.float32) for i, n in enumerate(physics.PARAMETER_NAMES)}
        out["S0"] = out["S0"] * patient.echoes[..., 0][patient.mask][targets]
        return out

    return predict


HEALTHY_LABELS = (1, 2)  # cortical GM and WM (phantom.TISSUES, from 1): the healthy brain of the constant guess


def healthy_prior_Y() -> float:
    """The constant guess's Y: the mean of the healthy tissues' prior means (phantom.TISSUE_PRIORS)."""
    return float(np.mean([phantom.TISSUE_PRIORS[phantom.TISSUES[label - 1]]["Y"][0] for label in HEALTHY_LABELS]))


def constant_factory(ctx: MethodContext) -> Predict:
    """The constant guess: every voxel gets the healthy brain's population-prior values (GM / WM
    average), whatever its tissue. A method that cannot beat it has learnt nothing about OEF."""
    return prior_mean_factory(ctx, per_tissue=False)


def prior_mean_factory(ctx: MethodContext, per_tissue: bool = True) -> Predict:
    """The population-prior predictor: every voxel gets its tissue's design-prior mean
    (phantom.TISSUE_PRIORS; lesions the healthy-brain value), S0 the echo-1 value times the mean
    S0 / S(TE1) of that prior. Unlike 'tissue_mean' it is not pulled by the training patients'
    tissue-independent voxels, so it is the fair 'knows nothing but the population' reference: a
    method has learnt something from the data only where it beats this."""
    by_protocol = {}  # S0 / S(TE1) depends on the echo times: one lookup per protocol

    def predictor_for(protocol: physics.Protocol) -> Predict:
        table = {}
        for label, tissue in enumerate(phantom.TISSUES, start=1):
            prior = phantom.TISSUE_PRIORS[tissue]
            Y, v, R2, chi = (prior[n][0] for n in ("Y", "v", "R2", "chi_nb"))
            s0_rel = 1.0 / physics.qbold_signal(1.0, R2, Y, v, chi, protocol)[0]
            table[label] = np.array([s0_rel, R2, Y, v, chi])
        healthy = np.mean([table[lab] for lab in HEALTHY_LABELS], axis=0)  # lesions: the GM / WM average
        return label_lookup_predictor(table if per_tissue else {}, healthy)

    def predict(patient: simulate.PatientData, targets: np.ndarray) -> dict:
        if patient.protocol not in by_protocol:
            by_protocol[patient.protocol] = predictor_for(patient.protocol)
        return by_protocol[patient.protocol](patient, targets)

    return predict


def tissue_oracle_factory(ctx: MethodContext) -> Predict:
    """Not a method but a bar: each voxel gets its own patient's true tissue mean (lesions: the healthy
    mean). Its RMSE is the within-tissue spread of the truth, which a method must resolve to beat it."""

    def predict(patient: simulate.PatientData, targets: np.ndarray) -> dict:
        m = patient.metric_mask[patient.mask]
        labels = patient.labels[patient.mask]
        echo1 = patient.echoes[..., 0][patient.mask]
        healthy = m & ~np.isin(labels, list(phantom.LESION_LABELS.values()))
        out = {}
        for n in physics.PARAMETER_NAMES:
            values = patient.truth[n][patient.mask] / (echo1 if n == "S0" else 1.0)
            table = np.full(256, values[healthy].mean())
            for lab in np.unique(labels[healthy]):
                table[lab] = values[healthy & (labels == lab)].mean()
            out[n] = table[labels[targets]].astype(np.float32)
        out["S0"] = out["S0"] * echo1[targets]
        return out

    return predict


METHODS: dict[str, Callable[[MethodContext], Predict]] = {
    **{m.name: keras_method(m.name) for m in methods.METHODS.values() if m.uses_model},
    "constant": constant_factory,
    "tissue_mean": tissue_mean_factory,
    "prior_mean": prior_mean_factory,
    "tissue_oracle": tissue_oracle_factory,
}
# The classical QQ methods (voxelwise NLLS, CAT, CCM): baselines.py.
METHODS.update({name: baselines.evaluate_factory(name) for name in baselines.METHODS})


# --- Metrics ----------------------------------------------------------------------------------
def oef_percent(Y: np.ndarray) -> np.ndarray:
    return 100.0 * physics.oef_from_Y(np.asarray(Y, dtype=np.float64))


def errors_of(pred: dict, truth: dict, echo1: np.ndarray) -> dict[str, np.ndarray]:
    """Prediction - truth per metric; S0 relative to echo 1, OEF in percentage points."""
    err = {}
    for n in physics.PARAMETER_NAMES:
        e = np.asarray(pred[n], np.float64) - np.asarray(truth[n], np.float64)
        err[n] = e / echo1 if n == "S0" else e
    err["OEF"] = oef_percent(pred["Y"]) - np.asarray(truth["OEF"], np.float64)
    return err


def rmse(e: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(e))))


def lesion_contrast(pred_oef: np.ndarray, true_oef: np.ndarray, lesion_labels: np.ndarray) -> list[dict]:
    """OEF of each lesion type vs its contralateral mirror: difference and contrast-to-noise.

    CNR = (mean lesion - mean contralateral) / sqrt((var lesion + var contralateral) / 2).
    """
    rows = []
    for lesion, mirror, name in ((1, 3, "misery_perfusion"), (2, 4, "infarct_core")):
        a, b = lesion_labels == lesion, lesion_labels == mirror
        if a.sum() < 2 or b.sum() < 2:
            continue
        row = {"lesion": name, "n_lesion": int(a.sum()), "n_contralateral": int(b.sum())}
        for key, oef in (("true", true_oef), ("pred", pred_oef)):
            diff = float(oef[a].mean() - oef[b].mean())
            noise = float(np.sqrt((oef[a].var() + oef[b].var()) / 2))
            row[f"{key}_contrast_pp"] = diff
            row[f"{key}_cnr"] = diff / noise if noise > 1e-9 else float("nan")  # a constant map has no CNR
        row["recovered"] = row["pred_contrast_pp"] / row["true_contrast_pp"] if row["true_contrast_pp"] else float("nan")
        rows.append(row)
    return rows


def _finite_mean(values) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def interval_metrics(pred: dict, truth_oef: np.ndarray, where: np.ndarray, lesion: np.ndarray) -> dict:
    """Coverage of the 90 % OEF interval (share of true values inside it) and its mean width (pp)."""
    if "OEF_p05" not in pred:
        return {}
    lo, hi = np.asarray(pred["OEF_p05"], np.float64), np.asarray(pred["OEF_p95"], np.float64)
    inside = (truth_oef >= lo) & (truth_oef <= hi)
    out = {"coverage_OEF": float(inside[where].mean()), "width_OEF": float((hi - lo)[where].mean())}
    if lesion.any():
        out["coverage_OEF_lesions"] = float(inside[lesion].mean())
    return out


def invented_lesions(pred_oef: np.ndarray, true_oef: np.ndarray, brain: np.ndarray, echo1: np.ndarray) -> dict:
    """Specificity on a whole brain (volumes, metric mask `brain`): the share of the brain in clusters of
    >= INVENTED_MIN_VOXELS voxels whose predicted OEF departs from the predicted brain median by more
    than INVENTED_THRESHOLD_PP while the truth does not depart from its median; overall and within the
    darkest fifth of the brain on echo 1 (where the SNR is lowest)."""
    from scipy import ndimage

    pred_off = np.abs(pred_oef - np.median(pred_oef[brain])) > INVENTED_THRESHOLD_PP
    true_off = np.abs(true_oef - np.median(true_oef[brain])) > INVENTED_THRESHOLD_PP
    candidate = pred_off & ~true_off & brain
    labels, n = ndimage.label(candidate, ndimage.generate_binary_structure(3, 3))
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    invented = np.isin(labels, np.flatnonzero(sizes >= INVENTED_MIN_VOXELS))
    dark = brain & (echo1 <= np.quantile(echo1[brain], LOW_SIGNAL_QUANTILE))
    return {"invented_fraction": float(invented[brain].mean()), "invented_clusters": int((sizes >= INVENTED_MIN_VOXELS).sum()),
            "invented_fraction_low_signal": float(invented[dark].mean())}


def target_voxels(patient: simulate.PatientData, max_voxels: int | None, seed: int, index: int):
    """(metric targets, lesion targets) as in-mask positions; the same for every method."""
    in_metric = patient.metric_mask[patient.mask]
    metric = np.flatnonzero(in_metric)
    if max_voxels is not None and max_voxels < len(metric):
        metric = np.sort(np.random.default_rng([seed, index]).choice(metric, max_voxels, replace=False))
    lesion = np.zeros(0, dtype=np.int64)
    if patient.lesion_map is not None:
        lesion = np.flatnonzero(in_metric & (patient.lesion_map[patient.mask] > 0))
    return metric, lesion


@dataclasses.dataclass
class Evaluation:
    """All numbers of one evaluation run."""

    dataset: str
    noise: dict  # SNR, QSM noise (ppb), voxel size
    methods: list[str]
    patients: list[str]
    per_patient: list[dict]  # method, patient, n_voxels, seconds, seconds_per_brain, rmse_*, bias_*
    lesions: list[dict]  # method, patient, lesion, ...
    max_voxels_per_patient: int | None

    def summary(self) -> list[dict]:
        """Average over patients per method (the paper's average row)."""
        rows = []
        prefixes = ("rmse_", "bias_", "seconds", "coverage_", "width_", "invented_")
        for m in self.methods:
            mine = [r for r in self.per_patient if r["method"] == m]
            row = {"method": m, "patients": len(mine)}
            keys = list(dict.fromkeys(k for r in mine for k in r if k.startswith(prefixes)))
            for key in keys:
                row[key] = float(np.mean([r[key] for r in mine if key in r]))
            rows.append(row)
        return rows

    def lesion_summary(self) -> list[dict]:
        """Per method and lesion kind, over all test patients: the share of the true contrast recovered
        (mean predicted / mean true lesion-vs-contralateral difference) and the mean CNR."""
        rows = []
        for m in self.methods:
            for kind in ("misery_perfusion", "infarct_core"):
                mine = [r for r in self.lesions if r["method"] == m and r["lesion"] == kind]
                if not mine:
                    continue
                true = float(np.mean([r["true_contrast_pp"] for r in mine]))
                pred = float(np.mean([r["pred_contrast_pp"] for r in mine]))
                rows.append({"method": m, "lesion": kind, "patients": len(mine), "true_contrast_pp": true,
                             "pred_contrast_pp": pred, "recovered": pred / true if true else float("nan"),
                             "true_cnr": float(np.mean([r["true_cnr"] for r in mine])),
                             "pred_cnr": _finite_mean([r["pred_cnr"] for r in mine])})
        return rows


def evaluate(dataset: str | Path, methods: list[str], context: MethodContext | None = None,
             patients: list[str] | None = None, max_voxels_per_patient: int | None = None, seed: int = 0,
             progress=None) -> Evaluation:
    dataset = Path(dataset)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError(f"Unknown method(s) {', '.join(unknown)}; available: {', '.join(METHODS)}.")
    if max_voxels_per_patient is not None and max_voxels_per_patient < 10:
        raise InputError("--max-voxels-per-patient must be at least 10.")
    context = context or MethodContext(dataset)
    folders = simulate.list_patients(dataset, None if patients else "test")
    if patients:
        by_name = {f.name: f for f in folders}
        missing = [p for p in patients if p not in by_name]
        if missing:
            raise InputError(f"{dataset} has no patient(s) {', '.join(missing)}.")
        folders = [by_name[p] for p in patients]
    if not folders:
        raise InputError(f"{dataset} holds no test patients; simulate the 17-patient set first.")
    predictors = {m: METHODS[m](context) for m in methods}
    desc = _description(dataset)
    per_patient, lesions = [], []
    for n, folder in enumerate(folders):
        patient = simulate.load_patient(folder)
        metric, lesion = target_voxels(patient, max_voxels_per_patient, seed, n)
        targets = np.union1d(metric, lesion)
        in_metric = np.isin(targets, metric)
        echo1 = patient.echoes[..., 0][patient.mask][targets].astype(np.float64)
        truth = {k: v[patient.mask][targets] for k, v in patient.truth.items()}
        lesion_labels = patient.lesion_map[patient.mask][targets]
        n_brain = int(patient.mask.sum())
        whole_brain = len(metric) == int(patient.metric_mask.sum())
        for m, predict in predictors.items():
            t0 = time.perf_counter()
            pred = predict(patient, targets)
            seconds = time.perf_counter() - t0
            err = errors_of(pred, truth, echo1)
            row = {"method": m, "patient": patient.pid, "n_voxels": int(in_metric.sum()),
                   "seconds": seconds,
                   "seconds_per_brain": seconds if getattr(predict, "whole_brain", False) else seconds * n_brain / len(targets)}
            row.update({f"rmse_{k}": rmse(err[k][in_metric]) for k in METRIC_NAMES})
            row.update({f"bias_{k}": float(err[k][in_metric].mean()) for k in METRIC_NAMES})
            row.update(interval_metrics(pred, np.asarray(truth["OEF"], np.float64), in_metric,
                                        np.isin(lesion_labels, LESION_CODES)))
            if whole_brain and not (lesion_labels > 0).any():
                volume = np.zeros(patient.mask.shape)
                volume[patient.mask] = np.nan
                volume.reshape(-1)[np.flatnonzero(patient.mask)[targets]] = oef_percent(pred["Y"])
                row.update(invented_lesions(volume, patient.truth["OEF"], patient.metric_mask, patient.echoes[..., 0]))
            per_patient.append(row)
            for les in lesion_contrast(oef_percent(pred["Y"]), truth["OEF"], lesion_labels):
                lesions.append({"method": m, "patient": patient.pid, **les})
        if progress:
            progress(n + 1, len(folders), patient.pid)
    noise = {"SNR": desc.get("SNR"), "QSMNoisePPB": desc.get("QSMNoisePPB"), "VoxelSizeMM": desc.get("VoxelSizeMM"),
             "Seed": desc.get("Seed"), "Noise": desc.get("Noise")}
    return Evaluation(str(dataset), noise, list(methods), [f.name for f in folders], per_patient, lesions,
                      max_voxels_per_patient)


def _description(dataset: Path) -> dict:
    try:
        return json.loads((dataset / "dataset_description.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# --- Reports ----------------------------------------------------------------------------------
def noise_label(ev: Evaluation) -> str:
    snr, q = ev.noise.get("SNR"), ev.noise.get("QSMNoisePPB")
    if snr is None:
        return "noise-free (SNR infinite, QSM noise 0 ppb)"
    return f"SNR {snr:g}, QSM noise {'?' if q is None else f'{q:g}'} ppb"


def _fmt(x: float) -> str:
    return f"{x:.4f}" if abs(x) < 100 else f"{x:.1f}"


def markdown(ev: Evaluation, title: str | None = None) -> str:
    vox = (f"a random subsample of at most {ev.max_voxels_per_patient} metric-mask voxels per patient "
           "(plus all lesion / contralateral voxels for the contrast table)"
           if ev.max_voxels_per_patient else "every metric-mask voxel")
    size = ev.noise.get("VoxelSizeMM")
    size = "?" if size is None else f"{size:g}"  # data sets made by other tools may not say
    lines = [f"## {title or 'Evaluation'}: {noise_label(ev)}", "",
             f"Data set `{ev.dataset}` ({noise_label(ev)}, {size} mm voxels, seed {ev.noise.get('Seed')}); "
             f"{len(ev.patients)} test patients ({', '.join(ev.patients)}); metrics inside the brain mask "
             f"without CSF, on {vox}. S0 error relative to the voxel's echo-1 magnitude; OEF in percentage "
             "points (pp). `tissue_mean` is the trivial predictor (each tissue's mean from the training "
             "patients' truth, given the true healthy-tissue labels; lesion voxels get the healthy-brain mean); "
             "`tissue_oracle` gets each patient's own true tissue means (a bar, not a method).", ""]
    summary = {r["method"]: r for r in ev.summary()}
    lines += ["### Table 3: mean OEF RMSE (pp), the 90 % interval, lesion contrast recovered", "",
              "| method | OEF RMSE (pp) | OEF bias (pp) | interval coverage | interval width (pp) "
              "| penumbra recovered | core recovered | s per brain |", "|---|---|---|---|---|---|---|---|"]
    recovered = {(r["method"], r["lesion"]): r for r in ev.lesion_summary()}

    def pct(x):
        return "–" if x is None or not np.isfinite(x) else f"{100 * x:.0f} %"

    for m in ev.methods:
        r = summary[m]
        pen, core = (recovered.get((m, k), {}).get("recovered") for k in ("misery_perfusion", "infarct_core"))
        cov, width = r.get("coverage_OEF"), r.get("width_OEF")
        lines.append(f"| {m} | {r['rmse_OEF']:.2f} | {r['bias_OEF']:+.2f} | {pct(cov)} | "
                     f"{'–' if width is None else f'{width:.1f}'} | {pct(pen)} | {pct(core)} | {r['seconds_per_brain']:.1f} |")
    if ev.lesion_summary():
        lines += ["", "### Lesion contrast (lesion - contralateral mirror, mean over patients)", "",
                  "| method | lesion | patients | true contrast (pp) | predicted contrast (pp) | recovered "
                  "| true CNR | predicted CNR |", "|---|---|---|---|---|---|---|---|"]
        for r in ev.lesion_summary():
            lines.append(f"| {r['method']} | {r['lesion']} | {r['patients']} | {r['true_contrast_pp']:+.1f} | "
                         f"{r['pred_contrast_pp']:+.1f} | {pct(r['recovered'])} | {r['true_cnr']:+.2f} | "
                         f"{r['pred_cnr']:+.2f} |")
    specific = [r for r in ev.per_patient if "invented_fraction" in r]
    if specific:
        lines += ["", f"### Specificity on lesion-free patients (invented lesions: clusters of >= "
                  f"{INVENTED_MIN_VOXELS} voxels off the brain median by > {INVENTED_THRESHOLD_PP:g} pp while "
                  "the truth is not)", "",
                  "| method | patient | invented share of the brain | clusters | share in the darkest fifth (low SNR) |",
                  "|---|---|---|---|---|"]
        for r in specific:
            lines.append(f"| {r['method']} | {r['patient']} | {100 * r['invented_fraction']:.2f} % | "
                         f"{r['invented_clusters']} | {100 * r['invented_fraction_low_signal']:.2f} % |")
    for m in ev.methods:
        lines += ["", f"### Table 2 ({m}): RMSE per test patient", "",
                  "| patient | voxels | S0 | R2 (Hz) | Y | v | chi_nb (ppm) | OEF (pp) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in [r for r in ev.per_patient if r["method"] == m]:
            lines.append(f"| {r['patient']} | {r['n_voxels']} | "
                         + " | ".join(_fmt(r[f'rmse_{k}']) for k in METRIC_NAMES) + " |")
        lines.append("| **average** | | " + " | ".join(f"**{_fmt(summary[m][f'rmse_{k}'])}**" for k in METRIC_NAMES) + " |")
    lines += ["", "### Bias (prediction - truth), mean over test patients", "",
              "| method | S0 | R2 (Hz) | Y | v | chi_nb (ppm) | OEF (pp) |", "|---|---|---|---|---|---|---|"]
    for m in ev.methods:
        lines.append(f"| {m} | " + " | ".join(f"{summary[m][f'bias_{k}']:+.4f}" for k in METRIC_NAMES) + " |")
    lines += ["", "### Lesion vs contralateral OEF (difference of means in pp; CNR = difference / pooled SD)", ""]
    if ev.lesions:
        lines += ["| method | patient | lesion | voxels (lesion / contra) | true contrast | predicted contrast "
                  "| true CNR | predicted CNR |", "|---|---|---|---|---|---|---|---|"]
        for r in ev.lesions:
            lines.append(f"| {r['method']} | {r['patient']} | {r['lesion']} | {r['n_lesion']} / {r['n_contralateral']} | "
                         f"{r['true_contrast_pp']:+.2f} | {r['pred_contrast_pp']:+.2f} | {r['true_cnr']:+.2f} | "
                         f"{r['pred_cnr']:+.2f} |")
    else:
        lines.append("No test patient has lesions.")
    return "\n".join(lines) + "\n"


def _csv_text(rows: list[dict]) -> str:
    if not rows:
        return ""
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def write_reports(ev: Evaluation, out: str | Path, title: str | None = None) -> list[Path]:
    """per_patient.csv, summary.csv, lesions.csv, report.md and evaluation.json into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    noise = {"snr": ev.noise.get("SNR"), "qsm_noise_ppb": ev.noise.get("QSMNoisePPB")}
    files = {
        "per_patient.csv": _csv_text([{**noise, **r} for r in ev.per_patient]),
        "summary.csv": _csv_text([{**noise, **r} for r in ev.summary()]),
        "lesions.csv": _csv_text([{**noise, **r} for r in ev.lesions]),
        "lesion_summary.csv": _csv_text([{**noise, **r} for r in ev.lesion_summary()]),
        "report.md": markdown(ev, title),
        "evaluation.json": json.dumps({**dataclasses.asdict(ev), "summary": ev.summary(),
                                       "lesion_summary": ev.lesion_summary()}, indent=1) + "\n",
    }
    written = []
    for name, text in files.items():
        if not text:
            continue
        tmp = out / (name + ".partial")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)
        written.append(out / name)
    return written


def record_in_card(ev: Evaluation, model_path: str | Path, method: str = "lstm") -> None:
    """Store the method's average test metrics in the model card (the checksum covers the .keras only)."""
    card_file = models.card_path_for(model_path)
    card = json.loads(card_file.read_text(encoding="utf-8"))
    r = {x["method"]: x for x in ev.summary()}[method]
    key = f"SNR {ev.noise.get('SNR'):g}" if ev.noise.get("SNR") is not None else "noise-free"
    card.setdefault("test_metrics", {})[key] = {
        "dataset": ev.dataset, "snr": ev.noise.get("SNR"), "qsm_noise_ppb": ev.noise.get("QSMNoisePPB"),
        "patients": ev.patients, "max_voxels_per_patient": ev.max_voxels_per_patient,
        **{f"rmse_{k}": round(r[f"rmse_{k}"], 5) for k in METRIC_NAMES},
        **{f"bias_{k}": round(r[f"bias_{k}"], 5) for k in METRIC_NAMES}}
    models.write_card(model_path, card)
