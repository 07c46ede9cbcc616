"""Tests for gradient accumulation (--grad-accum): K micro-batches of B give the gradients of one
batch of K*B, the flat buffer packs and unpacks exactly, the seed layout draws micro-batch 0 from
the run's own stream, and --grad-accum 1 is the run it always was."""

from dataclasses import replace

import numpy as onp
import pytest

from tinyllm import distributed, fast, train
from tinyllm.config import GPTConfig, TrainConfig
from tinyllm.distributed import SINGLE_PROCESS, micro_batch_rng, pack, unpack, weights_digest
from tinyllm.errors import TinyLLMError
from tinyllm.models import gpt_loss, init_gpt
from tinyllm.optim import adamw_init
from tinyllm.pretrain import pretrain
from tinyllm.train import accumulated_step, flat_value_and_grad, read_metrics
from tinyllm.tree import flatten

CONFIG = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
TEXT = ("Sphinx of black quartz, judge my vow. The five boxing wizards jump quickly.\n") * 20


def loss_fn(params, batch, rng):
    return gpt_loss(params, batch[0], batch[1], CONFIG, rng)


@pytest.fixture
def params():
    return init_gpt(CONFIG, onp.random.default_rng(0))


def batches(k, b, seed=1):
    """k micro-batches of b random sequences each: [(x, y), ...] of (b, T)."""
    rng = onp.random.default_rng(seed)
    ids = rng.integers(0, CONFIG.vocab_size, size=(k * b, CONFIG.block_size + 1)).astype(onp.int32)
    return [(ids[i * b:(i + 1) * b, :-1], ids[i * b:(i + 1) * b, 1:]) for i in range(k)]


@pytest.mark.parametrize("k", [2, 3])
def test_k_micro_batches_give_the_gradient_of_one_batch_k_times_larger(params, k):
    value_and_grad = flat_value_and_grad(loss_fn)
    micro = batches(k, 4)
    whole = tuple(onp.concatenate(parts) for parts in zip(*micro))  # (k*4, T)
    big_loss, big_grads = value_and_grad(params, whole, None)
    buffer = sum(pack(value_and_grad(params, batch, None)[1], 0.0, params) for batch in micro) / k
    grads, _ = unpack(buffer.astype(onp.float32), params)
    for key, grad in flatten(big_grads).items():
        onp.testing.assert_allclose(grads[key], grad, rtol=1e-4, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("path", ["autograd", "fast"])
def test_an_accumulated_step_equals_the_step_of_the_whole_batch(params, path):
    value_and_grad = (flat_value_and_grad(loss_fn) if path == "autograd"
                      else fast.gpt_value_and_grad(CONFIG))
    tc = TrainConfig(grad_clip=0.5, weight_decay=0.1)
    micro = batches(2, 4)
    whole = tuple(onp.concatenate(parts) for parts in zip(*micro))
    opt = adamw_init(params)
    p_acc, _, loss_acc, norm_acc = accumulated_step(
        value_and_grad, params, opt, ((b, None) for b in micro), 1e-2, tc, SINGLE_PROCESS)
    p_one, _, loss_one, norm_one = train.train_step(value_and_grad, params, opt, whole, 1e-2, tc,
                                                    None)
    assert loss_acc == pytest.approx(loss_one, rel=1e-5)
    assert norm_acc == pytest.approx(norm_one, rel=1e-4)
    for key, p in flatten(p_one).items():
        onp.testing.assert_allclose(flatten(p_acc)[key], p, rtol=1e-5, atol=1e-6, err_msg=key)


def test_pack_and_unpack_are_exact_inverses(params):
    backwards = dict(reversed(list(flatten(params).items())))  # a tree built in another order
    assert pack(backwards, 2.5, params).tobytes() == pack(params, 2.5, params).tobytes()
    buffer = pack(params, 2.5, params)
    assert buffer.dtype == onp.float32 and buffer.ndim == 1
    assert buffer.size == sum(p.size for p in flatten(params).values()) + 1
    back, loss = unpack(buffer, params)
    assert loss == 2.5
    for key, p in flatten(params).items():
        assert back[key].shape == p.shape and onp.array_equal(back[key], p), key


def test_micro_batch_zero_is_the_runs_own_stream_and_the_others_do_not_depend_on_it():
    run = onp.random.default_rng(7)
    assert micro_batch_rng(run, 7, 3, 0) is run
    one = micro_batch_rng(run, 7, 3, 1).integers(1 << 30, size=4)
    run.integers(10, size=100)  # the run's stream moved on: micro-batch 1 does not care
    assert onp.array_equal(micro_batch_rng(run, 7, 3, 1).integers(1 << 30, size=4), one)
    others = [micro_batch_rng(run, 7, step, j).integers(1 << 30, size=4)
              for step, j in ((3, 2), (4, 1))]
    assert not any(onp.array_equal(one, other) for other in others)
    assert list(distributed.rank_micro_batches(1, 3)) == [3, 4, 5]


def test_the_weights_digest_sees_a_one_bit_change(params):
    changed = {**params, "wte": params["wte"].copy()}
    changed["wte"].view(onp.uint32)[0, 0] ^= 1
    assert weights_digest(params) == weights_digest(dict(params))
    assert weights_digest(changed) != weights_digest(params)


# ----------------------------------------------------------------------------- whole runs


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


TINY_RUN = TrainConfig(batch_size=4, max_iters=4, eval_interval=2, eval_iters=2, lr=1e-2,
                       min_lr=1e-3, warmup_iters=1, seed=3)
RUN_MODEL = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, dropout=0.1)


