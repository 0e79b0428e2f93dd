import math
import re

import pytest
import torch

from config import ModelConfig
from model import GPT, draw, nucleus, sample
from tokenizer import N_VOCAB


def reference_greedy(model, prompt, n):
    """Greedy decoding by recomputing the whole sequence at every step (no cache)."""
    seq, out = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor([seq]))[0, -1]
        logits[N_VOCAB:] = float("-inf")
        out.append(int(logits.argmax()))
        seq.append(out[-1])
    return out


def test_shapes_vocab_padding_and_tied_weights(tiny_model):
    x = torch.randint(0, N_VOCAB, (3, 10))
    assert tiny_model(x).shape == (3, 10, 50304)
    assert tiny_model.config.vocab_size % 64 == 0 and tiny_model.config.vocab_size >= N_VOCAB
    assert tiny_model.lm_head.weight.data_ptr() == tiny_model.wte.weight.data_ptr()
    # counted once: no separate output matrix
    n = sum(p.numel() for p in tiny_model.parameters())
    assert n == tiny_model.num_params(non_embedding=False)
    assert tiny_model.num_params() == n - 64 * 32


@pytest.fixture(params=[(False, False), (True, False), (True, True)], ids=["learned-positions", "rope", "rope+smear"])
def any_model(request):
    """The tiny model with learned position embeddings, with rotary ones, and with rotary ones and smear."""
    torch.manual_seed(0)
    rope, smear = request.param
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, rope=rope, smear=smear)).eval()
    if smear:  # trained, it is not zero: make it matter here
        torch.nn.init.normal_(model.smear, std=1.0)
    return model


def test_rotation_depends_only_on_relative_position():
    from model import rotary_tables, rotate
    cos, sin = rotary_tables(8, 32)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    at = lambda x, p: rotate(x, cos[p].view(1, 1, -1), sin[p].view(1, 1, -1))  # noqa: E731
    score = lambda pq, pk: float((at(q, pq) * at(k, pk)).sum())  # noqa: E731
    assert score(5, 3) == pytest.approx(score(12, 10), abs=1e-5)
    assert score(5, 3) != pytest.approx(score(5, 4), abs=1e-3)
    assert score(0, 0) == pytest.approx(float((q * k).sum()), abs=1e-6)  # position 0: no rotation


def test_rope_model_has_no_position_table_and_cannot_become_gpt2(tmp_path):
    from checkpoint import CheckpointError, export_hf
    m = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, rope=True))
    assert m.wpe is None and not any(k.startswith("wpe") for k in m.state_dict())
    assert m.num_params() == m.num_params(non_embedding=False)
    with pytest.raises(CheckpointError, match="rotary"):
        export_hf(m, tmp_path / "hf")


def test_smear_starts_as_a_no_op_and_cannot_become_gpt2(tmp_path):
    from checkpoint import CheckpointError, export_hf
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)
    with_smear, without = GPT(ModelConfig(**{**vars(cfg), "smear": True})).eval(), GPT(cfg).eval()
    without.load_state_dict({k: v for k, v in with_smear.state_dict().items() if k != "smear"})
    x = torch.randint(0, N_VOCAB, (2, 12))
    assert torch.equal(with_smear(x), without(x))
    torch.nn.init.normal_(with_smear.smear)  # trained: the first position is unchanged, the others are not
    a, b = with_smear(x), without(x)
    assert torch.allclose(a[:, 0], b[:, 0], atol=1e-5) and not torch.allclose(a[:, 1:], b[:, 1:], atol=1e-3)
    with pytest.raises(CheckpointError, match="smear"):
        export_hf(with_smear, tmp_path / "hf")


def test_causality(any_model):
    x = torch.randint(0, N_VOCAB, (1, 16))
    y = x.clone()
    y[0, 10:] = torch.randint(0, N_VOCAB, (6,))
    a, b = any_model(x), any_model(y)
    assert torch.allclose(a[0, :10], b[0, :10], atol=1e-6)
    assert not torch.allclose(a[0, 10:], b[0, 10:])


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    m = GPT(ModelConfig(n_layer=8, n_head=4, n_embd=256, block_size=32))
    assert abs(m.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002
    assert abs(m.h[0].mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(16)) < 0.001
    assert abs(m.h[0].attn.c_proj.weight.std().item() - 0.02 / math.sqrt(16)) < 0.001


def test_gpt2_parameter_count_and_flops():
    m = GPT(ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257 + 47))
    # GPT-2 small: 124.4M parameters with a 50257 vocabulary; ours pads it to 50304.
    assert m.num_params(non_embedding=False) == 124_439_808 + 47 * 768
    assert m.flops_per_token() == 6 * m.num_params() + 12 * 12 * 768 * 1024


