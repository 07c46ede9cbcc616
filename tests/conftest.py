"""Shared test fixtures: one tiny GPT config and parameter builders, so the suite stays fast.

Fixtures that Hypothesis tests use are session-scoped and immutable (a frozen config, a pure
builder function): Hypothesis reuses a fixture across its examples, so it must not carry state.
"""

import signal

import numpy as onp
import pytest
from hypothesis import settings


from tinyllm import ops, system
from tinyllm.checkpoint import save_checkpoint
from tinyllm.config import GPTConfig, TrainConfig
from tinyllm.models import init_gpt
from tinyllm.optim import adamw_init
from tinyllm.tokenizers import CharTokenizer
from tinyllm.pretrain import SPECIAL_TOKENS

# No per-example deadline for any Hypothesis test: a busy machine (CI shares its cores) can make
# one example slow, and a deadline would then fail a test whose maths is right.
settings.register_profile("tinyllm", deadline=None)
settings.load_profile("tinyllm")

# Small enough that a forward pass takes well under a millisecond, big enough to have
# more than one layer and more than one head (head size D = 16 / 2 = 8). With biases, unlike the
# default, so that every gradient test covers them too.
TINY = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, bias=True)


@pytest.fixture(scope="session")
def tiny_config():
    """A tiny GPTConfig: vocab 11, block 8, 2 layers, 2 heads, 16 channels, no dropout."""
    return TINY


@pytest.fixture(scope="session")
def make_params():
    """Builder for fresh GPT parameters: make_params(config, dtype="float32", seed=0) -> dict."""

    def build(config=TINY, dtype="float32", seed=0):
        return init_gpt(config, onp.random.default_rng(seed), dtype=dtype)

    return build


@pytest.fixture(scope="session")
def save_char_base():
    """Builder: save_char_base(out, alphabet, config) writes a tiny 'pretrained' run to `out`
    (random weights of `config`, a char tokenizer of `alphabet` with <|endoftext|>, the vocabulary
    size set from it) and returns `out`: the base the fine-tuning tests start from."""

    def save(out, alphabet, config):
        tokenizer = CharTokenizer.train(alphabet, special_tokens=SPECIAL_TOKENS)
        config = GPTConfig(**{**config.__dict__, "vocab_size": tokenizer.vocab_size})
        rng = onp.random.default_rng(0)
        params = init_gpt(config, rng)
        save_checkpoint(out, params, adamw_init(params), rng.bit_generator.state, config,
                        TrainConfig(), tokenizer, 0)
        return out

    return save


@pytest.fixture
def params32(make_params):
    """Fresh float32 parameters for the tiny config."""
    return make_params(dtype="float32")


@pytest.fixture
def params64(make_params):
    """Fresh float64 parameters for the tiny config (for finite differences and tight tolerances)."""
    return make_params(dtype="float64")


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_raises():
    """Ctrl-C raises KeyboardInterrupt in the tests, as in any Python started from a terminal,
    even when the suite itself was started with SIGINT ignored (under nohup, or as a background
    job of a script): the tests that press Ctrl-C need it, and tinyllm leaves an ignored signal
    ignored (an MPI rank's way of leaving Ctrl-C to rank 0)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


@pytest.fixture(autouse=True)
def signal_handlers_put_back():
    """An interrupted CLI run ignores further Ctrl-C and SIGTERM on its way out (see
    tinyllm/cli_common.py); in the test process the handlers are put back after each test."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.fixture
def blas_calls(monkeypatch):
    """A stand-in for OpenBLAS's thread count (one setting for the process, 2 to start with):
    records each call to its setter, so a test can see what `run_both` or a fine-tuning run ran
    with. Two cores are allowed even when the suite itself runs under OPENBLAS_NUM_THREADS=1
    (read at import)."""
    count, calls = [2], []
    monkeypatch.setattr(ops, "ONE_CORE", False)

    def set_(n):
        calls.append(n)
        count[0] = n

    monkeypatch.setattr(system, "blas_threads", lambda: (lambda: count[0], set_))
    return calls, count
