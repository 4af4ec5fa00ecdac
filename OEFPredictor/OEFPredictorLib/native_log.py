"""Keeping native libraries' import-time log lines out of the user's output.

TensorFlow 2.21's C++ code logs a few lines at import through absl, before TF_CPP_MIN_LOG_LEVEL can apply
("oneDNN custom operations are on", on CPUs where oneDNN is on by default). The command line (cli) and the
worker processes of a cohort run (cohort.process_folder) import TensorFlow through
`import_without_native_stderr` unless the user asked for the libraries' logs (--verbose).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys


class _SilentFirstImport(importlib.abc.MetaPathFinder):
    """A finder that wraps the first import of one module so that its execution writes nothing to fd 2."""

    def __init__(self, module_name: str):
        self.module_name = module_name

    def find_spec(self, name, path=None, target=None):
        if name != self.module_name:
            return None
        sys.meta_path.remove(self)  # once; the real finders find the module
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            sys.stderr.flush()
            saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 2)
            os.close(null)
            try:
                run(module)
            finally:
                os.dup2(saved, 2)
                os.close(saved)

        spec.loader.exec_module = exec_module
        return spec


def import_without_native_stderr(module_name: str) -> None:
    """The first import of `module_name`, whenever it comes, runs with file descriptor 2 pointed at /dev/null
    (see the module docstring). Python errors still surface: they are raised, not written, during the import."""
    waiting = any(isinstance(f, _SilentFirstImport) and f.module_name == module_name for f in sys.meta_path)
    if module_name not in sys.modules and not waiting:
        sys.meta_path.insert(0, _SilentFirstImport(module_name))


def quiet_requested() -> bool:
    """Whether this process was asked to keep TensorFlow's log lines out (TF_CPP_MIN_LOG_LEVEL 2 or 3: what the
    command line sets without --verbose, and what a cohort's workers inherit)."""
    return os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") in ("2", "3")
