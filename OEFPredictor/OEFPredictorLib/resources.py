"""Where the shipped resources (bundled models, UI, icons) are, in every layout.

- source tree:   <repo>/OEFPredictor/OEFPredictorLib  ->  <repo>/Resources
- Slicer build:  <modules>/OEFPredictorLib            ->  <modules>/Resources
- anywhere else: the folder named by the OEFPREDICTOR_RESOURCES environment variable.
"""
from __future__ import annotations

import os
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def resource_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("OEFPREDICTOR_RESOURCES"):
        dirs.append(Path(os.environ["OEFPREDICTOR_RESOURCES"]))
    dirs += [_HERE.parent / "Resources", _HERE.parent.parent / "Resources"]
    return [d for d in dirs if d.is_dir()]


def resource_path(*parts: str) -> Path:
    """The first existing resource with this relative path; FileNotFoundError names where it looked."""
    for d in resource_dirs():
        candidate = d.joinpath(*parts)
        if candidate.exists():
            return candidate
    looked = ", ".join(str(d) for d in resource_dirs()) or "(no Resources folder found)"
    raise FileNotFoundError(f"Resource {'/'.join(parts)} not found; looked in {looked}. "
                            "Set OEFPREDICTOR_RESOURCES to the extension's Resources folder.")


def bundled_model_path(method: str | None = None) -> Path:
    """The preferred bundled model of a method of the registry (None: the default method, methods.DEFAULT_METHOD)."""
    return bundled_model_paths(method)[0]


def bundled_model_paths(method: str | None = None) -> list[Path]:
    """All bundled models of a method, in order of preference (predict.resolve_model runs the first that
    reads the data's protocol)."""
    from . import methods

    spec = methods.get(method)
    if not spec.uses_model:
        raise FileNotFoundError(f"Method '{spec.name}' has no bundled model (it uses none).")
    return [resource_path("Models", name) for name in spec.model_files]
