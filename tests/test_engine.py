"""engine.py: the decode phases against the model's own forward, continuous batching against one sequence at a time,
the static cache against the dynamic one, conversation reuse against none, logprobs against log_softmax, errors,
and CUDA's decoding precision (bf16) on the CPU."""

import time

import pytest
import torch

from config import ModelConfig
from engine import (STOP_IDS, ContextTooLong, DeadlineExceeded, Engine, KVCache, PrefixStore, QueueFull,
                    SamplingParams, Sequence, common_prefix, decode_copies, decode_one_step, fast_bf16_cpu, generate,
                    greedy_ids, output_layer, sample, step_forward, stream)
from model import GPT, sample as sample_logits
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


def test_a_step_packs_decode_rows_and_prompts_and_gives_the_models_logits(model):
    """Two prompts prefilled in one packed forward (different lengths), then steps that decode them a token at a
    time, each at its own position; then prompts packed after decode rows in one forward, one of them into a free
    row that the decode part pads: every token's logits are the model's own."""
    a, b, c, d = [5, 6, 7, 8, 9], [300, 301], [40, 41, 42, 43], [70, 71, 72]
    cache, out = KVCache(model.config, 3, 64, "cpu", torch.float32), output_layer(model)
    with torch.no_grad():
        x = step_forward(model, cache, [], [(0, a, 0, 0), (1, b, 0, 0)])
        assert x.shape[0] == 7 and torch.allclose(out(x[:5]), full_logits(model, a), atol=1e-4)
        assert torch.allclose(out(x[5:]), full_logits(model, b), atol=1e-4)
        for step in range(3):
            new_a, new_b = 1000 + step, 2000 + step
            x = step_forward(model, cache, [(new_a, len(a), a[-1]), (new_b, len(b), b[-1])], [])
            a, b = a + [new_a], b + [new_b]
            assert torch.allclose(out(x[0]), full_logits(model, a)[-1], atol=1e-4)
            assert torch.allclose(out(x[1]), full_logits(model, b)[-1], atol=1e-4)
        # row 1 is free: row 0 decodes, row 1 pads, and row 2 prefills c's last two tokens after its first two
        step_forward(model, cache, [], [(2, c[:2], 0, 0)])
        x = step_forward(model, cache, [(3000, len(a), a[-1]), None], [(2, c[2:], 2, c[1])])
        a = a + [3000]
        assert x.shape[0] == 4 and torch.allclose(out(x[0]), full_logits(model, a)[-1], atol=1e-4)
        assert torch.allclose(out(x[2:]), full_logits(model, c)[2:], atol=1e-4)
        # row 1 pads the decode part and takes a new prompt in the same forward
        x = step_forward(model, cache, [(3001, len(a), a[-1]), None, (44, len(c), c[-1])], [(1, d, 0, 0)])
        a, c = a + [3001], c + [44]
        assert torch.allclose(out(x[0]), full_logits(model, a)[-1], atol=1e-4)
        assert torch.allclose(out(x[2]), full_logits(model, c)[-1], atol=1e-4)
        assert torch.allclose(out(x[3:]), full_logits(model, d), atol=1e-4)
        # the static engine's step, decode_one_step, reads the same cache
        logits = out(decode_one_step(model, cache, [(3002, len(a), a[-1]), (73, len(d), d[-1])]))
        assert torch.allclose(logits[0], full_logits(model, a + [3002])[-1], atol=1e-4)
        assert torch.allclose(logits[1], full_logits(model, d + [73])[-1], atol=1e-4)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
def test_the_cpu_output_layer_takes_several_rows_through_packed_weights():
    """One row reads the transposed copy; two or more go through oneDNN's packed copy: both give x @ W.T."""
    model = make_model()
    out = output_layer(model)
    assert decode_copies(model).packed is not None  # the packed copy exists: several rows use it
    x = torch.randn(17, 32)
    for rows in (1, 2, 3, 16, 17):
        assert torch.allclose(out(x[:rows]), x[:rows] @ model.lm_head.weight.t(), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)  # new weights: new copies
    assert torch.allclose(output_layer(model)(x[:3]), x[:3] @ model.lm_head.weight.t(), rtol=1e-4, atol=1e-5)


# Skipped only where the CPU lacks bf16 dot products: a screen that fails its probe check elsewhere fails these tests.
needs_screen = pytest.mark.skipif(not fast_bf16_cpu(), reason="no fast bf16 on this CPU")