def test_loss_ignores_masked_targets(tiny_model):
    x = torch.randint(0, N_VOCAB, (2, 12))
    y = torch.randint(0, N_VOCAB, (2, 12))
    y[:, :5] = -1
    full = torch.nn.functional.cross_entropy(tiny_model(x).view(-1, 50304), y.view(-1), ignore_index=-1)
    assert torch.allclose(tiny_model(x, y), full, atol=1e-5)
    y_all = torch.randint(0, N_VOCAB, (2, 12))
    assert torch.allclose(tiny_model(x, y_all),
                          torch.nn.functional.cross_entropy(tiny_model(x).view(-1, 50304), y_all.view(-1)), atol=1e-5)


def test_kv_cache_greedy_equals_recompute(any_model):
    prompt = [464, 2068, 7586, 21831, 18045]
    (out,) = any_model.generate([prompt], 20, temperature=0)
    assert out == reference_greedy(any_model, prompt, 20)


def test_batched_generation_of_different_lengths_equals_one_by_one(any_model):
    prompts = [[1, 2, 3, 4, 5, 6, 7], [42], [100, 200, 300]]
    batched = any_model.generate(prompts, 12, temperature=0)
    assert batched == [any_model.generate([p], 12, temperature=0)[0] for p in prompts]
    assert batched[1] == reference_greedy(any_model, prompts[1], 12)


def test_stop_tokens_and_context_limit(tiny_model):
    prompt = [5, 6, 7]
    free = tiny_model.generate([prompt], 10, temperature=0)[0]
    stopped = tiny_model.generate([prompt], 10, temperature=0, stop_tokens={free[3]})[0]
    assert stopped == free[: free.index(free[3]) + 1]
    long = tiny_model.generate([list(range(60))], 50, temperature=0)[0]
    assert len(long) == 4  # the 64-token context is full
    with pytest.raises(ValueError, match="context"):
        tiny_model.generate([list(range(64))], 5)


def test_seeded_sampling_is_reproducible(tiny_model):
    prompts = [[1, 2, 3], [9, 8]]
    a = tiny_model.generate(prompts, 15, temperature=1.0, seed=123)
    b = tiny_model.generate(prompts, 15, temperature=1.0, seed=123)
    c = tiny_model.generate(prompts, 15, temperature=1.0, seed=124)
    assert a == b and a != c


def test_top_k_and_top_p_restrict_the_support():
    torch.manual_seed(0)
    logits = torch.randn(1, 50304)
    top5 = set(torch.topk(logits[0, :N_VOCAB], 5).indices.tolist())
    g = torch.Generator().manual_seed(0)
    drawn = {int(sample(logits, 1.0, top_k=5, generator=g)) for _ in range(300)}
    assert drawn <= top5 and len(drawn) > 1
    # top_p: a distribution with three likely tokens and a long tail
    logits = torch.full((1, 50304), -20.0)
    logits[0, [10, 20, 30]] = torch.tensor([5.0, 4.0, 3.0])
    probs = torch.softmax(logits[0, :N_VOCAB], -1)
    assert probs[10] + probs[20] < 0.95 < probs[10] + probs[20] + probs[30]
    drawn = {int(sample(logits, 1.0, top_p=0.95, generator=g)) for _ in range(300)}
    assert drawn == {10, 20, 30}
    drawn = {int(sample(logits, 1.0, top_p=0.5, generator=g)) for _ in range(50)}
    assert drawn == {10}


