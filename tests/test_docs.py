"""What the README and docs/experiments.md name exists: every repository file (also those a
docstring or a help text names), every `--flag` (on the command it is written after), and every
name they quote from the code (`module.function`, a metrics key).

The rule for what counts as a repository path: a name that starts with one of the repository's
top-level folders (tinyllm/, tests/, examples/, benchmarks/, docs/), which must exist there (a `*`
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
import runpy

import click
import pytest

from tinyllm.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = re.compile(r"(?<![\w/.-])((?:tinyllm|tests|examples|benchmarks|docs)/[\w*./-]*\w"
                  r"|[\w-]+\.(?:py|md|toml))(?![\w/])")


def named_paths(text):
    """Repository paths named in a text. Example: "tinyllm/ops.py and runs/x" -> ["tinyllm/ops.py"]."""
    return PATH.findall(text)


def exists(name):
    if "/" in name:
        return bool(glob.glob(os.path.join(ROOT, name)))
    return bool(glob.glob(os.path.join(ROOT, "**", name), recursive=True))


# The documents a user reads: the README, and the measurements behind its defaults.
DOCS = ["README.md"] + sorted(os.path.relpath(path, ROOT)
                              for path in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def texts():
    """(where, text) for the documents, every string in the package, examples and benchmarks
    (docstrings, help texts, messages), and the docstrings of the tests."""
    for name in DOCS:
        yield name, read(name)
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
    mapped = {name for name in named_paths(read("README.md")) if name.startswith(folder + "/")}
    for path in sorted(glob.glob(os.path.join(ROOT, folder, "*.py"))):
        name = os.path.relpath(path, ROOT)
        if os.path.basename(name) == "__init__.py":
            continue
        assert any(fnmatch.fnmatch(name, pattern) for pattern in mapped), \
            f"README.md does not mention {name}"


# ----------------------------------------------------------------------------- flags
# Every `--flag` the README names must exist: after `tinyllm CMD` (or `python examples/X.py`,
# `python benchmarks/X.py`) on the same line of code, as a flag of that command; anywhere else,
# as a flag of some command or script (or of mpirun, which the MPI section names).

MPIRUN_FLAGS = {"--allow-run-as-root", "--hostfile"}
EVERY_COMMAND_FLAGS = {"--help", "--version"}  # Click's own
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
FENCED = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`]+)`")  # a span may go on over a line break


def click_flags():
    """Each command's long flags: {("pretrain",): {"--data", ...}, ("seq2seq", "train"): ...}."""
    def walk(group, path):
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                yield from walk(command, path + (name,))
            else:
                yield path + (name,), {opt for param in command.params
                                       for opt in param.opts + param.secondary_opts
                                       if opt.startswith("--")}
    return dict(walk(main, ()))


def script_flags(name):
    """The long flags of a script's argparse parser, read from its source (nothing is run)."""
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    flags = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument"):
            names = [a.value for a in node.args if isinstance(a, ast.Constant)
                     and isinstance(a.value, str) and a.value.startswith("--")]
            flags.update(names)
            if any(isinstance(k.value, ast.Attribute) and k.value.attr == "BooleanOptionalAction"
                   for k in node.keywords if k.arg == "action"):
                flags.update("--no-" + n[2:] for n in names)
    return flags


def code_lines(text):
    """Each line of the README's code: fenced blocks (with `\\` continuations joined, and a
    comment as a line of its own) and inline code spans."""
    for block in FENCED.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            yield from re.split(r"(?:^|\s)#", line, maxsplit=1)
    yield from INLINE.findall(FENCED.sub("", text))


def tinyllm_commands(words, commands):
    """The commands that the words after "tinyllm" name (a `|` gives alternatives).
    Example: ["finetune", "classify|instruct", "--lr"] -> [("finetune", "classify"),
    ("finetune", "instruct")]; ["runs/x"] -> []."""
    path = ()
    for word in words:
        names = word.split("|")
        if not any(p[:len(path) + 1] == path + (names[0],) for p in commands):
            break
        path, alternatives = path + (names[0],), names
    return [path[:-1] + (name,) for name in alternatives] if path else []


def flags_by_command(line, commands):
    """(command, flag) for each flag of a line of code; command is a tinyllm command path, a
    script's path, or None when no command comes before the flag.
    Example: "tinyllm fewshot --task T | x --y" -> [(("fewshot",), "--task"), (None, "--y")]."""
    found, current, words = [], [], line.split()
    for i, word in enumerate(words):
        if word == "tinyllm":
            current = tinyllm_commands(words[i + 1:], commands)
        elif re.fullmatch(r"(examples|benchmarks)/\w+\.py", word) and "python" in words[i - 1:i]:
            current = [word]
        elif word in ("|", "&&", ";", ">", "2>"):
            current = []
        found += [(command, flag) for flag in FLAG.findall(word) for command in current or [None]]
    return found