@needs_screen
def test_greedy_ids_are_the_argmax_of_the_fp32_logits():
    """The bf16 screen finds the fp32 winner, also where bf16 ranks a rival above it, and ties go to the first id,
    as argmax's do."""
    model = make_model()
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(0)) * 3
    w = model.lm_head.weight
    with torch.no_grad():
        assert greedy_ids(model, x) == (x @ w.t())[:, :N_VOCAB].argmax(dim=1).tolist()
        # On x = (1, 1, -1, -1, 0, ...), row 11 scores 0.5 and row 7 0.04; every other row -400. Rounded to bf16
        # (steps of 0.5 at 100), row 7's weights become (100.5, 100, 100, 99.5): 1.0, ahead of row 11.
        x = torch.zeros(1, 32)
        x[0, :4] = torch.tensor([1.0, 1.0, -1.0, -1.0])
        w[:, :4] = torch.tensor([-100.0, -100.0, 100.0, 100.0])
        w[11, :4] = torch.tensor([100.0, 100.0, 100.0, 99.5])
        w[7, :4] = torch.tensor([100.26, 99.76, 100.24, 99.74])
        in_bf16 = (x.to(torch.bfloat16) @ w.to(torch.bfloat16).t()).float()[0, :N_VOCAB]
        exact = (x @ w.t())[0, :N_VOCAB]
    assert int(in_bf16.argmax()) == 7 and int(exact.argmax()) == 11
    assert greedy_ids(model, x) == [11]
    with torch.no_grad():
        w[7], w[5] = w[11], w[11]  # a three-way tie: the first id
    assert greedy_ids(model, x) == [5]
    assert greedy_ids(model, torch.full((1, 32), float("nan"))) is None  # no candidate: the caller's fp32 logits
    # x = 0: every logit is 0, every id a candidate, past SCREEN_MAX_CANDIDATES: the caller's fp32 logits, whose
    # argmax is the first id.
    assert greedy_ids(model, torch.zeros(1, 32)) is None
    assert sample(model, torch.zeros(1, 32), [Sequence([1], GREEDY)])[0] == [0]


def make_group_model() -> GPT:
    """make_model with a --data_vocab model's output layer: ids 1000.. (specials and padding too) share one row, but
    for id 5000."""
    model = make_model()
    with torch.no_grad():
        model.lm_head.weight[1000:] = torch.linspace(-0.04, 0.04, 32)
        model.lm_head.weight[5000] = -model.lm_head.weight[1000]
    return model


def test_the_output_layer_computes_a_group_of_equal_rows_once():
    """A --data_vocab model's never-seen ids, most of the vocabulary, share one row: the decode copies keep its
    first, and the logits and greedy choices are those of the whole layer, ties to the first id."""
    assert decode_copies(make_model()).expand is None  # its five equal rows (zeroed special tokens) are kept whole
    model = make_group_model()
    w = model.lm_head.weight
    copies = decode_copies(model)
    assert copies.weight_t.shape == (32, 1002) and copies.screen_ids.tolist() == [*range(1001), 5000]
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1)) * 3
    x[0] = torch.linspace(-1, 1, 32) * 5  # the shared row's best: id 1000
    x[1] = -x[0]  # id 5000's
    distinct = torch.tensor([*range(1001), 5000])  # the first id of each distinct row
    with torch.no_grad():
        full = x @ w.t()
        for rows in (1, 5):
            assert torch.allclose(output_layer(model)(x[:rows]), full[:rows], rtol=1e-4, atol=1e-5)
        want = distinct[(x @ w[distinct].t()).argmax(dim=1)]
        assert torch.allclose(full.gather(1, want[:, None])[:, 0], full[:, :N_VOCAB].max(dim=1).values)
    assert want[:2].tolist() == [1000, 5000] and (want < 1000).any()
    # 1,001 distinct real rows: greedy steps take their exact logits, with or without a bf16 screen, and decide
    # even where every logit ties (x = 0), which a screen leaves to the caller: the first id.
    assert greedy_ids(model, x) == want.tolist()
    assert greedy_ids(model, torch.zeros(1, 32)) == [0]
    assert sample(model, x, [Sequence([1], GREEDY)] * 5)[0] == want.tolist()