def run(out, data, tc):
    return pretrain(RUN_MODEL, tc, str(out), data=data, tokenizer_kind="char",
                          log=lambda message: None)


def curve(out):
    return [(r["iter"], r["train_loss"], r["val_loss"]) for r in read_metrics(str(out))]


def test_grad_accum_one_takes_the_old_step_and_two_the_accumulating_one(tmp_path, data,
                                                                        monkeypatch):
    # --grad-accum 1 (on one process) must be the run as it always was: the accumulating path,
    # the same maths through a flat buffer, is never called; --grad-accum 2 calls it each step.
    calls = []

    def counted(*args):
        calls.append(1)
        return real(*args)

    real = train.accumulated_step
    monkeypatch.setattr(train, "accumulated_step", counted)
    run(tmp_path / "k1", data, TINY_RUN)
    assert calls == []
    run(tmp_path / "k2", data, replace(TINY_RUN, grad_accum=2))
    assert len(calls) == TINY_RUN.max_iters
    assert curve(tmp_path / "k1") != curve(tmp_path / "k2")


def test_grad_accum_is_recorded_and_a_resumed_run_continues_bit_for_bit(tmp_path, data):
    whole = replace(TINY_RUN, grad_accum=2)
    run(tmp_path / "whole", data, whole)
    run(tmp_path / "half", data, replace(whole, max_iters=2))
    pretrain(RUN_MODEL, TINY_RUN, str(tmp_path / "half"), resume=True, max_iters=4,
                   log=lambda message: None)
    assert curve(tmp_path / "half") == curve(tmp_path / "whole")


def test_grad_accum_zero_is_refused():
    with pytest.raises(TinyLLMError, match="--grad-accum"):
        TrainConfig(grad_accum=0).validate()


def test_rank_r_draws_what_one_process_draws_as_micro_batch_r():
    # The seed layout behind `mpirun -n 2` == `--grad-accum 2`: rank 1's micro-batch of a step
    # is micro-batch 1 of the single process; rank 0's comes from the run's own stream.
    def sample(rng, it):  # a train_batch(rng, it): the same draw at any step
        return rng.integers(1 << 30, size=3)

    tc = TrainConfig(seed=9)
    one_process = [b for b, _ in train._micro_batches(sample, onp.random.default_rng(9),
                                                      replace(tc, grad_accum=2), 5, rank=0)]
    rank0 = [b for b, _ in train._micro_batches(sample, onp.random.default_rng(9), tc, 5, rank=0)]
    rank1 = [b for b, _ in train._micro_batches(sample, onp.random.default_rng(1), tc, 5, rank=1)]
    assert len(one_process) == 2 and len(rank0) == len(rank1) == 1
    assert onp.array_equal(one_process[0], rank0[0])
    assert onp.array_equal(one_process[1], rank1[0])
    next_step = [b for b, _ in train._micro_batches(sample, onp.random.default_rng(1), tc, 6, 1)]
    assert not onp.array_equal(next_step[0], rank1[0])
