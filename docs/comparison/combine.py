"""Combine the per-SNR evaluation reports into docs/comparison/comparison.{md,csv}.

Inputs: docs/comparison/snr{50,100,200}/{summary,lesions}.csv written by
`oefpredictor evaluate ... --out docs/comparison/snrXX`, and benchmarks/results/methods.json for the
time per 1 mm brain. Run from the repository root: .venv/bin/python docs/comparison/combine.py
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SNRS = (50, 100, 200)
PARAMS = ("S0", "R2", "Y", "v", "chi_nb", "OEF")
UNITS = {"S0": "", "R2": " (Hz)", "Y": "", "v": "", "chi_nb": " (ppm)", "OEF": " (pp)"}


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def main() -> int:
    summary = {snr: {r["method"]: r for r in _read(HERE / f"snr{snr}" / "summary.csv")} for snr in SNRS}
    lesions = {snr: _read(HERE / f"snr{snr}" / "lesions.csv") for snr in SNRS}
    snrs = [s for s in SNRS if summary[s]]
    methods = list(dict.fromkeys(m for s in snrs for m in summary[s]))
    bench = {}
    bench_file = REPO / "benchmarks" / "results" / "methods.json"
    if bench_file.exists():
        bench = json.loads(bench_file.read_text(encoding="utf-8")).get("methods", {})

    rows = []
    for s in snrs:
        for m in methods:
            if m in summary[s]:
                rows.append({"snr": s, **{k: v for k, v in summary[s][m].items() if k not in ("snr",)}})
    with (HERE / "comparison.csv").open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)

    def val(s, m, key, fmt="{:.2f}"):
        r = summary[s].get(m)
        return fmt.format(float(r[key])) if r and r.get(key) not in (None, "") else "-"

    lines = ["# OEF methods compared on the 11 simulated test patients", "",
             "Regenerate: see docs/comparison/README.md. QSM noise 2 ppb throughout; 2 mm virtual patients.", "",
             "## Mean OEF RMSE (pp) over the 11 test patients (the paper's Table 3, extended)", "",
             "| method | " + " | ".join(f"SNR {s}" for s in snrs) + " | OEF bias at SNR 100 (pp) | min per 1 mm brain (wall / CPU) |",
             "|---|" + "---|" * (len(snrs) + 2)]
    for m in methods:
        b = bench.get(m, {})
        t = (f"{b['minutes_per_1mm_brain']:.1f} / {b['cpu_minutes_per_1mm_brain']:.1f}"
             if "minutes_per_1mm_brain" in b else "-")
        lines.append(f"| {m} | " + " | ".join(val(s, m, "rmse_OEF") for s in snrs)
                     + f" | {val(100, m, 'bias_OEF', '{:+.2f}') if 100 in snrs else '-'} | {t} |")
    for s in snrs:
        lines += ["", f"## RMSE per parameter, mean over the test patients, SNR {s}", "",
                  "| method | " + " | ".join(p + UNITS[p] for p in PARAMS) + " |", "|---|" + "---|" * len(PARAMS)]
        for m in methods:
            fmt = {"S0": "{:.4f}", "R2": "{:.2f}", "Y": "{:.4f}", "v": "{:.4f}", "chi_nb": "{:.4f}", "OEF": "{:.2f}"}
            lines.append(f"| {m} | " + " | ".join(val(s, m, f"rmse_{p}", fmt[p]) for p in PARAMS) + " |")
    lines += ["", "## Lesion vs contralateral OEF contrast-to-noise, mean over lesions of the test patients", "",
              "| method | " + " | ".join(f"SNR {s} misery / infarct" for s in snrs) + " |", "|---|" + "---|" * len(snrs)]
    for m in ["truth"] + methods:
        cells = []
        for s in snrs:
            parts = []
            for lesion in ("misery_perfusion", "infarct_core"):
                key = "true_cnr" if m == "truth" else "pred_cnr"
                src = [r for r in lesions[s] if r["lesion"] == lesion and (m == "truth" or r["method"] == m)]
                if m == "truth":  # one row per method per lesion; the truth repeats, take each lesion once
                    src = list({(r["patient"]): r for r in src}.values())
                vals = [float(r[key]) for r in src if r[key] not in ("", "nan")]
                parts.append(f"{sum(vals) / len(vals):+.2f}" if vals else "-")
            cells.append(" / ".join(parts))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    (HERE / "comparison.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print((HERE / "comparison.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
