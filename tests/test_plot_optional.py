"""Matplotlib stays optional: no command imports it unless it draws, and without it each
drawing command says in one line how to install the extra (runs with or without matplotlib)."""

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tinyllm.cli import main

REPO = Path(__file__).resolve().parent.parent


def test_importing_tinyllm_and_its_commands_does_not_import_matplotlib():
    code = ("import sys, tinyllm, tinyllm.cli, tinyllm.plot, tinyllm.attention_maps;"
            " print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("args", [
    ["plot", "runs/anything", "--out", "x.png"],
    ["attention", "--checkpoint", "runs/anything", "--prompt", "a"],
    ["fewshot", "--checkpoint", "runs/anything", "--task", "t.jsonl", "--plot", "f.png"],
])
def test_without_matplotlib_each_command_says_how_to_install_it(monkeypatch, tmp_path, args):
    for name in [m for m in sys.modules if m.split(".")[0] == "matplotlib"] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib` now raises ImportError
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == [
        'Error: drawing needs matplotlib, which is not installed: pip install matplotlib']
    assert not list(tmp_path.iterdir())  # nothing written
