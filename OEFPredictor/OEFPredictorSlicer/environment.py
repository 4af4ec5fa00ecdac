"""The Python environment: the packages a module needs (installed versions, installs through
Slicer's own helper), and what the backend and a model card say. No dialogs here except the
confirmation of the old-Slicer fallback install; the panels call ensureRequirements.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
from pathlib import Path

import slicer

from .compat import _

# Other distributions that provide the same import package (a requirement on "tensorflow" is met by
# an installed tensorflow-cpu of a matching version; pip would otherwise install a second copy).
SAME_PACKAGE = {"tensorflow": ("tensorflow-cpu", "tensorflow-macos", "tensorflow-intel")}


def loadRequirements(path):
    """The requirements of a requirements.txt as packaging Requirement objects (Slicer's own
    parser on Slicer >= 5.12)."""
    packaging = getattr(slicer, "packaging", None)
    if packaging is not None and hasattr(packaging, "load_requirements"):
        return list(packaging.load_requirements(str(path)))
    from packaging.requirements import Requirement

    lines = (line.split("#", 1)[0].strip() for line in Path(path).read_text(encoding="utf-8").splitlines())
    return [Requirement(line) for line in lines if line and not line.startswith("-")]


def installedVersion(name):
    """The installed version of a distribution (or of one providing the same package), else None."""
    for candidate in (name, *SAME_PACKAGE.get(name.lower(), ())):
        try:
            return importlib.metadata.version(candidate)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def unmetRequirements(requirements):
    """One line per requirement that the installed versions do not meet (empty: all met)."""
    unmet = []
    for requirement in requirements:
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        version = installedVersion(requirement.name)
        wanted = str(requirement.specifier) or _("any version")
        if version is None:
            unmet.append(_("{name} is not installed (needs {wanted})").format(name=requirement.name, wanted=wanted))
        elif requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
            unmet.append(_("{name} {version} is installed, {wanted} is needed").format(
                name=requirement.name, version=version, wanted=wanted))
    return unmet


def ensureRequirements(requirementsPath, requester):
    """Install what requirementsPath asks for and is not met; returns what is still unmet.

    Slicer >= 5.12: slicer.packaging.pip_ensure (it asks the user, shows progress and offers the
    restart). Older Slicer: slicer.util.pip_install after a confirmation. Main thread only."""
    requirements = loadRequirements(requirementsPath)
    if not unmetRequirements(requirements):
        return []
    packaging = getattr(slicer, "packaging", None)
    if packaging is not None and hasattr(packaging, "pip_ensure"):
        packaging.pip_ensure(requirements, requester=requester)
    else:
        missing = unmetRequirements(requirements)
        if not slicer.util.confirmOkCancelDisplay(
                _("{who} needs these Python packages:\n{missing}\n\nInstall them now? Offline: install the "
                  "wheels listed in {path} from a local folder.").format(
                    who=requester, missing="\n".join(missing), path=requirementsPath)):
            return missing
        with slicer.util.WaitCursor():
            slicer.util.pip_install(f"-r {requirementsPath}")
    importlib.invalidate_caches()
    still = unmetRequirements(requirements)
    if still:
        logging.warning("%s: still unmet after installing: %s", requester, "; ".join(still))
    return still


def modelsSummary(modelPaths, needsModel=True):
    """modelSummary of each model a run may use (the bundled ones in order of preference), joined."""
    return _("; else ").join(modelSummary(str(p), needsModel) for p in modelPaths) if modelPaths else \
        modelSummary(None, needsModel)


def modelSummary(modelPath, needsModel=True):
    """One line about a model file (from its .json card), without loading Keras."""
    if not needsModel:
        return _("Voxelwise QQ fit: no network model needed (slower).")
    if not modelPath:
        return _("Choose a .keras model file; its .json card must be beside it.")
    try:
        card = json.loads(Path(modelPath).with_suffix(".json").read_text(encoding="utf-8"))
        supported = card.get("supported_protocols")
        if supported and supported.get("spans_ms"):  # a model that resamples other echo trains to its own
            from OEFPredictorLib import decay  # the card read as the engine reads it (no Keras)

            reads = decay.ProtocolRange.from_dict(supported)
            start_by, reaching = reads.reach_ms()
            return _("{name}: {n0}-{n1} echoes starting by TE {a:g} ms and reaching {b:g} ms{apart} at 3 T (x 3/B0 "
                     "elsewhere), {t0:g}-{t1:g} T").format(
                name=Path(modelPath).name, n0=reads.echoes[0], n1=reads.echoes[1], a=start_by, b=reaching,
                apart=_(", at most {g:g} ms apart").format(g=reads.max_gap_ms) if reads.max_gap_ms else "",
                t0=reads.field_strength_T[0], t1=reads.field_strength_T[1])
        if supported:  # a protocol-free model
            return _("{name}: {n0}-{n1} echoes, last echo {a:g}-{b:g} ms, {t0:g}-{t1:g} T").format(
                name=Path(modelPath).name, n0=supported["echoes"][0], n1=supported["echoes"][1],
                a=supported["last_echo_ms"][0], b=supported["last_echo_ms"][1], t0=supported["field_strength_T"][0],
                t1=supported["field_strength_T"][1])
        tes = card["protocol"]["echo_times_ms"]
        return _("{name}: {n} echoes, TE {a:g}-{b:g} ms, {t:g} T").format(
            name=Path(modelPath).name, n=len(tes), a=tes[0], b=tes[-1], t=card["protocol"]["field_strength_T"])
    except FileNotFoundError:
        return _("The model or its .json card is not there; choose a model file.")
    except Exception as exc:
        return _("Cannot read the model card: {e}").format(e=exc)


def backendSummary(unmet, detect=False):
    """What the backend sees; unmet: unmetRequirements of the module. detect=True imports
    TensorFlow (a few seconds) to list the devices."""
    if unmet:
        return _("Not installed yet ({what}): installed on the first Apply (about 600 MB).").format(
            what="; ".join(unmet))
    if not detect:
        return _("TensorFlow is installed. Press Detect to list the devices it sees.")
    try:
        import keras
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        names = ", ".join(g.name.split(":", 1)[-1] for g in gpus) if gpus else _("none")
        return _("Keras {k} on TensorFlow {t}: CPU; GPUs: {g}.").format(k=keras.__version__, t=tf.__version__, g=names)
    except Exception as exc:
        return _("TensorFlow does not load: {e}").format(e=str(exc).splitlines()[0][:200])
