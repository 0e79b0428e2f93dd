"""engine.py: the decode phases against the model's own forward, continuous batching against one sequence at a time,
the static cache against the dynamic one, conversation reuse against none, logprobs against log_softmax, errors."""

import time

import pytest
import torch

from config import ModelConfig
from engine import (STOP_IDS, ContextTooLong, DeadlineExceeded, Engine, KVCache, PrefixStore, QueueFull,
                    SamplingParams, Sequence, common_prefix, decode_one_step, generate, prefill, stream)
from model import GPT
from tokenizer import EOT_ID, N_VOCAB, decode

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model(rope=False, smear=False, block_size=64) -> GPT:
    """A 2-layer model whose output depends on its input: GPT-2's init scale makes a random model repeat one token."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, rope=rope, smear=smear))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2 and not name.startswith(("wte", "wpe")):
                    p.mul_(3)
            model.wte.weight[EOT_ID:N_VOCAB] = 0  # no special token first: replies do not end at once
            if smear:
                torch.nn.init.normal_(model.smear, std=1.0)
    return model.eval()


@pytest.fixture(params=[(False, False), (True, True)], ids=["learned-positions", "rope+smear"])
def model(request):
    return make_model(*request.param)


GREEDY = SamplingParams(max_tokens=12, temperature=0, stop_tokens=frozenset())
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [42], [100, 200, 300], [7, 7, 7, 7], list(range(500, 530)), [9, 8]]


def full_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float()


def test_prefill_and_decode_steps_give_the_models_logits(model):
    """Two rows prefilled together (different lengths), then decoded one token at a time, each at its own position."""
    a, b = [5, 6, 7, 8, 9], [300, 301]
    cache = KVCache(model.config, 3, 64, "cpu", torch.float32)
    with torch.no_grad():
        last, full = prefill(model, cache, [0, 1], [a, b], [0, 0], [0, 0], [True, False])
        assert full[1] is None and torch.allclose(full[0], full_logits(model, a), atol=1e-4)
        assert torch.allclose(last[1], full_logits(model, b)[-1], atol=1e-4)
        for step in range(6):
            new_a, new_b = 1000 + step, 2000 + step
            logits = decode_one_step(model, cache, [new_a, new_b], [len(a), len(b)], [a[-1], b[-1]])
            a, b = a + [new_a], b + [new_b]
            assert torch.allclose(logits[0], full_logits(model, a)[-1], atol=1e-4)
            assert torch.allclose(logits[1], full_logits(model, b)[-1], atol=1e-4)


def test_continuous_batching_equals_one_sequence_at_a_time(model):
    """Six prompts through two rows: rows are freed and refilled mid-way, sequences of different lengths share steps."""
    params = [SamplingParams(max_tokens=n, temperature=0, stop_tokens=frozenset()) for n in (3, 12, 7, 1, 9, 5)]
    engine = Engine(model, max_batch=2)
    seqs = [Sequence(p, sp, index=i) for i, (p, sp) in enumerate(zip(PROMPTS, params))]
    engine.submit(seqs)
    steps = 0
    while engine.busy():
        engine.step()
        steps += 1
    alone = [generate(model, [p], sp)[0] for p, sp in zip(PROMPTS, params)]
    assert [s.tokens for s in seqs] == alone and [len(t) for t in alone] == [3, 12, 7, 1, 9, 5]
    assert steps < sum(len(t) for t in alone)  # rows really were shared
    assert len(set(map(tuple, alone))) == len(alone)  # the prompts lead to different tokens, so a mix-up would show
    assert engine.free == [0, 1] and not engine.active


def test_static_cache_equals_dynamic(model):
    """The static step (every row, the whole context: fixed shapes for compilation) gives the same tokens."""
    dynamic = Engine(model, max_batch=4)
    static = Engine(model, max_batch=4, static=True)
    results = []
    for engine in (dynamic, static):
        seqs = [Sequence(p, GREEDY, index=i) for i, p in enumerate(PROMPTS[:3])]
        engine.submit(seqs)
        while engine.busy():
            engine.step()
        results.append([s.tokens for s in seqs])
    assert results[0] == results[1]
    cache = KVCache(model.config, 4, 64, "cpu", torch.float32)
    with torch.no_grad():
        prefill(model, cache, [0, 1], [PROMPTS[0], PROMPTS[2]], [0, 0], [0, 0], [False, False])
        args = ([11, 12], [len(PROMPTS[0]), len(PROMPTS[2])], [PROMPTS[0][-1], PROMPTS[2][-1]])
        cache_copy = KVCache(model.config, 4, 64, "cpu", torch.float32)
        cache_copy.k.copy_(cache.k)
        cache_copy.v.copy_(cache.v)
        dyn = decode_one_step(model, cache, *args)
        sta = decode_one_step(model, cache_copy, *args, static=True)
    assert sta.shape[0] == 4 and torch.allclose(dyn, sta[:2], atol=1e-5)


def test_generate_stops_at_stop_tokens_and_the_context():
    model = make_model()
    free = generate(model, [[5, 6, 7]], GREEDY)[0]
    stop = SamplingParams(max_tokens=12, temperature=0, stop_tokens=frozenset({free[3]}))
    assert generate(model, [[5, 6, 7]], stop)[0] == free[: free.index(free[3]) + 1]  # the stop token included
    assert len(generate(model, [list(range(60))], SamplingParams(max_tokens=50, temperature=0))[0]) <= 4
    with pytest.raises(ContextTooLong, match="context"):
        generate(model, [list(range(64))], GREEDY)
    assert generate(model, [], GREEDY) == []


def test_seeds_make_sampling_reproducible_whatever_shares_the_batch():
    model = make_model()
    params = SamplingParams(max_tokens=10, temperature=1.0, top_k=50, seed=3)
    alone = generate(model, [[1, 2, 3]], params)[0]
    with_others = generate(model, [[1, 2, 3], [4, 5], [6]], params)
    assert with_others[0] == alone  # sequence 0 uses seed 3 whatever else runs
    assert generate(model, [[4, 5]], SamplingParams(max_tokens=10, temperature=1.0, top_k=50, seed=4))[0] == \
        with_others[1]  # sequence 1 uses seed 3 + 1


def test_stream_yields_the_text_of_the_tokens():
    model = make_model()
    tokens = generate(model, [[10, 20, 30]], SamplingParams(max_tokens=10, temperature=0))[0]
    text = "".join(stream(Engine(model, max_batch=1), [10, 20, 30], SamplingParams(max_tokens=10, temperature=0)))
    assert text == decode([t for t in tokens if t not in STOP_IDS]) and len(text) > 5


def test_sampling_params_are_checked():
    for bad in (dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
                dict(logprobs=21), dict(logprobs=-1)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_queue_full_deadline_and_cancel():
    model = make_model()
    engine = Engine(model, max_batch=1, max_queue=2)
    with pytest.raises(QueueFull):
        engine.submit([Sequence([1], GREEDY, index=i) for i in range(3)])
    events = []
    late = Sequence([1, 2], GREEDY, emit=events.append, deadline=time.monotonic() - 1)
    gone = Sequence([3, 4], GREEDY, emit=events.append)
    engine.submit([late, gone])
    engine.cancel([gone])
    engine.step()
    assert [(e.kind, type(e.error)) for e in events] == [("error", DeadlineExceeded)]
    assert not engine.busy() and engine.free == [0]


def test_common_prefix_and_the_store_bound():
    assert common_prefix((1, 2, 3, 4), (1, 2, 5)) == 2 and common_prefix((), (1,)) == 0
    assert common_prefix((1, 2), (1, 2)) == 2
    store = PrefixStore(max_tokens=10)
    kv = (torch.zeros(1), torch.zeros(1))
    store.put((1, 2, 3), *kv)
    store.put((1, 2, 3, 4, 5), *kv)  # extends the first: replaces it
    assert list(store.entries) == [(1, 2, 3, 4, 5)] and store.size == 5
    store.put((7, 8, 9), *kv)
    assert store.match((1, 2, 3, 4, 5))[0] == 4  # the last prompt token is always prefilled
    store.put((6, 6, 6), *kv)  # over 10 tokens: the least recently used, (7, 8, 9), goes
    assert list(store.entries) == [(1, 2, 3, 4, 5), (6, 6, 6)] and store.size == 8
    assert store.match((9, 9))[0] == 0
