"""Tests for tinyllm/checkpoint.py and tinyllm/fileio.py: round trips, plain .npz files, errors."""

import io
import json
import os
import shutil
import struct
import zlib

import numpy as onp
import pytest

from tinyllm import fileio
from tinyllm.checkpoint import FORMAT_VERSION, load_checkpoint, remove_leftovers, save_checkpoint
from tinyllm.config import GPTConfig, TrainConfig
from tinyllm.errors import TinyLLMError
from tinyllm.fileio import atomic_save_npz
from tinyllm.models import gpt_forward, init_gpt
from tinyllm.optim import adamw_init, adamw_step
from tinyllm.tokenizers import CharTokenizer
from tinyllm.tree import flatten, tree_map

TEXT = "the quick brown fox jumps over the lazy dog\n"
TRAIN = TrainConfig(batch_size=4, max_iters=10, eval_interval=5, eval_iters=1, seed=3)


def build_run(iteration=5, seed=0):
    """A small model after two AdamW steps, a used Generator and a tokenizer: what a run holds."""
    tokenizer = CharTokenizer.train(TEXT, special_tokens=["<|endoftext|>"])
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2,
                       n_embd=16)
    rng = onp.random.default_rng(seed)
    params = init_gpt(config, rng)
    state = adamw_init(params)
    for _ in range(2):  # non-zero moments, step 2
        grads = tree_map(lambda p: rng.standard_normal(p.shape).astype(p.dtype), params)
        params, state = adamw_step(params, grads, state, 1e-2)
    return dict(params=params, opt_state=state, rng_state=rng.bit_generator.state,
                model_config=config, train_config=TRAIN, tokenizer=tokenizer, iteration=iteration)


def save(run_dir, run, extra=None):
    return save_checkpoint(str(run_dir), run["params"], run["opt_state"], run["rng_state"],
                           run["model_config"], run["train_config"], run["tokenizer"],
                           run["iteration"], extra=extra)


@pytest.fixture
def saved(tmp_path):
    """(run directory, the run saved in it)."""
    run = build_run()
    save(tmp_path / "run", run, extra={"data": "x.txt", "last_eval_iter": 5})
    return tmp_path / "run", run


def file_of(run_dir, role):
    """The path of the checkpoint's "model" or "optim" file, as config.json names it."""
    meta = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    return run_dir / meta[f"{role}_file"]


def assert_trees_equal(a, b):
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        assert fa[key].dtype == fb[key].dtype, key
        onp.testing.assert_array_equal(fa[key], fb[key], err_msg=key)


def test_round_trip_gives_identical_params_logits_optimizer_and_rng(saved):
    run_dir, run = saved
    ckpt = load_checkpoint(str(run_dir), with_optimizer=True)
    assert_trees_equal(ckpt.params, run["params"])
    ids = onp.array([[0, 3, 5, 7, 1, 2, 9, 4]], dtype=onp.int32)
    onp.testing.assert_array_equal(gpt_forward(ckpt.params, ids, ckpt.model_config),
                                   gpt_forward(run["params"], ids, run["model_config"]))
    assert_trees_equal(ckpt.opt_state["m"], run["opt_state"]["m"])
    assert_trees_equal(ckpt.opt_state["v"], run["opt_state"]["v"])
    assert ckpt.opt_state["step"] == 2
    assert ckpt.rng_state == run["rng_state"]
    restored, original = onp.random.default_rng(), onp.random.default_rng()
    restored.bit_generator.state, original.bit_generator.state = ckpt.rng_state, run["rng_state"]
    onp.testing.assert_array_equal(restored.random(5), original.random(5))
    assert ckpt.model_config == run["model_config"] and ckpt.train_config == TRAIN
    assert ckpt.iter == 5 and ckpt.meta["data"] == "x.txt" and ckpt.meta["last_eval_iter"] == 5
    assert ckpt.tokenizer.encode("lazy fox") == run["tokenizer"].encode("lazy fox")


def test_loading_for_inference_skips_the_optimizer(saved):
    ckpt = load_checkpoint(str(saved[0]))
    assert ckpt.opt_state is None and ckpt.rng_state is None


