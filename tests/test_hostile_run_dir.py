"""A run directory is untrusted input: crafted ones must give a one-line error (or load safely)
and never make tinyllm open a file outside the directory, follow a symlink out of it, block on
a FIFO, read an unbounded file or run a regex the file chose.

Every file opened is recorded with an audit hook (PEP 578: `open` and `os.open` raise the
"open" event), and each test asserts that nothing outside the run directory was opened except
the Python installation's own files.
"""

import hashlib
import json
import os
import struct
import sys
import zipfile

import numpy as onp
import pytest
from click.testing import CliRunner

from tinyllm.checkpoint import (KIND_SPECIAL_TOKENS, MODEL_KINDS, checkpoint_paths, load_checkpoint,
                                save_checkpoint)
from tinyllm.cli import main
from tinyllm.config import TrainConfig
from tinyllm import tokenizers
from tinyllm.errors import TinyLLMError
from tinyllm.fileio import atomic_save_npz
from tinyllm.optim import adamw_init
from tinyllm.tokenizers import BPETokenizer, CharTokenizer
from tinyllm.rundir import text_fingerprint

TEXT = "the quick brown fox jumps over the lazy dog\n" * 20
OPENED = []  # paths opened while RECORDING is on
RECORDING = []


def _audit(event, args):
    if RECORDING and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # hooks cannot be removed; this one only records while RECORDING


@pytest.fixture
def opened():
    """The paths opened during the test (absolute)."""
    OPENED.clear()
    RECORDING.append(True)
    yield OPENED
    RECORDING.clear()


def outside(paths, run_dir):
    """Opened paths that are neither inside run_dir nor part of the Python installation."""
    run_dir = os.path.realpath(run_dir)
    allowed = (run_dir + os.sep, sys.prefix, sys.base_prefix, os.path.dirname(os.__file__),
               "/proc/meminfo", "/dev/null", "/dev/urandom")
    project = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return [p for p in map(os.path.abspath, paths)
            if p != run_dir and not p.startswith(allowed) and not p.startswith(project)]


# What the runs of a kind write into config.json besides the model (fine-tuning and seq2seq)
KIND_FIELDS = {"classifier": {"labels": ["neg", "pos"], "finetune": {"task": "classify"},
                              "before": {"train": 0.5, "val": 0.5, "test": 0.5}},
               "seq2seq": {"label_smoothing": 0.1, "schedule": "cosine"}}


def make_run(run_dir, tokenizer=None, iteration=3, kind="gpt", extra=None):
    special_tokens = ["<|endoftext|>", *KIND_SPECIAL_TOKENS.get(kind, ())]
    tokenizer = tokenizer or CharTokenizer.train(TEXT, special_tokens=special_tokens)
    config_cls, init_fn = MODEL_KINDS[kind]
    config = config_cls(vocab_size=tokenizer.vocab_size, block_size=8, n_layer=1, n_head=2,
                        n_embd=8)
    params = init_fn(config, onp.random.default_rng(0))
    save_checkpoint(str(run_dir), params, adamw_init(params),
                    onp.random.default_rng(1).bit_generator.state, config,
                    TrainConfig(max_iters=10), tokenizer, iteration,
                    extra={"data": None, "last_eval_iter": iteration,
                           **KIND_FIELDS.get(kind, {}), **(extra or {})}, kind=kind)
    return run_dir


