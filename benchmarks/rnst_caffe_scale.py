"""How much heavier the style term is with Keras' Caffe VGG16 than with torchvision's VGG16, for
the same images and the same 5000:1 weights -> benchmarks/results/rnst_caffe_scale.json.

factor = (style loss Caffe / style loss torch) / (content loss Caffe / content loss torch), on the
middle slice of the MNI and virtual-patient-1 slabs at 3 noise levels, for the NLM-denoised slice
and the high-field slice (12 values). nst.CAFFE_STYLE_RESCALE is their median, rounded.

    nice -n 5 .venv/bin/python benchmarks/rnst_caffe_scale.py --caffe-npz FILE.npz
"""
import argparse, json, sys
from pathlib import Path
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "RNSTFieldTransfer")); sys.path.insert(0, str(REPO / "OEFPredictor"))
import numpy as np
from RNSTFieldTransferLib import pairs, volume, rnst, nst
ap = argparse.ArgumentParser(); ap.add_argument('--caffe-npz', required=True)
w = dict(np.load(ap.parse_args().caffe_npz))
mt, bt = nst.build_model("vgg16")
mc = nst.build_vgg16_features(w, nst.VGG16_CAFFE)
rows=[]; out=[]
for src in ["patient1", "mni"]:
  for noise in (0.03, 0.06, 0.10):
    p = pairs.make_pair(src, noise, seed=0)
    c = volume.minmax(p.low).astype(np.float32); s = volume.minmax(p.style).astype(np.float32)
    i=1
    pt = nst.StyleTransfer(mt, c[i], s[i], bt); pc = nst.StyleTransfer(mc, c[i], s[i], nst.VGG16_CAFFE)
    nl = volume.minmax(rnst.denoise(c[i],'nlm')).astype(np.float32)
    for name, im in (("nlm", nl), ("ref", volume.minmax(p.reference[i]).astype(np.float32))):
        _, lst, lct = pt.loss_terms(im); _, lsc, lcc = pc.loss_terms(im)
        r = (lsc/lst)/(lcc/lct); rows.append(r); out.append({'pair': src, 'noise': noise, 'image': name, 'factor': r})
        print(src, noise, name, 'style ratio', lsc/lst, 'content ratio', lcc/lct, 'factor', r, flush=True)
print('median factor', np.median(rows), 'range', min(rows), max(rows))
(REPO / "benchmarks" / "results" / "rnst_caffe_scale.json").write_text(json.dumps(
    {"median": float(np.median(rows)), "min": float(min(rows)), "max": float(max(rows)),
     "values": out}, indent=1))