def test_draws_follow_the_probabilities_and_the_nucleus_grows_past_its_first_guess():
    g = torch.Generator().manual_seed(0)
    probs = torch.zeros(1000)
    probs[[3, 500, 999]] = torch.tensor([0.5, 0.3, 0.2])
    n = 20_000
    counts = torch.bincount(draw(probs.expand(n, -1) * 7, torch.rand(n, generator=g))[0], minlength=1000)  # any total
    assert counts.nonzero().flatten().tolist() == [3, 500, 999]  # never an id of probability 0, the last included
    assert torch.allclose(counts[[3, 500, 999]] / n, torch.tensor([0.5, 0.3, 0.2]), atol=0.015)  # ~4 sigma
    assert draw(probs[None], torch.tensor([0.49]))[0] == 3 and draw(probs[None], torch.tensor([0.51]))[0] == 500
    # Nearly uniform over 1,000 ids: the smallest set reaching 0.9 holds several hundred, past the first top-k.
    logits = torch.full((1, 50304), float("-inf"))
    logits[0, :1000] = -torch.arange(1000) * 1e-3
    probs = torch.softmax(logits, dim=-1)
    m = int((probs[0].cumsum(0) - probs[0] < 0.9).sum())  # ids are already in order of probability
    assert 256 < m < 1000
    kept, n = nucleus(probs, 0.9)
    assert n is None
    assert kept[0].nonzero().flatten().tolist() == list(range(m)) and torch.equal(kept[0, :m], probs[0, :m])
    assert max(int(sample(logits, 1.0, top_p=0.9, generator=g)) for _ in range(200)) < m


def test_each_row_samples_with_its_own_parameters():
    logits = torch.full((2, 50304), -1e4)
    logits[:, [10, 20]] = torch.tensor([5.0, 4.0])  # id 10 likelier; at temperature 10 the two nearly even
    u = torch.tensor([0.9, 0.9])
    assert sample(logits, [0.05, 10.0], uniform=u).tolist() == [10, 20]
    assert sample(logits, [10.0, 0.05], uniform=u).tolist() == [20, 10]
    assert sample(logits, [0, 10.0], uniform=u).tolist() == [10, 20]  # temperature 0: greedy
    assert sample(logits, 10.0, top_k=[1, 2], uniform=u).tolist() == [10, 20]
    assert sample(logits, 10.0, top_k=[2, 1], uniform=u).tolist() == [20, 10]
    assert sample(logits, 10.0, top_k=[1, 0], uniform=u).tolist() == [10, 20]  # top_k 0: every id
    assert sample(logits, 10.0, top_p=[0.4, 1.0], uniform=u).tolist() == [10, 20]
    assert sample(logits, 10.0, top_p=[1.0, 0.4], uniform=u).tolist() == [20, 10]


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.5, top_k=4),
                                    dict(temperature=2.0, top_k=9), dict(temperature=1.0, top_p=0.8),
                                    dict(temperature=0.7, top_k=6, top_p=0.6)])
def test_rows_standing_for_several_ids_sample_as_those_ids_would(params):
    """counts: each logit is that of counts[j] ids (a --data_vocab model's group of never-seen ids, engine.sample).
    Drawn at the same numbers, a row is chosen as often as its ids are over the ids' own logits, whatever top_k or
    top_p leave of it (here a part of the group of 5), and its ids equally often."""
    counts = torch.tensor([1, 3, 5, 0, 1, 2])
    row_logits = torch.tensor([[1.0, 0.5, 0.9, 9.0, 1.2, -0.3]])
    ids_logits = row_logits[:, counts.nonzero().squeeze(1)].repeat_interleave(counts[counts > 0], dim=1)
    n = 6000
    grid = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    got = sample(row_logits.expand(n, -1), uniform=grid, counts=counts, **params)
    want = sample(ids_logits.expand(n, -1), uniform=grid, **params)
    row_of = torch.arange(len(counts)).repeat_interleave(counts)  # each id's row
    per_row = [torch.bincount(row_of[x], minlength=len(counts)) for x in (got, want)]
    assert (per_row[0] - per_row[1]).abs().max() <= 1 and per_row[0][3] == 0  # a row of no id never comes
    per_id = torch.bincount(got, minlength=int(counts.sum()))
    for r in range(len(counts)):
        ids = per_id[row_of == r]
        kept = ids[ids > 0]
        assert len(kept) == 0 or kept.max() - kept.min() <= 1  # its kept ids equally often
    assert int((per_id > 0).sum()) == int((torch.bincount(want) > 0).sum())  # as many ids kept (top_k keeps ties)
    assert torch.equal(sample(row_logits, 0, counts=counts), torch.tensor([9]))  # greedy: row 4, its first id
    assert int(sample(row_logits, 1.0, counts=counts, uniform=torch.tensor([0.0]))) == 0


