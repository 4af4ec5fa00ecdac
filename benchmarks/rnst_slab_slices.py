"""The virtual-patient-2 slab at noise 0.06 (the benchmark's "all 3" case), slice by slice:
BM3D, nlm-2.5d and RNST `fast`, each slice scored on its own (volume.quality) and the stack as a
whole -> benchmarks/results/rnst_slab_slices.json. The stack scores min-max scale the whole
stack, so one bright slice changes all of them; this shows which slices win and lose.

    OMP_NUM_THREADS=1 TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 \\
        nice -n 10 .venv/bin/python benchmarks/rnst_slab_slices.py
"""
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "OEFPredictor"))
sys.path.insert(0, str(REPO / "RNSTFieldTransfer"))
from RNSTFieldTransferLib import nst, pairs, rnst, volume  # noqa: E402


def main():
    pair = pairs.make_pair("patient2", 0.06, seed=0)
    low01 = volume.minmax(pair.low)
    n = len(low01)
    outs = {"nlm-2.5d": np.stack([rnst.denoise(low01[s], "nlm-2.5d",
                                               [low01[t] for t in (s - 1, s + 1) if 0 <= t < n])
                                  for s in range(n)])}
    if rnst.bm3d_available():
        outs["bm3d"] = np.stack([rnst.denoise(low01[s], "bm3d") for s in range(n)])
    model, backbone = nst.build_model("vgg16")
    outs["rnst_fast"] = volume.transfer_volume(pair.low, pair.style, preset=rnst.get_preset("fast"),
                                               axis=0, model=model, backbone=backbone).output
    result = {}
    for key, out in outs.items():
        result[key] = {"stack": volume.quality(out, pair.reference)._asdict(),
                       "slices": [volume.quality(out[s], pair.reference[s])._asdict()
                                  for s in range(n)]}
        print(key, json.dumps(result[key]), flush=True)
    path = REPO / "benchmarks" / "results" / "rnst_slab_slices.json"
    path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
