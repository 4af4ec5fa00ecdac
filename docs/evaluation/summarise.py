"""Combine the per-SNR evaluation reports into docs/evaluation/summary.md and summary.csv.

    .venv/bin/python docs/evaluation/summarise.py docs/evaluation/snr50 docs/evaluation/snr100 docs/evaluation/snr200
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
METRICS = ("S0", "R2", "Y", "v", "chi_nb", "OEF")


def main(dirs: list[str]) -> int:
    rows = []
    for d in dirs:
        ev = json.loads((Path(d) / "evaluation.json").read_text(encoding="utf-8"))
        for s in ev["summary"]:
            rows.append({"snr": ev["noise"]["SNR"], "qsm_noise_ppb": ev["noise"]["QSMNoisePPB"],
                         "voxels_per_patient": ev["max_voxels_per_patient"] or "all", **s})
    with open(HERE / "summary.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    lines = ["# Evaluation summary: average over the 11 test patients", "",
             "RMSE (average of per-patient RMSEs, the paper's average row) inside the brain without CSF. "
             "S0 relative to echo 1; R2 in Hz; chi_nb in ppm; OEF in percentage points. QSM noise 2 ppb "
             "throughout. Per-patient tables, bias and lesion contrast: `snr*/report.md`.", "",
             "| SNR | QSM noise (ppb) | method | S0 | R2 | Y | v | chi_nb | OEF RMSE (pp) | OEF bias (pp) | s per brain |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['snr']:g} | {r['qsm_noise_ppb']:g} | {r['method']} | "
                     + " | ".join(f"{r[f'rmse_{k}']:.4f}" for k in METRICS[:-1])
                     + f" | **{r['rmse_OEF']:.2f}** | {r['bias_OEF']:+.2f} | {r['seconds_per_brain']:.1f} |")
    (HERE / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