def readme_flag_errors(text):
    commands = click_flags()
    scripts = {name: script_flags(name) for folder in ("examples", "benchmarks")
               for name in (os.path.relpath(p, ROOT) for p in
                            sorted(glob.glob(os.path.join(ROOT, folder, "*.py"))))}
    anywhere = set().union(*commands.values(), *scripts.values(), MPIRUN_FLAGS,
                           EVERY_COMMAND_FLAGS)
    errors = set()
    for line in code_lines(text):
        for command, flag in flags_by_command(line, commands):
            if command is None:
                known, name = anywhere, "any command"
            elif isinstance(command, tuple):
                known, name = commands.get(command, set()), "tinyllm " + " ".join(command)
            else:
                known, name = scripts.get(command, set()), command
            if flag not in known | EVERY_COMMAND_FLAGS:
                errors.add(f"{flag} is not a flag of {name} (in: {line.strip()})")
    prose = INLINE.sub("", FENCED.sub("", text))
    for flag in set(FLAG.findall(prose)) - anywhere:
        errors.add(f"{flag} (in the README's prose) is not a flag of any command")
    return sorted(errors)


def test_the_flag_rule_on_examples():
    commands = click_flags()
    assert tinyllm_commands(["finetune", "classify|instruct", "--lr"], commands) == [
        ("finetune", "classify"), ("finetune", "instruct")]
    assert tinyllm_commands(["plot", "runs/x"], commands) == [("plot",)]
    assert tinyllm_commands(["runs/x"], commands) == []
    assert flags_by_command("tinyllm fewshot --task T --shots 0,1 | x --y", commands) == [
        (("fewshot",), "--task"), (("fewshot",), "--shots"), (None, "--y")]
    assert flags_by_command("tinyllm finetune classify|instruct --lr 1", commands) == [
        (("finetune", "classify"), "--lr"), (("finetune", "instruct"), "--lr")]
    assert flags_by_command("python examples/mlm_vs_clm.py --mlm runs/mlm", commands) == [
        ("examples/mlm_vs_clm.py", "--mlm")]
    assert readme_flag_errors("`tinyllm generate\n--max-iters 5`") == [
        "--max-iters is not a flag of tinyllm generate (in: tinyllm generate\n--max-iters 5)"]
    code = "```\ntinyllm pretrain \\\n    --eval-iters 5  # or --resume\n```"
    assert readme_flag_errors(code) == []
    assert readme_flag_errors("```\ntinyllm plot runs/x  # --no-such\n```") == [
        "--no-such is not a flag of any command (in: --no-such)"]
    assert readme_flag_errors("then `--no-such-flag`, or --no-such") == [
        "--no-such (in the README's prose) is not a flag of any command",
        "--no-such-flag is not a flag of any command (in: --no-such-flag)"]


@pytest.mark.parametrize("doc", DOCS)
def test_every_flag_the_documents_name_exists(doc):
    errors = readme_flag_errors(read(doc))
    assert not errors, f"{doc} names flags the commands do not have:\n" + "\n".join(errors)


# The defaults the README states in words, each tied to the flag it describes: a changed default
# or a reworded phrase fails here, so the two are changed together.
STATED_DEFAULTS = [
    ("a 2048-token vocabulary", "pretrain", {"--vocab-size": 2048}),
    ("It has 4 layers, 4 heads and 128 channels, trains for 750 steps of 8 x 256 tokens",
     "pretrain", {"--n-layer": 4, "--n-head": 4, "--n-embd": 128, "--max-iters": 750,
                  "--batch-size": 8, "--block-size": 256, "--short-context": 0}),
    ("no biases (`--no-bias`, as `GPTConfig` now), BPE tokens, 4 layers of 128 channels, a context"
     " of 256 and lr 1e-3", "pretrain", {"--bias": False, "--tokenizer": "bpe", "--lr": 1e-3}),
    ("with its default seed 1337", "pretrain", {"--seed": 1337}),
    ("`--mask-rate` changes the 15%", "pretrain", {"--mask-rate": 0.15}),
    ("At most `--max-windows` (8) windows", "finetune classify", {"--max-windows": 8}),
    ("The defaults (300 steps at most, learning rate 5e-4, evaluation every 25 steps, patience 4,"
     " dropout 0.1 in the body, no freezing", "finetune classify",
     {"--max-iters": 300, "--eval-interval": 25, "--patience": 4, "--dropout": 0.1,
      "--freeze": "none"}),
    ("**85.0%** after 1500 steps", "finetune instruct", {"--max-iters": 1500}),
    ("(`--label-smoothing`, 0.1 as in the paper)", "seq2seq train", {"--label-smoothing": 0.1}),
    ("100.0% exact match on 500 held-out dates after 1500 steps", "seq2seq train",
     {"--eval-examples": 500, "--max-iters": 1500}),
]