@needs_screen
def test_a_group_of_equal_rows_is_sampled_as_its_ids_would_be():
    """Sampled rows of a --data_vocab model draw over the output layer's distinct rows, the group standing for all its
    ids (model.sample's counts): at the same numbers, the ids before the group are those drawn over every id's
    logit, the group is drawn as often, and its ids are spread over it."""
    model = make_group_model()
    x = -torch.linspace(-1, 1, 32)[None] * 8  # the group's ids together about as likely as the others
    n = 400
    seqs = [Sequence([1], SamplingParams(max_tokens=1, temperature=1.0, seed=s)) for s in range(n)]
    got = torch.tensor(sample(model, x.expand(n, -1), seqs)[0])
    uniform = torch.cat([torch.rand(1, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                         for s in range(n)])
    with torch.no_grad():
        want = sample_logits(x.expand(n, -1) @ model.lm_head.weight.t(), 1.0, uniform=uniform)
    before = want < 1000
    assert torch.equal(got[before], want[before]) and (got[~before] >= 1000).all() and (got < N_VOCAB).all()
    in_group = (got >= 1000) & (got != 5000)
    as_ids = (want >= 1000) & (want != 5000)
    assert 0.3 < in_group.float().mean() < 0.7 and abs(int(in_group.sum()) - int(as_ids.sum())) <= 10
    assert len(set(got[in_group].tolist())) > 0.9 * int(in_group.sum())  # spread over the group's 49,000 ids


def test_greedy_decoding_takes_the_screen_and_equals_the_models_argmax(monkeypatch):
    import engine
    model = make_model(True, True)
    calls = []  # (rows, whether the screen chose them)
    real = engine.greedy_ids

    def counted(m, x):
        tokens = real(m, x)
        calls.append((len(x), tokens is not None))
        return tokens

    monkeypatch.setattr(engine, "greedy_ids", counted)
    tokens = generate(model, PROMPTS[:3], GREEDY)
    assert calls and max(rows for rows, _ in calls) == 3 and all(screened for _, screened in calls)
    for prompt, new in zip(PROMPTS[:3], tokens):
        ids = list(prompt)
        for _ in new:
            ids.append(int(full_logits(model, ids)[-1, :N_VOCAB].argmax()))
        assert new == ids[len(prompt):]


def test_continuous_batching_equals_one_sequence_at_a_time(model, monkeypatch):
    """Six prompts through two rows: rows are freed and refilled mid-way, sequences of different lengths share
    steps, and a prompt admitted while the other row decodes rides in its forward: one forward a step."""
    params = [SamplingParams(max_tokens=n, temperature=0, stop_tokens=frozenset()) for n in (3, 12, 7, 1, 9, 5)]
    engine = Engine(model, max_batch=2)
    seqs = [Sequence(p, sp, index=i) for i, (p, sp) in enumerate(zip(PROMPTS, params))]
    engine.submit(seqs)
    forwards, hidden_states = [], model.hidden_states
    monkeypatch.setattr(model, "hidden_states", lambda *args: forwards.append(1) or hidden_states(*args))
    steps = 0
    while engine.busy():
        engine.step()
        steps += 1
    monkeypatch.undo()
    assert len(forwards) == steps
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
        step_forward(model, cache, [], [(0, PROMPTS[0], 0, 0), (1, PROMPTS[2], 0, 0)])
        decode = [(11, len(PROMPTS[0]), PROMPTS[0][-1]), (12, len(PROMPTS[2]), PROMPTS[2][-1])]
        cache_copy = KVCache(model.config, 4, 64, "cpu", torch.float32)
        cache_copy.k.copy_(cache.k)
        cache_copy.v.copy_(cache.v)
        dyn = step_forward(model, cache, decode, [])
        sta = decode_one_step(model, cache_copy, decode)
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


@pytest.mark.parametrize("way", ["row by row", "together", "distinct rows"])  # a CPU's, a GPU's, a --data_vocab model's
def test_rows_with_different_sampling_parameters_sample_as_if_alone(way, monkeypatch):
    """One batch of a greedy row and sampled rows, each with its own temperature, top_k, top_p and seed: every row's
    tokens are those it gets alone."""
    import engine as engine_module
    monkeypatch.setattr(engine_module, "sampled_together", lambda device: way == "together")
    model = make_group_model() if way == "distinct rows" else make_model()
    assert (decode_copies(model).expand is not None) == (way == "distinct rows")
    params = [SamplingParams(max_tokens=8, temperature=0.7, top_p=0.9, seed=1),
              SamplingParams(max_tokens=8, temperature=0),
              SamplingParams(max_tokens=8, temperature=2.0, top_k=50, seed=2),
              SamplingParams(max_tokens=8, temperature=1.0, top_k=3, top_p=0.5, seed=3)]
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8]]
    engine = Engine(model, max_batch=4)
    seqs = [Sequence(prompt, p) for prompt, p in zip(prompts, params)]
    engine.submit(seqs)
    while engine.busy():
        engine.step()
    alone = [generate(model, [prompt], p)[0] for prompt, p in zip(prompts, params)]
    assert [s.tokens for s in seqs] == alone and all(len(t) == 8 for t in alone)
    assert len({tuple(t) for t in alone}) == 4


