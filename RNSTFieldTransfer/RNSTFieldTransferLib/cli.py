"""The `rnst` command: transfer, demo, weights.

Errors the user can fix print as one line and exit with code 2; outputs are written atomically,
so a failed or cancelled run leaves nothing behind.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from .errors import RNSTCancelled, RNSTInputError


def _budgets(text):
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected whole numbers like 60,80,100")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: budgets must be at least 1")
    return values


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def _add_run_options(p):
    p.add_argument("--preset", choices=["fast", "paper"], default="fast",
                   help="fast: <=96 px slices, 2 iterations, 60/80/100 evaluations (CPU); "
                        "paper: native size, 20 iterations, 500/600/700 evaluations")
    p.add_argument("--iterations", type=int, help="override the preset's outer iterations")
    p.add_argument("--evaluations", type=_budgets, metavar="A,B,C",
                   help="override the preset's L-BFGS evaluation budgets of the 3 candidates")
    p.add_argument("--denoiser", choices=["nlm", "tv"], help="override the preset's denoiser")
    p.add_argument("--weights", help="local VGG16 weights (.npz, Keras notop .h5, or .onnx)")
    p.add_argument("--cache-dir", help="where extracted weights are kept "
                                       "(default $RNST_CACHE_DIR or ~/.cache/oefpredictor/rnst)")
    p.add_argument("--allow-download", action="store_true",
                   help="if no local weights, let Keras download the ImageNet VGG16 weights")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = OneLineErrorParser(
        prog="rnst", description="RNST: low-field MRI towards high-field quality by "
                                 "regularization by neural style transfer (Shen et al. 2025).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    sub.required = True

    t = sub.add_parser("transfer", help="RNST on a volume, slice by slice")
    t.add_argument("--content", required=True, help="low-field image (NIfTI, NRRD...)")
    t.add_argument("--style", required=True, help="high-field image of another scan (any size)")
    t.add_argument("--out", required=True, help="output image (content geometry)")
    t.add_argument("--reference", help="optional high-field image of the same scan, for PSNR/SSIM "
                                       "only (never used by the method)")
    t.add_argument("--plane", choices=["axial", "coronal", "sagittal"], default="axial")
    t.add_argument("--slices", help="A:B, slices A to B-1 along the plane (default: all)")
    _add_run_options(t)
    t.set_defaults(func=cmd_transfer)

    d = sub.add_parser("demo", help="simulated low-field MNI152 at three noise levels")
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--slices", type=int, default=1, help="axial slices per noise level")
    d.add_argument("--seed", type=int, default=0)
    _add_run_options(d)
    d.set_defaults(func=cmd_demo)

    w = sub.add_parser("weights", help="extract and verify the VGG16 weights; print their path")
    w.add_argument("--weights", help="local weights file to check instead")
    w.add_argument("--cache-dir")
    w.set_defaults(func=cmd_weights)
    return parser


def _progress_printer():
    state = {"last": -1.0}

    def progress(fraction, text):
        if fraction - state["last"] >= 0.05 or fraction >= 1.0:
            state["last"] = fraction
            sys.stderr.write(f"\r  {100 * fraction:5.1f} %  {text:<30}")
            if fraction >= 1.0:
                sys.stderr.write("\n")
            sys.stderr.flush()
    return progress


def _weights(args):
    from .weights import load_vgg16_conv_weights
    return load_vgg16_conv_weights(args.weights, args.cache_dir, args.allow_download)


def cmd_transfer(args) -> int:
    from .io import direction_matrix, read_volume, write_like
    from .rnst import get_preset
    from .volume import parse_slices, quality, slab, slicing_axis, transfer_volume

    # Every check before any computation, so a bad input costs nothing and writes nothing.
    c_img, content = read_volume(args.content, "content")
    s_img, style = read_volume(args.style, "style")
    reference = None
    if args.reference:
        _, reference = read_volume(args.reference, "reference")
        if reference.shape != content.shape:
            raise RNSTInputError(
                f"reference dimensions {reference.shape[::-1]} differ from the content's "
                f"{content.shape[::-1]}; PSNR/SSIM need the same grid")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise RNSTInputError(f"output folder does not exist: {out_dir}")
    # A 2D image is one slice (axis 0) whatever the plane.
    axis = 0 if c_img.GetDimension() == 2 else slicing_axis(args.plane, direction_matrix(c_img))
    style_axis = 0 if s_img.GetDimension() == 2 else slicing_axis(args.plane,
                                                                 direction_matrix(s_img))
    slices = parse_slices(args.slices, content.shape[axis])
    preset = get_preset(args.preset, outer_iterations=args.iterations, denoiser=args.denoiser,
                        budgets=args.evaluations)
    weights = _weights(args)

    print(f"RNST {preset.name}: {len(slices)} {args.plane} slice(s) "
          f"{slices.start}..{slices.stop - 1} of {args.content}, style {args.style}", flush=True)
    t0 = time.time()
    res = transfer_volume(content, style, preset=preset, axis=axis, slices=slices,
                          weights=weights, style_axis=style_axis, progress=_progress_printer())
    write_like(res.output, c_img, args.out)
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")
    if reference is not None:
        ref = slab(reference, axis, slices)
        p_in, s_in = quality(slab(content, axis, slices), ref)
        p_out, s_out = quality(slab(res.output, axis, slices), ref)
        print(f"PSNR input {p_in:.2f} dB -> output {p_out:.2f} dB ({p_out - p_in:+.2f})")
        print(f"SSIM input {s_in:.4f} -> output {s_out:.4f} ({s_out - s_in:+.4f})")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    from .rnst import get_preset
    preset = get_preset(args.preset, outer_iterations=args.iterations, denoiser=args.denoiser,
                        budgets=args.evaluations)
    run_demo(args.out, preset=preset, weights=_weights(args), n_slices=args.slices,
             seed=args.seed, progress=_progress_printer())
    return 0


def cmd_weights(args) -> int:
    from .weights import (CACHE_FILE_NAME, VGG16_CONV_SHA256, default_cache_dir,
                          load_vgg16_conv_weights, weights_digest)
    weights = load_vgg16_conv_weights(args.weights, args.cache_dir)
    digest = weights_digest(weights)
    where = args.weights or os.path.join(args.cache_dir or default_cache_dir(), CACHE_FILE_NAME)
    verdict = "matches" if digest == VGG16_CONV_SHA256 else "differs from"
    print(f"{where}\nSHA-256 {digest} ({verdict} the committed checksum)")
    return 0


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except RNSTInputError as exc:
        sys.stderr.write(f"rnst {args.command}: error: {exc}\n")
        return 2
    except (RNSTCancelled, KeyboardInterrupt):
        sys.stderr.write(f"\nrnst {args.command}: cancelled; no output was written.\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
