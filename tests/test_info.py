"""``python -m canet.info``: what it reports about triton, the extension and the backends."""

from __future__ import annotations

import importlib.metadata

import pytest

from canet import backends, info


def test_triton_installed_under_another_distribution_name_is_reported(monkeypatch):
    # pytorch-triton nightlies and source builds have no "triton" distribution metadata; the
    # backend accepts them (it reads triton.__version__), so info must not say "not installed".
    triton = pytest.importorskip("triton")
    real = importlib.metadata.version

    def without_triton(name):
        if name == "triton":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", without_triton)
    monkeypatch.setattr(triton, "__version__", "3.6.0+git0123abc")
    assert info.collect()["triton"] == "3.6.0+git0123abc"


def test_every_backend_is_listed_on_cpu_with_the_reason_when_unavailable():
    facts = info.collect()
    for name, why in backends.availability("cpu").items():
        assert facts[f"backend {name} on cpu"] == ("available" if why is None else f"no: {why}")
    assert facts["backend torch on cpu"] == "available"
    assert "CUDA tensors only" in facts["backend triton on cpu"]


def test_main_prints_the_backends(capsys):
    assert info.main([]) == 0
    out = capsys.readouterr().out
    assert "backend torch on cpu" in out and "backend triton on cpu" in out