def test_stream_yields_the_text_of_the_tokens():
    model = make_model()
    tokens = generate(model, [[10, 20, 30]], SamplingParams(max_tokens=10, temperature=0))[0]
    text = "".join(stream(Engine(model, max_batch=1), [10, 20, 30], SamplingParams(max_tokens=10, temperature=0)))
    assert text == decode([t for t in tokens if t not in STOP_IDS]) and len(text) > 5


def test_sampling_params_are_checked():
    for bad in (dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
                dict(logprobs=21), dict(logprobs=-1), dict(max_tokens=-1, prompt_logprobs=True),
                dict(frequency_penalty=2.5), dict(presence_penalty=-3), dict(repetition_penalty=0),
                dict(repetition_penalty=11), dict(logit_bias=((N_VOCAB, 1.0),)), dict(logit_bias=((5, -101),))):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert SamplingParams(max_tokens=0, prompt_logprobs=True).max_tokens == 0  # scoring a prompt only


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


def test_a_sequence_has_left_its_row_when_its_end_is_reported():
    """The server's threads hear of an end from the stepping thread: by then the row is free and the finished
    conversation stored, so a reader there never sees a finished request still active."""
    engine = Engine(make_model(), max_batch=2, reuse_tokens=1000)
    seen = []  # (kind, rows active, tokens stored) at each end

    def record(event):
        if event.kind in ("done", "error"):
            seen.append((event.kind, len(engine.active), engine.store.size))

    short = Sequence([1, 2, 3], SamplingParams(max_tokens=2, temperature=0, stop_tokens=frozenset()), emit=record)
    late = Sequence([4, 5], GREEDY, emit=record)
    engine.submit([short, late])
    while not seen:
        engine.step()
    late.deadline = time.monotonic() - 1
    engine.step()
    # stored: the 3 prompt tokens and the first new one (the last was never fed back); a row ended by error is not
    assert seen == [("done", 1, 4), ("error", 0, 4)]


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
    sizes_seen = []  # the size at each eviction: another thread may read it then
    drop = store._drop
    store._drop = lambda tokens: (sizes_seen.append(store.size), drop(tokens))
    store.put((6, 6, 6), *kv)  # over 10 tokens: the least recently used, (7, 8, 9), goes
    assert list(store.entries) == [(1, 2, 3, 4, 5), (6, 6, 6)] and store.size == 8
    assert sizes_seen == [8]  # made room first: never over the bound of 10, even while putting
    assert store.match((9, 9))[0] == 0


def run(engine, prompt, params, index=0):
    """One sequence through an engine stepped here: (its Sequence, its Events)."""
    events = []
    seq = Sequence(prompt, params, emit=events.append, index=index)
    engine.submit([seq])
    while engine.busy():
        engine.step()
    return seq, events


def test_conversation_reuse_gives_the_same_tokens_and_prefills_only_the_new_ones(model):
    """Turn 2 repeats turn 1 (prompt and reply) and adds tokens: the stored keys and values are copied back, and the
    reply is the one a full prefill gives."""
    reused_counts = []
    engine = Engine(model, max_batch=2, reuse_tokens=1000, observe=lambda kind, v: kind == "reused_tokens"
                    and reused_counts.append(v))
    fresh = Engine(model, max_batch=2)
    first, _ = run(engine, PROMPTS[0], GREEDY)
    assert first.reused == 0 and first.tokens == run(fresh, PROMPTS[0], GREEDY)[0].tokens
    second_prompt = PROMPTS[0] + first.tokens + [11, 12, 13]
    second, _ = run(engine, second_prompt, GREEDY)
    # stored: the prompt and every generated token but the last, which was sampled and never fed back
    assert second.reused == len(PROMPTS[0]) + len(first.tokens) - 1 and reused_counts == [second.reused]
    assert second.tokens == run(fresh, second_prompt, GREEDY)[0].tokens == generate(model, [second_prompt], GREEDY)[0]
    scored, _ = run(engine, second_prompt, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=True))
    assert scored.reused == 0  # prompt logprobs need the logits of every prompt token: the whole prompt is prefilled


