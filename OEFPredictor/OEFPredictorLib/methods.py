"""The OEF methods the product offers: one registry for the engine, the command line, evaluate and
the Slicer panel (name -> label, kind, bundled model).

- spatial: networks on whole volumes (spatial.py), with a 90 % OEF interval: the context model (a
  Gaussian pyramid of the inputs, then a per-voxel network) and the experimental 3D U-Net.
- voxelwise: Keras networks on voxel windows (the paper's LSTM, the DNN baseline).
- classical: the QQ fitting baselines (baselines.py), no trained model.
"""
from __future__ import annotations

import dataclasses

from .errors import InputError

KINDS = ("spatial", "voxelwise", "classical")


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    label: str  # as the panel shows it
    kind: str
    # bundled models in Resources/Models, in order of preference: the engine runs the first that reads the
    # data's echo protocol (predict.resolve_model)
    model_files: tuple[str, ...] = ()
    interval: bool = False  # gives OEF_p05 / OEF_p95 / OEF_width
    description: str = ""
    architecture: str | None = None  # of its model (the card's model.architecture; models.py)

    @property
    def uses_model(self) -> bool:
        return bool(self.model_files)

    @property
    def model_file(self) -> str | None:
        """The preferred bundled model (the one the panel describes)."""
        return self.model_files[0] if self.model_files else None


METHODS = {m.name: m for m in (
    Method("context", "Spatial context network", "spatial", ("oef_context.keras", "oef_context_short.keras"), True,
           "multi-scale context network on whole volumes (2 mm grid), trained on stroke-like virtual patients; "
           "90 % OEF interval; echo trains that cover 4.5-22 ms but not the paper's 4.5-39.5 ms (3 T-equivalent) "
           "run a network bound to 4.5-22 ms", "context"),
    Method("unet", "Spatial U-Net (experimental)", "spatial", ("oef_unet.keras",), True,
           "experimental 3D U-Net on whole volumes (2 mm grid); it does not learn lesions yet (README)", "unet"),
    Method("lstm", "LSTM (paper)", "voxelwise", ("oef_lstm.keras",), False,
           "the paper's LSTM on 5-voxel windows (Kim & Lee 2024)", "lstm"),
    Method("dnn", "DNN (voxelwise)", "voxelwise", ("oef_dnn.keras",), False, "voxelwise MLP baseline", "mlp"),
    Method("nlls", "QQ fit (voxelwise NLLS)", "classical", description="bounded least-squares fit of the QQ model"),
    Method("cat", "CAT (Cho 2020)", "classical", description="cluster analysis of time evolution"),
    Method("ccm", "CCM (Lee 2020)", "classical", description="closest-curve matching against a database"),
)}
# The default is the measured best for a radiologist: on the fresh-seed lesion-rich test set
# (README "Lesions", docs/evaluation/stroke2_snr100) the context network shows the lesions the paper's
# LSTM flattens, with a lower RMSE. A one-line change here moves every user.
DEFAULT_METHOD = "context"


def get(name: str | None) -> Method:
    """The method of this name (case-insensitive; None: the default); a clear error otherwise."""
    key = (name or DEFAULT_METHOD).lower()
    if key not in METHODS:
        raise InputError(f"Unknown method {name!r}; choose one of {', '.join(METHODS)}.")
    return METHODS[key]


def of_card(card: dict) -> Method:
    """The method a model file was trained for, from its card's architecture (the first cards, without
    one, are the paper's LSTM)."""
    architecture = card.get("model", {}).get("architecture") or "lstm"
    for method in METHODS.values():
        if method.architecture == architecture:
            return method
    raise InputError(f"The model card names an architecture ({architecture!r}) that no method runs; "
                     f"known: {', '.join(m.architecture for m in METHODS.values() if m.architecture)}.")


def help_text() -> str:
    return "; ".join(f"{m.name}: {m.description}" for m in METHODS.values())