@pytest.mark.parametrize("counts", [None, torch.tensor([1, 3, 5, 0, 1, 2])])
def test_vanishing_temperature_or_top_p_samples_the_likeliest_id(counts):
    """A temperature too small to divide by (1e-40 is subnormal in float32, 1e-300 rounds to 0) samples as greedy,
    and a top_p too small for float32 still keeps the likeliest id: the nucleus is never empty."""
    logits = torch.full((2, 50304) if counts is None else (2, 6), -1.0)
    logits[:, 4] = 3.0
    want = 4 if counts is None else 9  # with counts: row 4's first id, after 1 + 3 + 5 + 0 ids
    u = torch.tensor([0.3, 0.99])
    for params in (dict(temperature=1e-40), dict(temperature=1e-300), dict(temperature=5e-324),
                   dict(temperature=1.0, top_p=1e-300), dict(temperature=1.0, top_p=1e-40),
                   dict(temperature=[1e-300, 1.0], top_p=[1.0, 1e-300])):
        assert sample(logits, uniform=u, counts=counts, **params).tolist() == [want, want], params


def test_padding_ids_are_never_sampled():
    logits = torch.zeros(1, 50304)
    logits[0, N_VOCAB:] = 100.0
    assert int(sample(logits, 0)) < N_VOCAB
    g = torch.Generator().manual_seed(0)
    assert all(int(sample(logits, 1.0, generator=g)) < N_VOCAB for _ in range(50))


def test_shared_rows_finds_the_rows_restrict_output_tied(tiny_model):
    assert len(tiny_model.shared_rows()) == 0  # random rows: none equal
    tiny_model.restrict_output([5, 9, 100])
    fresh = GPT(tiny_model.config)  # as loaded from a checkpoint: no restriction, only the equal rows
    fresh.load_state_dict(tiny_model.state_dict())
    assert fresh.output_ids is None and fresh.shared_rows().tolist() == tiny_model.rest_ids.tolist()


def test_restricted_loss_is_the_full_vocabulary_loss_and_keeps_the_other_rows_tied(tiny_model):
    x, y = torch.tensor([[5, 9, 100, 2000]]), torch.tensor([[9, 100, 2000, 50256]])
    tiny_model.restrict_output([2000, 9, 5, 100, 9, 50256])
    assert tiny_model.output_ids.tolist() == [5, 9, 100, 2000, 50256]
    rest = tiny_model.rest_ids
    weight = tiny_model.state_dict()["wte.weight"]  # one row per id, as checkpoints store it
    assert len(rest) == 50304 - 5 and torch.equal(weight[rest], weight[rest[:1]].expand(len(rest), -1))
    assert tiny_model.wte.weight.shape == (5 + 1, 32)  # the optimizer sees the output ids' rows and one shared row
    optimizer = torch.optim.AdamW(tiny_model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        full = torch.nn.functional.cross_entropy(tiny_model(x)[0], y[0])  # the ordinary full-vocabulary loss
        loss = tiny_model(x, y)
        assert loss.item() == pytest.approx(full.item(), abs=1e-4)  # float32 sums of 50K terms
        with torch.no_grad():
            assert tiny_model(x, y).item() == pytest.approx(full.item(), abs=1e-4)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        weight = tiny_model.state_dict()["wte.weight"]
        assert torch.equal(weight[rest], weight[rest[:1]].expand(len(rest), -1))  # still one row
    with pytest.raises(ValueError, match="not among the ids"):
        tiny_model(x, torch.full_like(x, 7))


def test_pick_device_refuses_a_device_that_is_not_one_or_that_this_machine_lacks(monkeypatch):
    from config import ConfigError
    from model import pick_device
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("cpu") == torch.device("cpu") and pick_device("cuda:0") == torch.device("cuda", 0)
    for name, says in (("gpu", "expects auto, cpu, cuda, cuda:N or mps, got 'gpu'"), ("meta", "got 'meta'"),
                       ("cuda:1", "this torch sees only 1 CUDA GPU(s), numbered from 0")):
        with pytest.raises(ConfigError, match=re.escape(says)):
            pick_device(name)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match="sees no CUDA GPU"):
        pick_device("cuda")
