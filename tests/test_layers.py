"""The layering of ``pyproject.toml``'s import contracts holds, and each contract can fail.

``lint-imports`` checks the same contracts in CI; this test puts them under the README's test command too.
"""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path

import grimp
import pytest
from importlinter.application.use_cases import lint_imports, read_user_options
from importlinter.configuration import configure
from importlinter.contracts.acyclic_siblings import AcyclicSiblingsContract
from importlinter.contracts.forbidden import ForbiddenContract
from importlinter.contracts.independence import IndependenceContract
from importlinter.contracts.layers import LayersContract
from importlinter.contracts.protected import ProtectedContract

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
CONTRACT_TYPES = {
    "layers": LayersContract,
    "forbidden": ForbiddenContract,
    "independence": IndependenceContract,
    "protected": ProtectedContract,
    "acyclic_siblings": AcyclicSiblingsContract,
}


@pytest.fixture(scope="module")
def options():
    configure()  # import-linter's readers and graph builder, as its CLI sets them up
    return read_user_options(str(PYPROJECT))


@pytest.fixture(scope="module")
def graph(options):
    return grimp.build_graph(*options.session_options["root_packages"], cache_dir=None)


def _contract(options, contract_id: str):
    (raw,) = [c for c in options.contracts_options if c["id"] == contract_id]
    return CONTRACT_TYPES[raw["type"]](name=raw["name"], session_options=options.session_options, contract_options=raw)


def test_every_contract_is_kept(options):
    # what `lint-imports` runs; on failure its report (the contracts broken, and by which imports) is printed
    assert lint_imports(config_filename=str(PYPROJECT), cache_dir=None, no_logo=True)


# One import per contract that the contract must refuse: a contract that cannot fail checks nothing.
PLANTED = {
    "layers": ("itae.engine.patch", "itae.pipeline"),  # a lower layer importing a higher one
    "engine-clustering-metrics": ("itae.metrics.scores", "itae.report.figures"),
    "independent-cores": ("itae.clustering.api", "itae.metrics.scores"),
    "data-no-engine": ("itae.data.store", "itae.engine.patch"),
    "cli-private": ("itae.pipeline", "itae.cli.main"),
    "no-cycles": ("itae.models.base", "itae.models.loading"),  # loading imports base: a cycle
    "no-facade": ("itae.pipeline", "itae"),
}


def test_every_contract_is_tested(options):
    assert sorted(PLANTED) == sorted(c["id"] for c in options.contracts_options)


@pytest.mark.parametrize("contract_id", sorted(PLANTED))
def test_each_contract_refuses_a_planted_import(options, graph, contract_id):
    importer, imported = PLANTED[contract_id]
    assert _contract(options, contract_id).check(deepcopy(graph), verbose=False).kept
    planted = deepcopy(graph)
    planted.add_import(importer=importer, imported=imported, line_number=1, line_contents=f"import {imported}")
    assert not _contract(options, contract_id).check(planted, verbose=False).kept


def test_data_imports_no_extraction_core(options, graph):
    planted = deepcopy(graph)
    planted.add_import(importer="itae.data.store", imported="itae.extraction.session", line_number=1,
                       line_contents="import itae.extraction.session")
    assert not _contract(options, "data-no-engine").check(planted, verbose=False).kept
