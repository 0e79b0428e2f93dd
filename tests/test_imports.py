"""The import rule: scripts import libraries, never other scripts, and libraries never import a script.

Scripts are the entry points a user runs; every other top-level module is a library (demo_data.py counts as one:
the built-in data set, with a small command line). Imports inside functions count too.
"""

import ast

import pytest

from conftest import ROOT

SCRIPTS = {"tokenize_data", "pretrain", "finetune", "evaluate", "serve", "chat", "plot_loss", "export_hf", "bench",
           "gpu_reference"}
MODULES = sorted(p.stem for p in ROOT.glob("*.py"))


def local_imports(module: str) -> set[str]:
    """The top-level modules of this repository that `module` imports, anywhere in the file."""
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(MODULES)


def test_the_scripts_exist():
    assert SCRIPTS - {"gpu_reference"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_no_module_imports_a_script(module):
    assert not local_imports(module) & SCRIPTS, f"{module}.py imports the script(s) {local_imports(module) & SCRIPTS}"