def test_files_are_plain_npz_and_readable_json(saved):
    run_dir, run = saved
    assert sorted(os.listdir(run_dir)) == ["config.json", "model-000005.npz", "optim-000005.npz",
                                           "tokenizer.json"]
    with onp.load(run_dir / "model-000005.npz", allow_pickle=False) as model:
        assert int(model["_iter"]) == 5
        onp.testing.assert_array_equal(model["h.0.attn.c_attn.w"],
                                       run["params"]["h"][0]["attn"]["c_attn"]["w"])
        assert set(model.files) == set(flatten(run["params"])) | {"_iter"}
    with onp.load(run_dir / "optim-000005.npz", allow_pickle=False) as optim:
        assert int(optim["step"]) == 2 and int(optim["_iter"]) == 5
        assert "m.wte" in optim.files and "v.wte" in optim.files
        assert json.loads(optim["rng_state"].tobytes().decode("utf-8")) == run["rng_state"]
    meta = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    assert meta["format"] == "tinyllm-checkpoint" and meta["version"] == FORMAT_VERSION
    assert meta["iter"] == 5 and meta["model"]["n_embd"] == 16 and meta["dtype"] == "float32"
    assert (meta["model_file"], meta["optim_file"], meta["tokenizer_file"]) == (
        "model-000005.npz", "optim-000005.npz", "tokenizer.json")


def test_saves_are_atomic_and_leave_no_temp_files(saved):
    run_dir, run = saved
    save(run_dir, {**run, "iteration": 6})  # the next checkpoint replaces the previous one
    assert sorted(os.listdir(run_dir)) == ["config.json", "model-000006.npz", "optim-000006.npz",
                                           "tokenizer.json"]
    assert load_checkpoint(str(run_dir), with_optimizer=True).iter == 6


def test_saving_the_same_step_again_never_overwrites_the_files_in_use(saved):
    run_dir, run = saved
    first = file_of(run_dir, "model")
    save(run_dir, run)
    second = file_of(run_dir, "model")
    assert second != first and second.name == "model-000005-2.npz" and not first.exists()
    save(run_dir, run)
    assert file_of(run_dir, "model") == first
    assert load_checkpoint(str(run_dir), with_optimizer=True).iter == 5


def test_an_interrupted_write_keeps_the_old_file(saved, monkeypatch):
    run_dir, _ = saved
    path = file_of(run_dir, "model")
    before = path.read_bytes()

    def interrupted_replace(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(fileio.os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        atomic_save_npz(str(path), {"x": onp.zeros(3)})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert not [n for n in os.listdir(run_dir) if n.startswith(".tmp-")]


# ----------------------------------------------------------------------------- errors


def load_error(run_dir, with_optimizer=True):
    """The one-line message of the TinyLLMError that loading `run_dir` raises."""
    with pytest.raises(TinyLLMError) as err:
        load_checkpoint(str(run_dir), with_optimizer=with_optimizer)
    message = str(err.value)
    assert "\n" not in message
    return message


def edit_config(run_dir, **changes):
    path = run_dir / "config.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    meta.update(changes)
    path.write_text(json.dumps(meta), encoding="utf-8")


def test_missing_directory(tmp_path):
    message = load_error(tmp_path / "nowhere")
    assert "nowhere" in message and "not found" in message


def test_directory_without_config_json(tmp_path):
    message = load_error(tmp_path)
    assert "no config.json" in message and str(tmp_path) in message


def test_corrupted_config_json(saved):
    run_dir, _ = saved
    path = run_dir / "config.json"
    path.write_bytes(path.read_bytes()[:40])
    message = load_error(run_dir)
    assert "config.json" in message and "corrupted" in message


def test_config_json_of_something_else(saved):
    run_dir, _ = saved
    (run_dir / "config.json").write_text('{"n_embd": 16}', encoding="utf-8")
    assert "not a tinyllm checkpoint" in load_error(run_dir)


def test_newer_format_version_is_refused(saved):
    run_dir, _ = saved
    edit_config(run_dir, version=FORMAT_VERSION + 1)
    message = load_error(run_dir)
    assert f"version {FORMAT_VERSION + 1}" in message and "upgrade tinyllm" in message


@pytest.mark.parametrize("role", ["model", "optim"])
def test_truncated_npz(saved, role):
    run_dir, _ = saved
    path = file_of(run_dir, role)
    name = path.name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    message = load_error(run_dir)
    assert name in message and "truncated or corrupted" in message


def npz_listing(member, local_name, names):
    """The bytes of a zip holding the stored `member` once (under `local_name`) that its central
    directory lists once for each of `names`, every entry pointing at that one copy."""
    crc = zlib.crc32(member)
    local = (struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, crc, len(member),
                         len(member), len(local_name), 0) + local_name.encode() + member)
    directory = b"".join(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0, crc,
                                     len(member), len(member), len(name), 0, 0, 0, 0, 0, 0)
                         + name.encode() for name in names)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(names), len(names), len(directory),
                      len(local), 0)
    return local + directory + end


