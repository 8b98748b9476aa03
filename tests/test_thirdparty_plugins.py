"""The third-party path: a plugin with its own entry point, outside the core, is found,
driven by the engine and judged by the kit, which catches a wrong plugin."""

from __future__ import annotations

import os
import sys

import pytest

from ubp_core.conformance import corpus
from ubp_core.conformance.kit import run_cases
from ubp_core.plugins import PluginSet

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def thirdparty(tmp_path_factory):
    """A dist-info declaring an entry point in the ``ubp`` group, put on sys.path."""
    root = tmp_path_factory.mktemp("site")
    info = root / "ubp_toy_plugins-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ubp-toy-plugins\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[ubp]\ntoys = ubp_toy_plugins\n")
    sys.path[:0] = [str(root), os.path.join(HERE, "thirdparty")]
    try:
        yield PluginSet()
    finally:
        sys.path.remove(str(root))
        sys.path.remove(os.path.join(HERE, "thirdparty"))


def test_entry_point_plugin_is_found(thirdparty):
    names = {a.name for a in thirdparty.archs}
    assert {"x86_64", "x86_64-stepper", "x86_64-broken"} <= names


def test_thirdparty_plugin_runs_on_the_engine_and_passes(thirdparty):
    arch = thirdparty.arch("x86_64-stepper")
    cases = corpus.plugin_cases(arch)
    report = run_cases(arch, cases, cpus=["native", "unicorn"], plugins=thirdparty).as_dict()
    assert report["failed"] == 0, report["failures"]
    assert report["by_strategy"]["ssol"]["cases"] > 100
    assert report["by_strategy"]["emulate"]["cases"] == 0


def test_kit_catches_a_forgotten_call_fixup(thirdparty):
    arch = thirdparty.arch("x86_64-broken")
    report = run_cases(arch, corpus.plugin_cases(arch), cpus=["native", "unicorn"],
                       plugins=thirdparty).as_dict()
    assert report["failed"] > 0
    failed_texts = {f["text"].split()[0] for f in report["failures"]}
    assert failed_texts == {"call"}, report["failures"]
    assert all("ssol" in f["detail"] for f in report["failures"])
