"""Imports flow one way: schema -> methods / evaluation schema -> recipe loading (config)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Imports each layer in a fresh interpreter and reports which ssl_lib layers were loaded.
PROBE = """
import json, sys
loaded = {}
for module in ("ssl_lib.schema", "ssl_lib.eval.config", "ssl_lib.methods", "ssl_lib.config"):
    __import__(module)
    loaded[module] = sorted(m for m in sys.modules if m in (
        "ssl_lib.config", "ssl_lib.methods", "ssl_lib.eval.config", "ssl_lib.train"))
print(json.dumps(loaded))
"""


def test_layers_import_only_the_layers_below_them():
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded["ssl_lib.schema"] == []
    assert loaded["ssl_lib.eval.config"] == ["ssl_lib.eval.config"]
    assert "ssl_lib.config" not in loaded["ssl_lib.methods"]  # methods never load recipes
    assert "ssl_lib.train" not in loaded["ssl_lib.config"]


def test_no_function_local_imports_of_ssl_lib():
    """A function-local import would hide a cycle; the command line (cli.py) is the exception:
    it defers loading training and evaluation code until a command needs it."""
    found = []
    for path in sorted((ROOT / "ssl_lib").rglob("*.py")):
        if path.name == "cli.py":
            continue
        tree = ast.parse(path.read_text())
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in top:
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if any(n.startswith("ssl_lib") for n in names):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []
