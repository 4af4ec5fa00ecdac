"""OEFPredictorSlicer.environment: installed versions against a requirements file, and the install
path through Slicer's own helper. slicer.packaging exists only in Slicer >= 5.12, so it is stood in
for by a namespace that records the calls (load_requirements parses as Slicer's does, with the
packaging library); the versions checked are those of this Python's real installed packages."""
from __future__ import annotations

import importlib.metadata
import types

import pytest

slicer = pytest.importorskip("slicer")

from OEFPredictorSlicer import environment  # noqa: E402


def _requirements(tmp_path, text):
    path = tmp_path / "requirements.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_installed_versions_are_checked(tmp_path):
    numpy_version = importlib.metadata.version("numpy")
    path = _requirements(tmp_path, f"# comment\nnumpy=={numpy_version}  # pinned\nnumpy<1.0\n"
                                   "surely-not-installed-pkg==1.0\n")
    unmet = environment.unmetRequirements(environment.loadRequirements(path))
    assert len(unmet) == 2
    assert f"numpy {numpy_version} is installed, <1.0 is needed" in unmet[0]
    assert "surely-not-installed-pkg is not installed (needs ==1.0)" in unmet[1]


def test_tensorflow_cpu_meets_a_tensorflow_requirement(tmp_path):
    try:
        version = importlib.metadata.version("tensorflow-cpu")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("tensorflow-cpu is not installed here")
    assert environment.unmetRequirements(environment.loadRequirements(_requirements(tmp_path, f"tensorflow=={version}\n"))) == []
    assert environment.unmetRequirements(environment.loadRequirements(_requirements(tmp_path, "tensorflow==0.1\n")))


def test_install_goes_through_pip_ensure_with_load_requirements(tmp_path, monkeypatch):
    from packaging.requirements import Requirement

    calls = []
    loaded = []

    def load_requirements(path):
        lines = [line.split("#")[0].strip() for line in open(path, encoding="utf-8")]
        loaded.append([Requirement(line) for line in lines if line])
        return loaded[-1]

    fake = types.SimpleNamespace(load_requirements=load_requirements,
                                 pip_ensure=lambda reqs, requester=None: calls.append((reqs, requester)))
    monkeypatch.setattr(slicer, "packaging", fake, raising=False)
    path = _requirements(tmp_path, "surely-not-installed-pkg==1.0\n")
    still = environment.ensureRequirements(path, requester="OEFPredictor")
    assert calls == [(loaded[0], "OEFPredictor")]  # Slicer's parser's objects, handed on as they are
    assert still == ["surely-not-installed-pkg is not installed (needs ==1.0)"]  # checked again after

    calls.clear()
    numpy_version = importlib.metadata.version("numpy")
    assert environment.ensureRequirements(_requirements(tmp_path, f"numpy=={numpy_version}\n"), "x") == []
    assert calls == []  # nothing to install: no prompt at all


def test_the_shipped_requirement_files_parse():
    from OEFPredictorLib import resources

    for path in (resources.resource_path("requirements.txt"),
                 resources.resource_path("..", "RNSTFieldTransfer", "Resources", "RNSTFieldTransfer-requirements.txt")):
        names = [r.name for r in environment.loadRequirements(path)]
        assert "tensorflow" in names and "keras" in names


def test_the_model_summary_names_a_protocol_free_models_range(tmp_path):
    import json

    from OEFPredictorLib import decay
    from OEFPredictorSlicer import environment

    (tmp_path / "m.json").write_text(json.dumps({"supported_protocols": decay.SUPPORTED.to_dict(),
                                                 "protocol": {"echo_times_ms": [4.5, 9.5], "field_strength_T": 3.0}}))
    summary = environment.modelSummary(str(tmp_path / "m.keras"))
    assert "5-16 echoes" in summary and "1.5-7 T" in summary and "9.5" not in summary


def test_the_model_summary_names_the_span_a_resampling_model_needs():
    from OEFPredictorLib import resources
    from OEFPredictorSlicer import environment

    summary = environment.modelSummary(str(resources.bundled_model_path("context")))
    assert "5-16 echoes starting by TE 8.5 ms and reaching 39 ms, at most 9 ms apart at 3 T" in summary
    assert "1.5-7 T" in summary
    both = environment.modelsSummary(resources.bundled_model_paths("context"))  # the panel's line
    assert both.startswith(summary)
    assert "; else oef_context_short.keras: 5-16 echoes starting by TE 8.5 ms and reaching 18 ms" in both
