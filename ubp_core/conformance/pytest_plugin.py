"""pytest plugin of the conformance kit (registered through the ``pytest11`` entry point).

A plugin author runs the whole kit against any installed arch plugin with::

    pytest --pyargs ubp_core.conformance.suite --ubp-arch ARCH [--ubp-corpus ELF]...

and can use the fixtures below in tests of their own:

- ``ubp_plugins``: the installed plugin set;
- ``ubp_arch``: the ArchOps named by ``--ubp-arch`` (parametrized over each one);
- ``ubp_case``: parametrized over every case of the chosen corpora (a ``(arch name, Case)``);
- ``ubp_case_runner``: a function running one case on the best reference CPU.
"""

from __future__ import annotations

import pytest

from ..plugins import PluginSet, default_plugins
from . import corpus
from .kit import CaseRunner, select_cpus
from .runner import Case, CaseResult


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("ubp", "UBP conformance kit")
    g.addoption("--ubp-arch", action="append", default=[], metavar="ARCH",
                help="architecture plugin to check (repeatable)")
    g.addoption("--ubp-corpus", action="append", default=[], metavar="ELF",
                help="harvest instructions from this ELF file (repeatable)")
    g.addoption("--ubp-sample", type=int, default=500, metavar="N",
                help="instructions sampled per corpus file (default 500)")
    g.addoption("--ubp-random", type=int, default=200, metavar="N",
                help="random valid encodings per arch (default 200)")
    g.addoption("--ubp-cpu", action="append", default=[], metavar="NAME",
                help="only these reference CPUs")
    g.addoption("--ubp-seed", type=int, default=0)


def _archs(config: pytest.Config) -> list[str]:
    return list(config.getoption("ubp_arch") or [])


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    config = metafunc.config
    names = _archs(config)
    if "ubp_arch" in metafunc.fixturenames:
        metafunc.parametrize("ubp_arch", names, indirect=True, ids=names)
    if "ubp_case" in metafunc.fixturenames:
        plugins = default_plugins()
        params, ids = [], []
        for name in names:
            arch = plugins.arch(name)
            cases = corpus.plugin_cases(arch)
            for path in config.getoption("ubp_corpus"):
                got, _ = corpus.elf_cases(arch, path, config.getoption("ubp_sample"),
                                          config.getoption("ubp_seed"))
                cases += got
            cases += corpus.random_cases(arch, config.getoption("ubp_random"),
                                         config.getoption("ubp_seed"))
            for c in cases:
                params.append((name, c))
                ids.append(f"{name}-{c.source.split(':')[0]}-{c.address:#x}-{c.raw.hex()}")
        metafunc.parametrize("ubp_case", params, ids=ids)


@pytest.fixture(scope="session")
def ubp_plugins() -> PluginSet:
    return default_plugins()


@pytest.fixture
def ubp_arch(request: pytest.FixtureRequest, ubp_plugins: PluginSet):
    return ubp_plugins.arch(request.param)


@pytest.fixture(scope="session")
def _ubp_runners(request: pytest.FixtureRequest, ubp_plugins: PluginSet):
    runners: dict[str, CaseRunner] = {}
    cpus = request.config.getoption("ubp_cpu") or None
    seed = request.config.getoption("ubp_seed")

    def get(arch_name: str) -> CaseRunner:
        if arch_name not in runners:
            arch = ubp_plugins.arch(arch_name)
            runners[arch_name] = CaseRunner(arch, select_cpus(ubp_plugins, arch, cpus), seed)
        return runners[arch_name]

    yield get
    for r in runners.values():
        r.close()


@pytest.fixture
def ubp_case_runner(_ubp_runners):
    def run(arch_name: str, case: Case) -> CaseResult:
        return _ubp_runners(arch_name).run(case)

    return run
