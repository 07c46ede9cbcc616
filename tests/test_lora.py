"""Tests for tinyllm/lora.py: fresh adapters change nothing, only adapters train, merging."""

import numpy as onp
import pytest

from tinyllm.config import TrainConfig
from tinyllm.errors import TinyLLMError
from tinyllm.finetune import (ClassifierConfig, classifier_logits, init_classifier, merge_params,
                              pad_batch, split_params)
from tinyllm.lora import apply_lora, count_lora, init_lora, merge_lora
from tinyllm.models import gpt_forward, gpt_loss
from tinyllm.optim import adamw_init
from tinyllm.train import flat_value_and_grad, train_step
from tinyllm.tree import flatten


def test_fresh_adapters_leave_the_output_unchanged(tiny_config, params32):
    ids = onp.array([[1, 2, 3, 4]], dtype=onp.int32)
    adapted = {**params32, "lora": init_lora(params32, 2, onp.random.default_rng(1))}
    before = gpt_forward(params32, ids, tiny_config)
    after = gpt_forward(merge_lora(adapted, 4.0, 2), ids, tiny_config)
    assert onp.array_equal(before, after)
    assert count_lora(adapted) == 2 * 2 * sum(a + b for a, b in
                                              ((16, 48), (16, 16), (16, 64), (64, 16)))


def test_a_rank_above_the_models_width_is_refused(params32):
    init_lora(params32, 16, onp.random.default_rng(1))  # the width itself: pointless but valid
    with pytest.raises(TinyLLMError, match=r"--lora-rank 17 is more than the model's width \(16\)"):
        init_lora(params32, 17, onp.random.default_rng(1))


def test_only_adapters_change_during_training(tiny_config, params32):
    params = {**params32, "lora": init_lora(params32, 2, onp.random.default_rng(1))}
    paths = [p for p in flatten(params) if p.startswith("lora.")]
    trainable, frozen = split_params(params, paths)
    ids = onp.random.default_rng(0).integers(0, 11, size=(4, 8)).astype(onp.int32)

    def loss_fn(t, batch, rng):
        return gpt_loss(apply_lora(merge_params(t, frozen), 2.0), batch[0], batch[1], tiny_config)

    value_and_grad, opt = flat_value_and_grad(loss_fn), adamw_init(trainable)
    tc = TrainConfig()
    first = None
    for _ in range(5):
        trainable, opt, loss, _ = train_step(value_and_grad, trainable, opt, (ids[:, :-1], ids[:, 1:]),
                                             1e-2, tc, None)
        first = first if first is not None else loss
    assert loss < first  # the adapters learned something
    new = merge_params(trainable, frozen)
    assert all(onp.array_equal(flatten(new)[p], v) for p, v in flatten(params).items()
               if not p.startswith("lora."))
    assert any(not onp.array_equal(flatten(new)[p], v) for p, v in flatten(params).items()
               if p.startswith("lora."))


def test_merge_equals_adapted_forward():
    config = ClassifierConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16,
                              lora_rank=2, lora_alpha=4.0)
    params = init_classifier(config, onp.random.default_rng(0))
    rng = onp.random.default_rng(1)
    for block in params["lora"]["h"]:  # make the adapters non-zero, as after training
        for module in block.values():
            for ad in module.values():
                ad["b"] = rng.standard_normal(ad["b"].shape).astype(onp.float32)
    ids, valid = pad_batch([[1, 2, 3]], 3)
    adapted = classifier_logits(params, ids, valid, config)
    merged_config = ClassifierConfig(**{**config.__dict__, "lora_rank": 0})
    merged = classifier_logits(merge_lora(params, 4.0, 2), ids, valid, merged_config)
    assert onp.allclose(adapted, merged, atol=1e-5)
    plain = classifier_logits({k: v for k, v in params.items() if k != "lora"}, ids, valid,
                              merged_config)
    assert not onp.allclose(adapted, plain, atol=1e-4)  # the adapters do change the output


def test_merged_gpt_folds_a_lora_model_into_a_plain_gpt(tiny_config, params32):
    """What every command that runs a LoRA run's GPT loads: adapters merged, LoRA fields gone."""
    from tinyllm.config import GPTConfig
    from tinyllm.lora import LoRAGPTConfig, merged_gpt

    assert merged_gpt(params32, tiny_config) == (params32, tiny_config)  # a plain GPT: as it is
    config = LoRAGPTConfig(**tiny_config.__dict__, lora_rank=2, lora_alpha=4.0)
    adapted = {**params32, "lora": init_lora(params32, 2, onp.random.default_rng(1))}
    params, plain = merged_gpt(adapted, config)
    assert type(plain) is GPTConfig and plain == tiny_config and "lora" not in params
    onp.testing.assert_array_equal(params["h"][0]["mlp"]["c_fc"]["w"],
                                   merge_lora(adapted, 4.0, 2)["h"][0]["mlp"]["c_fc"]["w"])
