"""The integrations package stays framework-free; each module imports its own framework only,
and says in one line which extra to install when that framework is missing."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import dropspy.integrations

PACKAGE = Path(dropspy.integrations.__file__).parent
FRAMEWORKS = {"torch", "tensorflow", "keras", "tf_keras", "jax", "transformers", "accelerate",
              "lightning", "pytorch_lightning"}
# What each module may name: its own framework (and what its own callback class needs).
OWN = {
    "keras.py": {"keras", "tf_keras", "tensorflow"},
    "transformers.py": {"transformers", "accelerate"},
    "lightning.py": {"lightning", "pytorch_lightning"},
    "_base.py": set(),
    "__init__.py": set(),
}


def _named_modules(path):
    """Top-level module names a source file imports or hands to importlib / find_spec."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value.split(".")[0])   # importlib.import_module("...") and specs
    return names & FRAMEWORKS


@pytest.mark.parametrize("module", sorted(OWN))
def test_each_integration_names_only_its_own_framework(module):
    assert _named_modules(PACKAGE / module) <= OWN[module]


def test_the_integration_modules_are_all_checked():
    assert {p.name for p in PACKAGE.glob("*.py")} == set(OWN)


def _run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


def test_importing_dropspy_integrations_imports_no_framework():
    out = _run("import sys, dropspy.integrations, dropspy.integrations._base\n"
               f"print(sorted(set(sys.modules) & {FRAMEWORKS!r}))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("module, blocked, extra", [
    ("lightning", ("lightning", "pytorch_lightning"), "lightning"),
    ("transformers", ("transformers",), "transformers"),
    ("transformers", ("accelerate",), "transformers"),
    ("keras", ("keras", "tf_keras"), "tensorflow"),
])
def test_a_missing_framework_is_one_line_naming_the_extra(module, blocked, extra):
    code = (f"import sys\nfor name in {blocked!r}: sys.modules[name] = None\n"
            f"try:\n    import dropspy.integrations.{module}\n"
            f"except ImportError as exc:\n    print(exc)\nelse:\n    print('imported')")
    out = _run(code)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert "\n" not in line
    assert f"pip install 'dropspy[{extra}]'" in line, line