def npy_bytes(array):
    buffer = io.BytesIO()
    onp.save(buffer, array)
    return buffer.getvalue()


def test_an_npz_listing_one_member_many_times_is_refused_before_loading(saved, monkeypatch):
    """numpy would read the member once per listing: 5 MB of file, 80 GB of reading."""
    run_dir, _ = saved
    path = file_of(run_dir, "model")
    path.write_bytes(npz_listing(npy_bytes(onp.zeros(4096, onp.float32)), "wte.npy",
                                 ["wte.npy"] * 2000))
    monkeypatch.setattr(onp, "load", None)  # refused before numpy reads any member
    message = load_error(run_dir)
    assert path.name in message and "'wte.npy' more than once" in message


def test_an_npz_whose_members_overlap_is_refused_before_loading(saved, monkeypatch):
    """Distinct names for one stored copy: together they claim more bytes than the file has."""
    run_dir, _ = saved
    path = file_of(run_dir, "model")
    path.write_bytes(npz_listing(npy_bytes(onp.zeros(4096, onp.float32)), "a0.npy",
                                 [f"a{i}.npy" for i in range(50)]))
    monkeypatch.setattr(onp, "load", None)
    message = load_error(run_dir)
    assert path.name in message and "directory claims more bytes than the file has" in message


@pytest.mark.parametrize("role", ["model", "optim"])
def test_missing_npz(saved, role):
    run_dir, _ = saved
    name = file_of(run_dir, role).name
    (run_dir / name).unlink()
    message = load_error(run_dir)
    assert name in message and "missing" in message


@pytest.mark.parametrize("role", ["model", "optim"])
def test_iter_stamp_disagreeing_with_config_json(tmp_path, saved, role):
    """A file from another step than config.json says (copied in by hand, say)."""
    run_dir, run = saved
    save(tmp_path / "older", {**run, "iteration": 4})
    name = file_of(run_dir, role).name
    shutil.copy(file_of(tmp_path / "older", role), run_dir / name)
    message = load_error(run_dir)
    assert name in message and "step 4" in message and "says 5" in message


@pytest.mark.parametrize("stamp", [onp.array(5.0), onp.array([5]), None])
def test_a_step_stamp_that_is_no_whole_number_is_said_so(saved, stamp):
    """A float 5.0 was reported as 'from step 5 but config.json says 5'."""
    run_dir, _ = saved
    path = file_of(run_dir, "model")
    arrays = dict(onp.load(path))
    del arrays["_iter"]
    atomic_save_npz(str(path), arrays if stamp is None else {**arrays, "_iter": stamp})
    message = load_error(run_dir)
    assert path.name in message and "not a whole number" in message and "says 5" not in message


def test_params_of_the_wrong_shape(saved):
    run_dir, run = saved
    flat = flatten(run["params"])
    flat["wpe"] = onp.zeros((8, 16), "float32")  # block_size 16 in config.json
    atomic_save_npz(str(file_of(run_dir, "model")), {**flat, "_iter": onp.array(5)})
    message = load_error(run_dir)
    assert "model-000005.npz" in message and "wpe" in message


def test_missing_param(saved):
    run_dir, run = saved
    flat = {k: a for k, a in flatten(run["params"]).items() if k != "ln_f.g"}
    atomic_save_npz(str(file_of(run_dir, "model")), {**flat, "_iter": onp.array(5)})
    message = load_error(run_dir)
    assert "model-000005.npz" in message and "ln_f.g" in message


def test_config_json_describing_another_model(saved):
    run_dir, run = saved
    edit_config(run_dir, model={**json.loads((run_dir / "config.json").read_text())["model"],
                                "n_embd": 32, "n_head": 2})
    message = load_error(run_dir, with_optimizer=False)
    assert "model-000005.npz" in message and "wrong shapes" in message