def test_the_learning_rates_the_readme_states_are_those_each_base_gets():
    """--lr and --warmup-iters of `finetune classify` default by the base's objective."""
    from tinyllm.classify_run import LR_AND_WARMUP

    readme = " ".join(read("README.md").split())
    assert "The defaults (300 steps at most, learning rate 5e-4," in readme
    assert ("from an MLM checkpoint the learning rate is 1e-3 with 50 warm-up steps instead of 20"
            in readme)
    assert LR_AND_WARMUP == {"clm": (5e-4, 20), "mlm": (1e-3, 50)}


def default_of(command, flag):
    """The default of a tinyllm command's flag. Example: ("pretrain", "--seed") -> 1337."""
    group = main
    for name in command.split():
        group = group.commands[name]
    return next(param.default for param in group.params if flag in param.opts)


@pytest.mark.parametrize("phrase, command, defaults", STATED_DEFAULTS,
                         ids=[phrase[:40] for phrase, _, _ in STATED_DEFAULTS])
def test_a_default_the_readme_states_is_the_flags_default(phrase, command, defaults):
    readme = " ".join(read("README.md").split())
    assert phrase in readme, f"README.md no longer says {phrase!r}: update STATED_DEFAULTS"
    for flag, value in defaults.items():
        assert default_of(command, flag) == value, f"tinyllm {command} {flag}"


# ----------------------------------------------------------------------------- names
# A name the README quotes from the code must be in it: `module.function` in that module, and a
# key or function name (`windowed_texts`, `"best_iter"`, `split_lines`) somewhere in the source.

def source_text():
    texts = []
    for folder in ("tinyllm", "examples", "benchmarks"):
        for path in sorted(glob.glob(os.path.join(ROOT, folder, "*.py"))):
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
    return "\n".join(texts)


def defines(module, name):
    """Whether tinyllm/<module>.py defines `name` at its top level (def, class or assignment)."""
    with open(os.path.join(ROOT, "tinyllm", module + ".py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return True
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) else [])
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return True
    return False


FILE_TYPES = {"py", "json", "jsonl", "npz", "png", "svg", "md", "toml", "txt", "csv", "tsv"}


def readme_name_errors(text, source):
    modules = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "tinyllm", "*.py"))}
    errors = set()
    for span in INLINE.findall(FENCED.sub("", text)):
        for module, name in re.findall(r"(?<![\w./])([a-z_0-9]+)\.([A-Za-z_]\w*)\b(?![./])", span):
            if module in modules and name not in FILE_TYPES and not defines(module, name):
                errors.add(f"{module}.{name} is not defined in tinyllm/{module}.py")
        quoted = re.fullmatch(r'"([A-Za-z_]\w*)"(?::.*)?|([a-z]\w*_\w*)', span)
        name = quoted and (quoted.group(1) or quoted.group(2))
        if name and not re.search(rf"\b{name}\b", source):
            errors.add(f"{name} is not in tinyllm's, the examples' or the benchmarks' code")
    return sorted(errors)


def test_the_name_rule_on_examples():
    source = "def split_lines(): return {'best_iter': 1}"
    text = "`split_lines`, `\"best_iter\"`, `fast.gpt_loss_and_grads_in_halves`, `tinyllm/ops.py`"
    assert readme_name_errors(text, source) == []
    assert readme_name_errors("`best_iters`, `\"ranks\": 2` and `ops.no_such_op`", source) == [
        "best_iters is not in tinyllm's, the examples' or the benchmarks' code",
        "ops.no_such_op is not defined in tinyllm/ops.py",
        "ranks is not in tinyllm's, the examples' or the benchmarks' code"]


@pytest.mark.parametrize("doc", DOCS)
def test_every_code_name_the_documents_quote_exists(doc):
    errors = readme_name_errors(read(doc), source_text())
    assert not errors, f"{doc} quotes names the code does not have:\n" + "\n".join(errors)


# ----------------------------------------------------------------------------- examples' --help

def example_help(name, monkeypatch, capsys):
    """What `python examples/<name> --help` prints, run in this process."""
    monkeypatch.setattr("sys.argv", [name, "--help"])
    with pytest.raises(SystemExit):
        runpy.run_path(os.path.join(ROOT, "examples", name), run_name="__main__")
    return capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(os.path.basename(p) for p in
                                        glob.glob(os.path.join(ROOT, "examples", "*.py"))))
def test_an_examples_help_opens_with_a_whole_sentence(name, monkeypatch, capsys):
    text = example_help(name, monkeypatch, capsys)
    description = text.split("\n\n")[1]  # after the usage lines, before the options
    assert description.rstrip().endswith("."), f"{name} --help: {description!r}"


def test_pretrain_and_sample_names_the_corpus_it_trains_on(monkeypatch, capsys):
    from tinyllm.data import DEFAULT_CORPUS

    text = " ".join(example_help("pretrain_and_sample.py", monkeypatch, capsys).split())
    assert f"default: embedded {DEFAULT_CORPUS}" in text