def test_the_store_stays_within_its_bound_least_recently_used_dropped_first():
    model = make_model()
    engine = Engine(model, max_batch=1, reuse_tokens=30)
    params = SamplingParams(max_tokens=4, temperature=0, stop_tokens=frozenset())
    prompts = [[100 + i] * 10 for i in range(3)]  # each stored as 10 + 3 tokens (the last one is never fed back)
    first, _ = run(engine, prompts[0], params)
    run(engine, prompts[1], params)
    assert engine.store.size == 26
    # the next turn of prompts[0]'s conversation: its entry is used, then replaced by the longer one (17 tokens)
    assert run(engine, prompts[0] + first.tokens, params)[0].reused == 13 and engine.store.size == 30
    run(engine, prompts[2], params)  # 43 tokens: the least recently used entry, prompts[1]'s, goes
    assert engine.store.size == 30
    assert [engine.store.match(tuple(p) + (1,))[0] for p in prompts] == [10, 0, 10]


def test_logprobs_equal_the_models_log_softmax(model):
    prompt = PROMPTS[2]
    params = SamplingParams(max_tokens=6, temperature=0, stop_tokens=frozenset(), logprobs=3, prompt_logprobs=True)
    seq, events = run(Engine(model, max_batch=1), prompt, params)
    (prompt_event,) = [e for e in events if e.kind == "prompt"]
    generated = [lp for e in events if e.kind in ("text", "done") for lp in e.logprobs]
    logp = torch.log_softmax(full_logits(model, prompt + seq.tokens), dim=-1)
    assert prompt_event.logprobs[0] is None and len(prompt_event.logprobs) == len(prompt)
    entries = prompt_event.logprobs[1:] + generated
    tokens = prompt[1:] + seq.tokens
    assert [e.token for e in entries] == tokens and len(entries) == len(prompt) - 1 + 6
    for position, (entry, token) in enumerate(zip(entries, tokens)):
        assert entry.logprob == pytest.approx(logp[position, token].item(), abs=1e-5)
        values, ids = torch.topk(logp[position, :N_VOCAB], 3)
        assert [t for t, _ in entry.top] == ids.tolist()
        assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-5)
    assert all(e.top[0] == (e.token, pytest.approx(e.logprob)) for e in generated)  # greedy takes the top one


@pytest.mark.parametrize("adjust", [dict(frequency_penalty=1.5), dict(presence_penalty=2.0),
                                    dict(frequency_penalty=-0.5, presence_penalty=1.0), dict(repetition_penalty=3.0),
                                    dict(logit_bias=((7, 5.0), (8, -100.0)))])
def test_penalties_and_logit_bias_decide_greedy_tokens_as_computed_by_hand(model, adjust):
    """Each step's token is the argmax of the model's logits with OpenAI's penalties (minus frequency_penalty times
    the id's count in the output, minus presence_penalty once present), vLLM's repetition_penalty (ids of the prompt
    or output: positive logits divided, negative multiplied) and logit_bias added; whatever shares the batch. The
    logprobs stay the model's own."""
    prompt, n = [7, 7, 8, 100, 7], 10
    params = SamplingParams(max_tokens=n, temperature=0, stop_tokens=frozenset(), logprobs=0, **adjust)
    expected = []
    for _ in range(n):
        logits = full_logits(model, prompt + expected)[-1, :N_VOCAB].clone()
        counts = torch.bincount(torch.tensor(expected, dtype=torch.long), minlength=N_VOCAB)[:N_VOCAB]
        if "repetition_penalty" in adjust:
            seen = torch.zeros(N_VOCAB, dtype=torch.bool)
            seen[prompt + expected] = True
            r = adjust["repetition_penalty"]
            logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
        logits -= adjust.get("frequency_penalty", 0) * counts + adjust.get("presence_penalty", 0) * (counts > 0)
        for token, bias in adjust.get("logit_bias", ()):
            logits[token] += bias
        expected.append(int(logits.argmax()))
    plain = generate(model, [prompt], GREEDY)[0]
    assert expected != plain[:n]  # the adjustment changes the reply, so this test can fail
    engine = Engine(model, max_batch=4)
    seqs = [Sequence(prompt, params), Sequence(PROMPTS[0], GREEDY), Sequence(prompt, GREEDY)]
    engine.submit(seqs)
    while engine.busy():
        engine.step()
    assert seqs[0].tokens == expected and seqs[2].tokens == plain
    seq, events = run(Engine(model, max_batch=1), prompt, params)
    logp = torch.log_softmax(full_logits(model, prompt + expected), dim=-1)
    entries = [lp for e in events if e.kind in ("text", "done") for lp in e.logprobs]
    assert seq.tokens == expected and len(entries) == n
    assert [e.logprob for e in entries] == pytest.approx(
        [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(expected)], abs=1e-5)