def test_config_json_with_an_unknown_model_field(saved):
    run_dir, _ = saved
    meta = json.loads((run_dir / "config.json").read_text())
    edit_config(run_dir, model={**meta["model"], "n_experts": 8})
    message = load_error(run_dir)
    assert "n_experts" in message and "config.json" in message


def test_every_model_kind_loads_with_only_the_checkpoint_module_imported(tmp_path):
    # The table of model kinds is written out in checkpoint.py, not filled in as a side effect
    # of importing the modules that define the families, so a fresh interpreter that imports
    # tinyllm.checkpoint alone loads a seq2seq run.
    import subprocess
    import sys

    from tinyllm.seq2seq import Seq2SeqConfig, init_seq2seq

    tokenizer = CharTokenizer.train("abc", special_tokens=["<pad>", "<bos>", "<eos>"])
    config = Seq2SeqConfig(vocab_size=tokenizer.vocab_size, block_size=8, n_layer=1, n_head=2,
                           n_embd=8)
    params = init_seq2seq(config, onp.random.default_rng(0))
    save_checkpoint(str(tmp_path), params, adamw_init(params), {}, config, TRAIN, tokenizer, 0,
                    kind="seq2seq")
    code = ("import sys; from tinyllm.checkpoint import load_checkpoint;"
            f" print(load_checkpoint({str(tmp_path)!r}, kind='seq2seq').model_config.n_embd);"
            " print(sorted(m for m in sys.modules if m.startswith('tinyllm.cli')))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         check=True).stdout.split("\n")
    assert out[:2] == ["8", "[]"]


def as_version_1(run_dir):
    """Turn a saved run into the layout tinyllm wrote before format version 2."""
    meta = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    os.replace(run_dir / meta.pop("model_file"), run_dir / "model.npz")
    os.replace(run_dir / meta.pop("optim_file"), run_dir / "optim.npz")
    meta["version"] = 1
    (run_dir / "config.json").write_text(json.dumps(meta), encoding="utf-8")


def test_a_version_1_run_loads_and_its_next_save_is_version_2(saved):
    run_dir, run = saved
    as_version_1(run_dir)
    ckpt = load_checkpoint(str(run_dir), with_optimizer=True)
    assert_trees_equal(ckpt.params, run["params"]) and ckpt.iter == 5
    save(run_dir, {**run, "iteration": 6})
    assert sorted(os.listdir(run_dir)) == ["config.json", "model-000006.npz", "optim-000006.npz",
                                           "tokenizer.json"]
    assert json.loads((run_dir / "config.json").read_text())["version"] == FORMAT_VERSION == 2


def test_leftovers_are_removed_but_never_a_file_tinyllm_does_not_own(saved):
    run_dir, run = saved
    for name in (".tmp-k2x9_a0q-model-000009.npz", ".tmp-k2x9_a0q", "model-000004.npz",
                 "optim-000004-2.npz", "notes.txt", "model.npz.bak", ".tmp-notes",
                 ".tmp-k2x9_a0q-notes.txt"):
        (run_dir / name).write_bytes(b"x")
    remove_leftovers(str(run_dir))
    assert sorted(os.listdir(run_dir)) == [".tmp-k2x9_a0q-notes.txt", ".tmp-notes", "config.json",
                                           "model-000005.npz", "model.npz.bak", "notes.txt",
                                           "optim-000005.npz", "tokenizer.json"]


def test_nothing_is_removed_from_a_directory_without_config_json(tmp_path):
    """It may be the user's: only rundir.start_out_dir decides what a new run clears there."""
    for name in ("model-000001.npz", "optim-999999.npz", ".tmp-k2x9_a0q-config.json"):
        (tmp_path / name).write_bytes(b"mine")
    remove_leftovers(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [".tmp-k2x9_a0q-config.json", "model-000001.npz",
                                            "optim-999999.npz"]


def test_leftovers_stay_when_config_json_cannot_be_read(saved):
    run_dir, _ = saved
    (run_dir / "config.json").write_text("{broken", encoding="utf-8")
    (run_dir / "model-000001.npz").write_bytes(b"x")
    remove_leftovers(str(run_dir))
    assert "model-000005.npz" in os.listdir(run_dir) and "model-000001.npz" in os.listdir(run_dir)
