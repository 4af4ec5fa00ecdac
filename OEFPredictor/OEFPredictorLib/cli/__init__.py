"""The `oefpredictor` command: simulate, train, evaluate, predict, stats, demo...

Each subcommand lives in its own module of this package with `register(subparsers)`; the module
list below is the only place that names them. Errors the user can fix (InputError) print as one
line and exit with code 2; nothing partial is left behind (the commands write atomically).
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

from ..errors import CancelledError, InputError
from ..native_log import import_without_native_stderr

# Subcommand modules, in the order `--help` lists them.
COMMAND_MODULES = ["simulate", "montage", "train", "evaluate", "predict", "batch", "stats", "demo"]


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (what is wrong and where to look) and exit 2."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = OneLineErrorParser(
        prog="oefpredictor",
        description="Oxygen extraction fraction (OEF) maps from mGRE magnitude + QSM with the QQ model: "
                    "the spatial context network (the default method), the paper's LSTM, or another method "
                    "(oefpredictor predict --help).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--verbose", action="store_true", dest="verbose_all",
                        help="also show the log lines of TensorFlow, absl and the other libraries")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f".{name}", __name__).register(sub)
    for command in sub.choices.values():
        command.add_argument("--verbose", action="store_true",
                             help="also show the log lines of TensorFlow, absl and the other libraries "
                                  "(hidden by default)")
    return parser


def help_literal(text: str) -> str:
    """Text for an argparse help string: argparse formats help with %, so a literal % (as in
    "90 %") must be doubled, or `--help` crashes."""
    return text.replace("%", "%%")


def quiet_libraries(verbose: bool) -> None:
    """Keep the libraries' log lines (TensorFlow's C++ log: cpu_feature_guard, oneDNN, CUDA
    plugins; absl; the tensorflow/keras Python loggers and warnings) out of the output unless
    --verbose. TF_CPP_MIN_LOG_LEVEL must be set before TensorFlow is imported, so it is set here,
    before any command runs; the local Dask workers of `batch` inherit it."""
    import logging
    import warnings

    if verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"  # 3: not even E-level lines (e.g. "Unable to register cuDNN")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    import_without_native_stderr("tensorflow")
    for name in ("tensorflow", "absl", "keras", "jax", "h5py"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for module in ("tensorflow", "keras", "absl", "jax"):
        warnings.filterwarnings("ignore", module=module + r"(\.|$)")


class Terminated(BaseException):
    """SIGTERM (e.g. `kill`, a job scheduler's time limit), raised in the main thread so that the
    output folders being built are removed on the way out, as on Ctrl-C."""


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.verbose = args.verbose or args.verbose_all  # before or after the command's name
    quiet_libraries(args.verbose)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        sys.stderr.write(f"oefpredictor {args.command}: error: {exc}\n")
        return 2
    except CancelledError as exc:
        sys.stderr.write(f"oefpredictor {args.command}: cancelled: {exc}\n")
        return 130
    except KeyboardInterrupt:
        sys.stderr.write(f"oefpredictor {args.command}: interrupted; no partial output was kept.\n")
        return 130
    except Terminated:
        sys.stderr.write(f"oefpredictor {args.command}: terminated; no partial output was kept.\n")
        return 128 + signal.SIGTERM
    except OSError as exc:  # a write that failed outside an output folder (e.g. stats --out on a full disk)
        from ..io import WRITE_ERRNOS, write_error

        if exc.errno not in WRITE_ERRNOS:
            raise
        sys.stderr.write(f"oefpredictor {args.command}: error: {write_error(exc, exc.filename or 'the output')}\n")
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def parse_echo_times_ms(text: str, field_strength: float = 3.0):
    """--te '4.5,9.5,...' (milliseconds) -> Protocol, with errors that say what to fix."""
    from ..physics import Protocol
    from ..physics import parse_echo_times_ms as parse

    try:
        return Protocol.from_milliseconds(parse(text), field_strength)
    except ValueError as exc:
        raise InputError(f"--te: {exc}") from None


def progress_bar(total: int, description: str, unit: str = "it"):
    """A tqdm bar on stderr (quiet when stderr is not a terminal and CI is set)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit=unit, file=sys.stderr, dynamic_ncols=True,
                disable=None if os.environ.get("CI") else False)


if __name__ == "__main__":
    sys.exit(main())
