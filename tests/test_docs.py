"""Every repository file that the README, a docstring or a help text names exists.

The rule for what counts as a repository path: a name that starts with one of the repository's
top-level folders (tinyllm/, tests/, examples/, benchmarks/), which must exist there (a `*`
must match at least one file), or a bare file name ending in .py, .md or .toml, which must be
some file of the repository. Anything else is a user's file in an example and is not checked:
run directories (runs/pretrain, OUT/metrics.json) and data a user supplies (my.txt,
reviews.csv, pairs.tsv).
"""

import ast
import fnmatch
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = re.compile(r"(?<![\w/.-])((?:tinyllm|tests|examples|benchmarks)/[\w*./-]*\w"
                  r"|[\w-]+\.(?:py|md|toml))(?![\w/])")


def named_paths(text):
    """Repository paths named in a text. Example: "tinyllm/ops.py and runs/x" -> ["tinyllm/ops.py"]."""
    return PATH.findall(text)


def exists(name):
    if "/" in name:
        return bool(glob.glob(os.path.join(ROOT, name)))
    return bool(glob.glob(os.path.join(ROOT, "**", name), recursive=True))


def texts():
    """(where, text) for the README, every string in the package, examples and benchmarks
    (docstrings, help texts, messages), and the docstrings of the tests."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        yield "README.md", f.read()
    for folder in ("tinyllm", "examples", "benchmarks", "tests"):
        for path in sorted(glob.glob(os.path.join(ROOT, folder, "*.py"))):
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
            where = os.path.relpath(path, ROOT)
            for node in ast.walk(tree):
                if folder == "tests":
                    if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)):
                        yield where, ast.get_docstring(node) or ""
                elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                    yield where, node.value


def test_the_rule_on_examples():
    assert named_paths("read tinyllm/ops.py, then `tests/test_ops.py`.") == ["tinyllm/ops.py",
                                                                             "tests/test_ops.py"]
    assert named_paths("--out runs/mine --data my.txt reviews.csv OUT/metrics.json") == []
    assert named_paths("see checkpoint.py and README.md") == ["checkpoint.py", "README.md"]
    assert exists("tinyllm/cli_*.py") and exists("checkpoint.py") and not exists("tinyllm/nope.py")


def test_every_named_repository_path_exists():
    missing = sorted({f"{where}: {name}" for where, text in texts() for name in named_paths(text)
                      if not exists(name)})
    assert not missing, "named but not in the repository:\n" + "\n".join(missing)


@pytest.mark.parametrize("folder", ["tinyllm", "examples", "benchmarks"])
def test_the_readme_names_every_module_example_and_benchmark(folder):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    mapped = {name for name in named_paths(readme) if name.startswith(folder + "/")}
    for path in sorted(glob.glob(os.path.join(ROOT, folder, "*.py"))):
        name = os.path.relpath(path, ROOT)
        if os.path.basename(name) == "__init__.py":
            continue
        assert any(fnmatch.fnmatch(name, pattern) for pattern in mapped), \
            f"README.md does not mention {name}"