@pytest.fixture
def run_dir(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET first line\n", encoding="utf-8")
    return make_run(tmp_path / "run")


def edit_config(run_dir, **changes):
    path = run_dir / "config.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    meta.update(changes)
    path.write_text(json.dumps(meta), encoding="utf-8")


def load_error(run_dir, opened, with_optimizer=True):
    with pytest.raises(TinyLLMError) as err:
        load_checkpoint(str(run_dir), with_optimizer=with_optimizer, kind=None)
    message = str(err.value)
    assert "\n" not in message and "TOP SECRET" not in message
    assert outside(opened, run_dir) == []
    return message


def test_an_honest_run_loads_and_opens_only_its_own_files(run_dir, opened):
    load_checkpoint(str(run_dir), with_optimizer=True)
    assert outside(opened, run_dir) == []
    assert any(p.endswith("config.json") for p in opened)


@pytest.mark.parametrize("field", ["tokenizer_file", "model_file", "optim_file"])
@pytest.mark.parametrize("name", ["../secret.txt", "{tmp}/secret.txt", "sub/model.npz", "..",
                                  ".hidden", "", 7])
def test_file_names_outside_the_run_are_refused(run_dir, opened, field, name):
    if isinstance(name, str):
        name = name.format(tmp=run_dir.parent)
    edit_config(run_dir, **{field: name})
    assert "not a plain file name" in load_error(run_dir, opened)


@pytest.mark.parametrize("role", ["config", "model", "optim", "tokenizer"])
def test_symlinks_out_of_the_run_are_not_followed(run_dir, opened, role):
    path = run_dir / "config.json" if role == "config" else checkpoint_paths(str(run_dir))[role]
    os.replace(path, run_dir.parent / "moved")  # the real file now lives outside
    os.symlink(run_dir.parent / "moved", path)
    assert "symbolic link" in load_error(run_dir, opened)


@pytest.mark.parametrize("role", ["config", "model", "tokenizer"])
def test_a_fifo_or_a_device_is_refused_without_blocking(run_dir, opened, role):
    path = run_dir / "config.json" if role == "config" else checkpoint_paths(str(run_dir))[role]
    os.unlink(path)
    os.mkfifo(path)  # opening it to read would block forever with no writer
    assert "not a regular file" in load_error(run_dir, opened)


def test_config_json_linked_to_dev_zero_is_refused(run_dir, opened):
    os.unlink(run_dir / "config.json")
    os.symlink("/dev/zero", run_dir / "config.json")
    assert "symbolic link" in load_error(run_dir, opened)


def test_an_oversized_config_json_is_not_read(run_dir, opened):
    with open(run_dir / "config.json", "a", encoding="utf-8") as f:
        f.write(" " * (2 << 20))
    assert "more than" in load_error(run_dir, opened)


@pytest.mark.parametrize("file", ["config.json", "tokenizer.json"])
def test_deeply_nested_json_is_a_one_line_error(run_dir, opened, file):
    (run_dir / file).write_text("[" * 200_000 + "]" * 200_000, encoding="utf-8")
    assert "nested too deeply" in load_error(run_dir, opened)


def test_nan_constants_in_json_are_refused(run_dir, opened):
    text = (run_dir / "config.json").read_text(encoding="utf-8").replace('"iter": 3', '"iter": NaN')
    (run_dir / "config.json").write_text(text, encoding="utf-8")
    assert "NaN" in load_error(run_dir, opened)


def test_a_number_of_thousands_of_digits_in_json_is_said_plainly(run_dir, opened):
    # Python reads at most 4,300 digits and says "use sys.set_int_max_str_digits()"
    text = (run_dir / "config.json").read_text(encoding="utf-8")
    (run_dir / "config.json").write_text(text.replace('"iter": 3', '"iter": ' + "9" * 5000),
                                         encoding="utf-8")
    message = load_error(run_dir, opened)
    assert "5,000 digits" in message and "sys." not in message, message


@pytest.mark.parametrize("changes, words", [
    ({"iter": "3"}, ["'iter'", "int"]),
    ({"iter": -1}, ["iter", "negative"]),
    ({"kind": ["gpt"]}, ["'kind'", "str"]),
    ({"model": "big"}, ["'model'", "dict"]),
    ({"model_file": None}, ["model_file"]),
    ({"dtype": "object"}, ["dtype"]),
    ({"version": True}, ["version"]),
    ({"version": 0}, ["version", "from 1"]),  # not "upgrade tinyllm": no tinyllm wrote it
    ({"labels": 5}, ["'labels'", "list"]),
    ({"labels": [1, 2]}, ["'labels'", "strings"]),
    ({"labels": ["neg", "\x1b[2Jpos"]}, ["'labels'", "control character"]),  # to the terminal
    ({"labels": ["pos", "pos"]}, ["'labels'", "each class once"]),  # which one is predicted?
    ({"labels": ["pos", " "]}, ["'labels'", "none of them empty"]),
    ({"finetune": "x"}, ["'finetune'", "dict"]),
    ({"before": [1]}, ["'before'", "dict"]),
    ({"label_smoothing": "0.1"}, ["'label_smoothing'"]),
    ({"schedule": 5}, ["'schedule'"]),
])
def test_wrongly_typed_config_fields_are_named(run_dir, opened, changes, words):
    edit_config(run_dir, **changes)
    message = load_error(run_dir, opened)
    assert all(w in message for w in words), message


@pytest.mark.parametrize("field, value", [("n_embd", "8"), ("n_layer", 1.5), ("bias", 1),
                                          ("dropout", "0"), ("n_head", None)])
def test_wrongly_typed_model_fields_are_named(run_dir, opened, field, value):
    meta = json.loads((run_dir / "config.json").read_text())
    edit_config(run_dir, model={**meta["model"], field: value})
    message = load_error(run_dir, opened)
    assert field in message and "config.json" in message


def test_a_config_describing_a_huge_model_is_refused_before_allocating(run_dir, opened):
    meta = json.loads((run_dir / "config.json").read_text())
    edit_config(run_dir, model={**meta["model"], "n_embd": 1 << 20, "n_head": 1, "n_layer": 1000})
    assert "too few for the model" in load_error(run_dir, opened)


@pytest.mark.parametrize("kind, changes", [
    ("gpt", {"block_size": 1 << 20}),  # learned positions (T, C)
    ("classifier", {"n_classes": 1 << 20}),  # the head (C, K)
    ("gpt-lora", {"lora_rank": 1 << 20}),  # adapters (C, r)
    ("gpt", {"n_layer": 20_000, "n_embd": 2, "n_head": 1}),  # 20,000 blocks of tiny arrays
])
def test_every_size_in_the_config_is_checked_against_the_weights(tmp_path, opened, kind, changes):
    run = make_run(tmp_path / kind, kind=kind)
    model_file = checkpoint_paths(str(run))["model"]
    rewrite_npz(model_file, lambda a: a.__setitem__("padding", onp.zeros(1 << 20, onp.float32)))
    meta = json.loads((run / "config.json").read_text())
    edit_config(run, model={**meta["model"], **changes})
    assert "too few for the model" in load_error(run, opened, with_optimizer=False)


@pytest.mark.parametrize("section, field, value", [
    ("model", "block_size", (1 << 20) + 1),  # a context no flag can ask for
    ("model", "vocab_size", 10**9),
    ("train", "grad_accum", 10**9),  # one step of a billion micro-batches
    ("train", "max_iters", 1 << 40),
])
def test_sizes_and_steps_are_bounded_as_the_flags_bound_them(run_dir, opened, section, field,
                                                             value):
    meta = json.loads((run_dir / "config.json").read_text())
    edit_config(run_dir, **{section: {**meta[section], field: value}})
    message = load_error(run_dir, opened, with_optimizer=section == "train")
    assert f"field {field!r}" in message and "out of range" in message


def test_a_lora_run_of_rank_zero_is_refused(tmp_path, opened):
    """Merging adapters scales them by alpha / rank: rank 0 must not reach the division."""
    run = make_run(tmp_path / "lora", kind="gpt-lora")
    meta = json.loads((run / "config.json").read_text())
    edit_config(run, model={**meta["model"], "lora_rank": 0})

    def zero_rank(arrays):
        for name in [n for n in arrays if n.startswith("lora.")]:
            rows, cols = arrays[name].shape
            arrays[name] = onp.zeros((rows, 0) if name.endswith(".a") else (0, cols), onp.float32)

    rewrite_npz(checkpoint_paths(str(run))["model"], zero_rank)
    assert "lora_rank" in load_error(run, opened, with_optimizer=False)


@pytest.mark.parametrize("field, value", [("seed", -1),  # numpy refuses a negative seed
                                          ("max_iters", 1 << 64)])  # steps are saved as int64
def test_whole_numbers_must_fit_an_int64_and_not_be_negative(run_dir, opened, field, value):
    meta = json.loads((run_dir / "config.json").read_text())
    edit_config(run_dir, train={**meta["train"], field: value})
    assert field in load_error(run_dir, opened)


def test_a_step_beyond_int64_is_refused(run_dir, opened):
    """Stamped as uint64 it matches, but the next save writes the step as int64 (OverflowError)."""
    for role in ("model", "optim"):
        rewrite_npz(checkpoint_paths(str(run_dir))[role],
                    lambda a: a.__setitem__("_iter", onp.array(1 << 63, onp.uint64)))
    edit_config(run_dir, iter=1 << 63)
    assert "iter" in load_error(run_dir, opened)


def test_training_settings_are_validated(run_dir, opened):
    meta = json.loads((run_dir / "config.json").read_text())
    edit_config(run_dir, train={**meta["train"], "eval_interval": 0})
    assert "eval-interval" in load_error(run_dir, opened)


def rewrite_npz(path, change):
    with onp.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    change(arrays)
    atomic_save_npz(str(path), arrays)


def test_nan_weights_are_refused(run_dir, opened):
    rewrite_npz(checkpoint_paths(str(run_dir))["model"],
                lambda a: a["wte"].__setitem__((0, 0), onp.nan))
    assert "NaN or infinite" in load_error(run_dir, opened, with_optimizer=False)


def test_nan_moments_are_refused(run_dir, opened):
    rewrite_npz(checkpoint_paths(str(run_dir))["optim"],
                lambda a: a["v.wte"].__setitem__((0, 0), onp.inf))
    assert "NaN or infinite" in load_error(run_dir, opened)


def test_weights_of_an_unexpected_dtype_are_refused(run_dir, opened):
    def to_float16(arrays):
        arrays["wpe"] = arrays["wpe"].astype(onp.float16)

    rewrite_npz(checkpoint_paths(str(run_dir))["model"], to_float16)
    assert "float16" in load_error(run_dir, opened, with_optimizer=False)


@pytest.mark.parametrize("change, words", [
    (lambda a: a.pop("step"), ["step"]),
    (lambda a: a.__setitem__("step", onp.array([1.5])), ["step"]),
    (lambda a: a.__setitem__("rng_state", onp.frombuffer(b'{"state": 1}', onp.uint8)),
     ["rng_state"]),
    (lambda a: a.__setitem__("rng_state", onp.zeros(3, onp.float32)), ["rng_state"]),
    (lambda a: a.__setitem__("extra", onp.zeros(3, onp.float32)), ["extra"]),
    (lambda a: a.__setitem__("step", onp.array(1 << 64 - 1, onp.uint64)), ["step"]),
    (lambda a: a.__setitem__("rng_state", onp.frombuffer(json.dumps(
        {"bit_generator": "PCG64", "state": {"state": 1 << 300, "inc": 1}, "has_uint32": 0,
         "uinteger": 0}).encode(), onp.uint8)), ["rng_state"]),
])
def test_wrong_optimizer_fields_are_named(run_dir, opened, change, words):
    rewrite_npz(checkpoint_paths(str(run_dir))["optim"], change)
    message = load_error(run_dir, opened)
    assert all(w in message for w in words), message


def test_random_bytes_are_not_called_pickled_data(run_dir, opened):
    path = checkpoint_paths(str(run_dir))["model"]
    with open(path, "wb") as f:
        f.write(onp.random.default_rng(0).bytes(4096))
    message = load_error(run_dir, opened)
    assert "not an .npz" in message and "pickle" not in message.lower()


def test_a_pickled_object_array_is_refused_and_never_run(run_dir, opened, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = checkpoint_paths(str(run_dir))["model"]
    onp.savez(path, _iter=onp.array(3), wte=onp.array([Payload()], dtype=object))
    message = load_error(run_dir, opened)
    assert "not a numeric array" in message and not marker.exists()


def test_an_array_declaring_more_data_than_it_holds_is_refused(run_dir, opened):
    """A header claiming a terabyte must not make numpy allocate one."""
    path = checkpoint_paths(str(run_dir))["model"]
    with zipfile.ZipFile(path, "w") as archive:
        header = {"descr": "<f4", "fortran_order": False, "shape": (1 << 38,)}
        with archive.open("wte.npy", "w") as f:
            onp.lib.format.write_array_header_1_0(f, header)
            f.write(b"\0" * 64)
    assert "declares more data" in load_error(run_dir, opened)


def test_a_member_whose_size_in_the_zip_directory_lies_is_refused(run_dir, opened):
    """numpy allocates the whole array before reading it: a 6 kB file whose directory claims a
    4 GB member, with a header to match, made it ask for 4 GB (a MemoryError under a limit)."""
    path = checkpoint_paths(str(run_dir))["model"]
    with zipfile.ZipFile(path, "a") as archive:
        header = {"descr": "<f4", "fortran_order": False, "shape": ((1 << 30) - 1000,)}
        with archive.open("big.npy", "w") as f:
            onp.lib.format.write_array_header_1_0(f, header)
    data = bytearray(open(path, "rb").read())
    entry = data.rindex(b"PK\x01\x02")  # the directory entry of big.npy, the last member
    data[entry + 20:entry + 28] = struct.pack("<II", 0xFFFFFFF0, 0xFFFFFFF0)  # both its sizes
    open(path, "wb").write(bytes(data))
    assert "claims more bytes than the file has" in load_error(run_dir, opened)


def test_a_compressed_member_is_refused(run_dir, opened):
    path = checkpoint_paths(str(run_dir))["model"]
    onp.savez_compressed(path, _iter=onp.array(3))
    assert "compressed" in load_error(run_dir, opened)


# ----------------------------------------------------------------------------- tokenizers


def test_a_hostile_split_pattern_is_never_compiled(tmp_path, opened):
    run = make_run(tmp_path / "bpe", BPETokenizer.train(TEXT, 260))
    path = checkpoint_paths(str(run))["tokenizer"]
    data = json.loads(open(path, encoding="utf-8").read())
    data["pattern"] = "(a+)+$"  # catastrophic backtracking on "aaaa...b"
    open(path, "w", encoding="utf-8").write(json.dumps(data))
    assert "not one of tinyllm's split patterns" in load_error(run, opened)


def test_merges_that_build_giant_tokens_are_refused(tmp_path, opened):
    run = make_run(tmp_path / "bpe", BPETokenizer.train(TEXT, 260))
    path = checkpoint_paths(str(run))["tokenizer"]
    data = json.loads(open(path, encoding="utf-8").read())
    data["merges"] = [[97, 97]] + [[256 + i, 256 + i] for i in range(40)]  # each doubles: 2^41 bytes
    data["special_tokens"] = {}
    open(path, "w", encoding="utf-8").write(json.dumps(data))
    assert "longer than" in load_error(run, opened)


def test_many_long_tokens_are_refused_before_they_are_built(tmp_path, opened):
    """Each merge may make a token of up to 64 kB: 60,000 of them (a 700 kB file) ask for 4 GB."""
    run = make_run(tmp_path / "bpe", BPETokenizer.train(TEXT, 260))
    path = checkpoint_paths(str(run))["tokenizer"]
    data = json.loads(open(path, encoding="utf-8").read())
    data["merges"] = [[97, 97]] + [[256 + i, 256 + i] for i in range(14)]  # a 32 kB token
    data["merges"] += [[270, 270]] * 60_000
    data["special_tokens"] = {}
    open(path, "w", encoding="utf-8").write(json.dumps(data))
    assert "bytes together" in load_error(run, opened)


def test_a_tokenizer_with_too_many_ids_is_refused_before_it_is_built(tmp_path, opened,
                                                                     monkeypatch):
    """A 64 MB file holds 11M merges [0, 0], which took 2.6 GB and 17 s to build."""
    monkeypatch.setattr(tokenizers, "MAX_VOCAB_SIZE", 1000)  # the same check, at a test's size
    run = make_run(tmp_path / "bpe", BPETokenizer.train(TEXT, 260))
    path = checkpoint_paths(str(run))["tokenizer"]
    data = json.loads(open(path, encoding="utf-8").read())
    data["merges"], data["special_tokens"] = [[0, 0]] * 1000, {}
    open(path, "w", encoding="utf-8").write(json.dumps(data))
    assert "ids, more than" in load_error(run, opened)


def test_a_version_1_bpe_file_with_the_package_pattern_still_loads(tmp_path, opened):
    run = make_run(tmp_path / "bpe", BPETokenizer.train(TEXT, 260, ["<|endoftext|>"]))
    ckpt = load_checkpoint(str(run))
    assert ckpt.tokenizer.decode(ckpt.tokenizer.encode("lazy dog")) == "lazy dog"


# ----------------------------------------------------------------------------- commands


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_a_stored_data_path_is_not_read_into_output(run_dir, tmp_path, opened):
    """pretrain --resume of a run whose "data" names a file outside: its contents are hashed,
    never used or shown, and the mismatch is a one-line error."""
    edit_config(run_dir, data=str(tmp_path / "secret.txt"), data_sha256="0" * 64)
    result = invoke("pretrain", "--out", run_dir, "--resume")
    assert result.exit_code == 1 and "has changed since the run began" in result.output
    assert "TOP SECRET" not in result.output


@pytest.mark.parametrize("data", ["/dev/zero", "fifo"])
def test_a_stored_data_path_that_is_not_a_regular_file_is_refused(run_dir, tmp_path, data):
    if data == "fifo":
        data = str(tmp_path / "fifo")
        os.mkfifo(data)
    edit_config(run_dir, data=data, data_sha256="0" * 64)
    result = invoke("pretrain", "--out", run_dir, "--resume")
    assert result.exit_code == 1 and "not a regular file" in result.output


def test_a_metrics_symlink_out_of_the_run_is_never_appended_to(run_dir, tmp_path):
    target = tmp_path / "secret.txt"
    before = target.read_bytes()
    os.symlink(target, run_dir / "metrics.jsonl")
    data = tmp_path / "data.txt"
    data.write_text(TEXT, encoding="utf-8")
    result = invoke("pretrain", "--data", data, "--out", run_dir, "--force", "--n-layer", 1,
                    "--n-head", 2, "--n-embd", 8, "--block-size", 8, "--max-iters", 2,
                    "--eval-interval", 1, "--eval-iters", 1, "--sample-tokens", 0)
    assert target.read_bytes() == before
    assert result.exit_code == 0, result.output  # --force replaced the link by a plain file
    assert not os.path.islink(run_dir / "metrics.jsonl")


def test_resume_with_a_metrics_symlink_is_refused(run_dir, tmp_path):
    target = tmp_path / "secret.txt"
    before = target.read_bytes()
    os.symlink(target, run_dir / "metrics.jsonl")
    data = tmp_path / "data.txt"
    data.write_text(TEXT, encoding="utf-8")
    edit_config(run_dir, data=str(data), data_sha256=text_fingerprint(TEXT))
    result = invoke("pretrain", "--out", run_dir, "--resume")
    assert result.exit_code == 1 and "symbolic link" in result.output
    assert target.read_bytes() == before


def test_generate_and_fewshot_refuse_a_hostile_tokenizer_name(run_dir, opened, tmp_path):
    edit_config(run_dir, tokenizer_file=str(tmp_path / "secret.txt"))
    task = tmp_path / "task.jsonl"
    task.write_text('{"input": "a", "output": "b"}\n' * 3, encoding="utf-8")
    for args in (("generate", "--checkpoint", run_dir, "--prompt", "the"),
                 ("fewshot", "--checkpoint", run_dir, "--task", task, "--shots", "0")):
        result = invoke(*args)
        assert result.exit_code == 1 and "not a plain file name" in result.output, result.output
        assert "TOP SECRET" not in result.output
    assert str(tmp_path / "secret.txt") not in opened


# ----------------------------------------------------------------------------- resuming a best.npz


def _best_weights_run(tmp_path, metrics, best):
    """A run directory holding only what finetune_runs.resumed_best reads, and its arguments."""
    from types import SimpleNamespace

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    if best is not None:
        atomic_save_npz(str(tmp_path / "best.npz"), best)
    trainable = {"head": {"w": onp.zeros((3, 2), "float32")}}
    return str(tmp_path), SimpleNamespace(iter=4, meta={"weights_iter": 4}), trainable


GOOD_METRICS = [{"iter": 0, "val_loss": 0.9}, {"iter": 2, "val_loss": 0.5},
                {"iter": 4, "val_loss": 0.7}]


def test_resumed_best_weights_load_when_the_files_are_right(tmp_path):
    from tinyllm.finetune_runs import resumed_best

    w = onp.ones((3, 2), "float32")
    best = resumed_best(*_best_weights_run(tmp_path, GOOD_METRICS,
                                           {"_iter": onp.int64(2), "head.w": w}))
    assert (best.iteration, best.val_loss, best.evals_since) == (2, 0.5, 1)
    onp.testing.assert_array_equal(best.params["head"]["w"], w)


@pytest.mark.parametrize("metrics, best, words", [
    (GOOD_METRICS, {"_iter": onp.int64(2), "head.w": onp.ones((5, 2), "float32")},
     "wrong shapes"),
    (GOOD_METRICS, {"_iter": onp.int64(2), "head.w": onp.ones((3, 2), "float64")}, "float64"),
    (GOOD_METRICS, {"_iter": onp.array([2, 2]), "head.w": onp.ones((3, 2), "float32")},
     "does not hold the weights of the best evaluation"),
    (GOOD_METRICS, {"_iter": onp.int64(2), "other": onp.ones((3, 2), "float32")}, "missing"),
    (GOOD_METRICS, None, "does not hold the weights of the best evaluation"),
])
def test_a_resumed_runs_best_weights_must_match_the_run(tmp_path, metrics, best, words):
    from tinyllm.finetune_runs import resumed_best

    with pytest.raises(TinyLLMError, match=words):
        resumed_best(*_best_weights_run(tmp_path, metrics, best))


def test_validation_losses_that_are_not_numbers_are_passed_over(tmp_path):
    from tinyllm.finetune_runs import resumed_best

    metrics = GOOD_METRICS + [{"iter": 1, "val_loss": "x"}, {"iter": 3, "val_loss": True},
                              {"iter": 5, "val_loss": [0.1]}]
    weights = {"_iter": onp.int64(2), "head.w": onp.ones((3, 2), "float32")}
    best = resumed_best(*_best_weights_run(tmp_path, metrics, weights))
    assert (best.iteration, best.val_loss) == (2, 0.5)


# ----------------------------------------------------------------------------- what commands read


@pytest.mark.parametrize("file, change", [
    ("tokenizer", lambda t: t["chars"].__setitem__(0, "\ud800")),
    ("tokenizer", lambda t: t["special_tokens"].update(
        {"\udc80": t["special_tokens"].pop("<|endoftext|>")})),
    ("config", lambda m: m.update(labels=["\ud800", "pos"])),
])
def test_lone_surrogates_are_refused(run_dir, opened, file, change):
    """JSON can spell half a surrogate pair, which no UTF-8 text holds: such a token or label
    loaded, then crashed `generate` printing it and every run saving it (UnicodeEncodeError)."""
    path = str(run_dir / "config.json") if file == "config" else checkpoint_paths(str(run_dir))[file]
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    change(data)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)  # ensure_ascii: written as the escape \\ud800
    assert "lone surrogate" in load_error(run_dir, opened)


@pytest.mark.parametrize("version", [0, -1])
def test_a_tokenizer_version_before_the_first_is_refused(run_dir, opened, version):
    path = checkpoint_paths(str(run_dir))["tokenizer"]
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({**data, "version": version}, f)
    assert "format version" in load_error(run_dir, opened)


@pytest.mark.parametrize("kind, token", [("seq2seq", "<pad>"), ("seq2seq", "<eos>"),
                                         ("mlm", "<|mask|>")])
def test_a_tokenizer_without_the_special_tokens_of_its_kind_is_refused(tmp_path, opened, kind,
                                                                       token):
    """seq2seq translate, attention and --resume looked <pad> up and died with a KeyError."""
    special_tokens = [t for t in ["<|endoftext|>", *KIND_SPECIAL_TOKENS[kind]] if t != token]
    run = make_run(tmp_path / kind, CharTokenizer.train(TEXT, special_tokens), kind=kind)
    assert token in load_error(run, opened, with_optimizer=False)


@pytest.mark.parametrize("labels", [None, ["neg"], ["neg", "pos", "other"]])
def test_a_classifiers_labels_must_name_its_classes(tmp_path, opened, labels):
    """--resume read "labels" as they were: a KeyError without them, and with three labels for
    two classes it trained on and saved a run that `tinyllm classify` then refused."""
    run = make_run(tmp_path / "classifier", kind="classifier")
    edit_config(run, labels=labels)
    assert "'labels'" in load_error(run, opened)


@pytest.mark.parametrize("kind, field", [("gpt", "train"), ("classifier", "before"),
                                         ("seq2seq", "label_smoothing"), ("seq2seq", "schedule")])
def test_a_field_resume_reads_back_must_be_there(tmp_path, opened, kind, field):
    """Each was read as meta[field] by --resume: a KeyError (or, for "train", a TypeError)."""
    run = make_run(tmp_path / kind, kind=kind)
    meta = json.loads((run / "config.json").read_text(encoding="utf-8"))
    del meta[field]
    (run / "config.json").write_text(json.dumps(meta), encoding="utf-8")
    load_checkpoint(str(run), kind=None)  # using the model needs none of them
    assert f"lacks the field {field!r}" in load_error(run, opened)


@pytest.mark.parametrize("task, before", [("classify", {"test": "0.5"}),
                                          ("classify", {"test": 2.0}),
                                          ("instruct", {"exact_match": 0.5}),
                                          ("instruct", {"exact_match": True, "token_f1": 0.5})])
def test_the_base_models_scores_must_be_fractions(run_dir, opened, task, before):
    """--resume prints them again: a string stopped it with a ValueError, a missing score with
    a KeyError."""
    edit_config(run_dir, finetune={"task": task}, before=before)
    assert "'before'" in load_error(run_dir, opened, with_optimizer=False)


@pytest.mark.parametrize("field, value", [("text_column", 5), ("label_column", [1]),
                                          ("data", ["a"]), ("checkpoint", 5), ("balance", "yes"),
                                          ("batch_size", 10**30)])
def test_stored_fine_tuning_settings_of_the_wrong_type_are_named(field, value):
    """A number for a column name stopped `classify --split` and --resume with AttributeError."""
    from tinyllm.classify_run import ClassifySettings
    from tinyllm.finetune_runs import run_settings

    with pytest.raises(TinyLLMError, match=f"field {field!r}"):
        run_settings({"finetune": {"task": "classify", field: value}}, ClassifySettings,
                     "--resume")


def test_resuming_an_instruction_run_whose_tokenizer_lost_its_end_token(tmp_path, opened):
    """Fine-tuning ends each response with <|endoftext|>: --resume died with a KeyError."""
    from tinyllm.finetune_runs import data_fingerprints, stored_settings
    from tinyllm.instruct_run import InstructSettings

    data = tmp_path / "instruct.jsonl"
    data.write_text("".join(json.dumps({"instruction": "say", "input": w, "output": w}) + "\n"
                            for w in TEXT.split()), encoding="utf-8")
    settings = InstructSettings(data=str(data))
    run = make_run(tmp_path / "run", CharTokenizer.train(TEXT + "ISRpun:", ["<|other|>"]), extra={
        "finetune": {"task": "instruct", **stored_settings(settings)},
        "data_files_sha256": data_fingerprints(settings),
        "before": {"exact_match": 0.0, "token_f1": 0.0}})
    result = invoke("finetune", "instruct", "--out", run, "--resume")
    assert result.exit_code == 1 and "no <|endoftext|> token" in result.output, result.output


@pytest.mark.skipif(not os.path.exists("/proc/self/pagemap"), reason="needs Linux's /proc")
def test_a_stored_data_path_is_hashed_only_as_far_as_its_size_says(tmp_path, monkeypatch):
    """/proc/self/pagemap says it holds 0 bytes and reads hundreds of gigabytes: a run that
    names it as its data made `classify --split` hash for a quarter of an hour."""
    from tinyllm import finetune_runs
    from tinyllm.classify_run import ClassifySettings

    data = tmp_path / "labelled.csv"
    data.write_text("text,label\n" + "a,b\n" * 100, encoding="utf-8")
    opened = finetune_runs.open_regular  # first a file that says it is 10 bytes: no hang if not
    monkeypatch.setattr(finetune_runs, "open_regular", lambda *a: (opened(*a)[0], 10))
    assert finetune_runs.data_fingerprints(ClassifySettings(data=str(data))) == {
        "data": hashlib.sha256(b"text,label").hexdigest()}
    monkeypatch.setattr(finetune_runs, "open_regular", opened)
    empty = hashlib.sha256(b"").hexdigest()
    assert finetune_runs.data_fingerprints(
        ClassifySettings(data="/proc/self/pagemap")) == {"data": empty}
    monkeypatch.setattr(finetune_runs, "MAX_TEXT_BYTES", 100)
    with pytest.raises(TinyLLMError, match="too large"):
        finetune_runs.data_fingerprints(ClassifySettings(data=str(data)))


def test_weights_that_overflow_stop_generate_with_one_line(run_dir):
    """Every weight finite, yet 3e38 overflows float32 in the forward pass: sampling from NaN
    probabilities raised numpy's ValueError."""
    rewrite_npz(checkpoint_paths(str(run_dir))["model"],
                lambda a: a.__setitem__("wte", onp.full_like(a["wte"], 3e38)))
    result = invoke("generate", "--checkpoint", run_dir, "--prompt", "the", "--seed", 0,
                    "--max-new-tokens", 2)
    assert result.exit_code == 1 and "not finite numbers" in result.output, result.output


@pytest.mark.parametrize("kind, command", [
    ("classifier", ["classify", "the cat"]),
    ("mlm", ["fill", "a [MASK]"]),
    ("mlm", ["embed", "--data", "LINES", "--query", "the cat"]),
    ("gpt", ["embed", "--data", "LINES", "--query", "the cat"]),
])
def test_weights_that_overflow_stop_every_reading_command_with_one_line(tmp_path, kind, command):
    """The same overflow as for generate: classify printed "nan" probabilities, fill ranked NaN
    tokens and embed printed NaN similarities, each exit code 0."""
    run = make_run(tmp_path / kind, kind=kind)
    rewrite_npz(checkpoint_paths(str(run))["model"],
                lambda a: a.__setitem__("wte", onp.full_like(a["wte"], 3e38)))
    lines = tmp_path / "lines.txt"
    lines.write_text("the cat\na dog\n", encoding="utf-8")
    result = invoke(*[str(lines) if part == "LINES" else part for part in command],
                    "--checkpoint", run)
    assert result.exit_code == 1 and "not finite numbers" in result.output, result.output
    assert "Traceback" not in result.output