def test_sampled_rows_draw_from_the_adjusted_logits(model):
    """A bias of 100 on one id makes it all a sampled row draws, and -100 on the ids a seeded reply drew takes
    each of them out of the next draw of the same seed."""
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=3, stop_tokens=frozenset())
    drawn = generate(model, [PROMPTS[0]], params)[0]
    biased = SamplingParams(**{**params.__dict__, "logit_bias": ((1234, 100.0),)})
    banned = SamplingParams(**{**params.__dict__, "logit_bias": tuple((t, -100.0) for t in sorted(set(drawn)))})
    out = generate(model, [PROMPTS[0], PROMPTS[0]], biased) + generate(model, [PROMPTS[0]], banned)
    assert out[0] == out[1] == [1234] * 8 and not set(out[2]) & set(drawn)


def test_max_tokens_0_scores_a_prompt_that_fills_the_context():
    model = make_model()
    prompt = list(range(1000, 1064))  # the whole context of 64
    params = SamplingParams(max_tokens=0, temperature=0, logprobs=0, prompt_logprobs=True)
    seq, events = run(Engine(model, max_batch=1), prompt, params)
    assert [e.kind for e in events] == ["prompt", "done"] and seq.tokens == [] and events[1].tokens == 0
    logp = torch.log_softmax(full_logits(model, prompt), dim=-1)
    want = logp[torch.arange(63), torch.tensor(prompt[1:])]
    assert [e.logprob for e in events[0].logprobs[1:]] == pytest.approx(want.tolist(), abs=1e-5)
    with pytest.raises(ContextTooLong):
        generate(model, [prompt], SamplingParams(max_tokens=1))


def test_cudas_decoding_precision_on_the_cpu(monkeypatch):
    """The engine as CUDA runs it (engine.decode_precision: bf16 autocast, a bf16 cache) on the CPU: attention reads
    the cache in the dtype the forward pass emits, never casting it, and the logprobs of a greedy sequence (prompt
    and generated tokens) and of a sampled one batched beside it are the fp32 model's within bf16's error."""
    import engine as engine_module
    monkeypatch.setattr(engine_module, "decode_precision",
                        lambda device, weight_dtype: (torch.bfloat16, torch.autocast("cpu", dtype=torch.bfloat16)))
    dtypes = set()
    attend = KVCache.attend
    monkeypatch.setattr(KVCache, "attend", lambda cache, layer, q, k, v: dtypes.add((q.dtype, k.dtype, cache.k.dtype))
                        or attend(cache, layer, q, k, v))
    model = make_model(rope=True, smear=True)
    engine = Engine(model, max_batch=2)
    assert engine.cache.k.dtype == torch.bfloat16
    greedy = SamplingParams(max_tokens=6, temperature=0, stop_tokens=frozenset(), logprobs=0, prompt_logprobs=True)
    sampled = SamplingParams(max_tokens=6, temperature=0.8, top_k=50, top_p=0.9, seed=0, stop_tokens=frozenset(),
                             logprobs=0)
    events = [[], []]
    runs = [Sequence(PROMPTS[0], greedy, emit=events[0].append), Sequence(PROMPTS[2], sampled, emit=events[1].append)]
    engine.submit(runs)
    while engine.busy():
        engine.step()
    assert dtypes == {(torch.bfloat16,) * 3}
    for seq, seq_events in zip(runs, events):
        entries = [lp for e in seq_events for lp in e.logprobs if lp is not None]
        tokens = (seq.prompt[1:] if seq.params.prompt_logprobs else []) + seq.tokens
        logp = torch.log_softmax(full_logits(model, seq.prompt + seq.tokens), dim=-1)
        first = 0 if seq.params.prompt_logprobs else len(seq.prompt) - 1
        assert [e.token for e in entries] == tokens and len(seq.tokens) == 6
        want = logp[torch.arange(first, first + len(tokens)), torch.tensor(tokens)]
        assert [e.logprob for e in entries] == pytest.approx(want.tolist(), abs=0.02)
