"""CUDA paths that a CPU can check (shared/docs/cuda-review.md, section 4): device choice under torchrun, the MFU
peak of a GPU's name, the pace that leaves warm-up out, warmup against short runs, the TF32 switch."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import model as model_module
import train
from config import ConfigError, ModelConfig, TrainConfig
from model import GPT, LinearCrossEntropy, enable_tf32


def test_torchrun_refuses_one_gpu_index_for_every_process(monkeypatch):
    """--device cuda:N under torchrun would put every rank on GPU N (NCCL: duplicate GPU); refused before any
    CUDA call, with what to give instead."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # a machine with two GPUs
    with pytest.raises(ConfigError, match="field 'device' is 'cuda:0' under torchrun.*CUDA_VISIBLE_DEVICES"):
        train.setup_device(TrainConfig(device="cuda:0"))


def test_one_process_may_pick_its_gpu(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    device, rank, world = train.setup_device(TrainConfig(device="cuda:1"))
    assert (device, rank, world, calls) == (torch.device("cuda", 1), 0, 1, [torch.device("cuda", 1)])


def test_each_process_joins_the_nccl_group_on_its_own_gpu(monkeypatch):
    """Under torchrun, process N takes cuda:LOCAL_RANK and names it to init_process_group: NCCL then binds its
    communicator to that GPU, where it would otherwise guess the GPU from the rank at the first barrier."""
    import torch.distributed as dist
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    joined = []
    monkeypatch.setattr(dist, "init_process_group", lambda *args, **kwargs: joined.append((args, kwargs)))
    device, rank, world = train.setup_device(TrainConfig(device="cuda"))
    assert (device, rank, world) == (torch.device("cuda", 1), 1, 2)
    assert joined == [(("nccl",), {"device_id": torch.device("cuda", 1)})]
    joined.clear()
    train.setup_device(TrainConfig(device="cpu"))
    assert joined == [(("gloo",), {})]


@pytest.mark.parametrize("name, peak", [("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 836e12),
                                        ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H100 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                        ("Tesla T4", None)])
def test_peak_flops_takes_the_most_specific_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert train.peak_flops(torch.device("cuda", 0), torch.bfloat16) == peak
    assert train.peak_flops(torch.device("cuda", 0), torch.float32) is None  # no fp32 peak: no MFU


def test_the_pace_leaves_the_first_step_out(monkeypatch):
    """The first step compiles (a minute on a GPU): tokens/s and MFU average the steps after it only."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16))
    meter = train.Meter(model, torch.device("cuda", 0), torch.bfloat16, world=1)
    meter.update(1000, 1e12, 60.0)  # compiling
    rate, mfu = meter.update(1000, 1e12, 0.01)
    assert rate == pytest.approx(100_000) and meter.sec_per_step == pytest.approx(0.01)
    assert mfu == pytest.approx(1e14 / 989e12)
    rate, mfu = meter.update(1000, 2e12, 0.02)
    assert rate == pytest.approx(0.9 * 100_000 + 0.1 * 50_000) and mfu == pytest.approx(1e14 / 989e12)


def test_the_pace_counts_tokens_without_padding_at_their_batchs_length(monkeypatch):
    """Fine-tuning pads rows on the right: a row's tokens count up to its last target (the prompt's, untrained,
    count too). Their FLOPs are 6N + 12 L C T at the batch's length T, not the context, with N counting the output
    layer as wide as restrict_output leaves it; the MFU follows from them."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200 NVL")
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=64))
    # N = 50304 * 32 (tied embedding) + 12 * 32^2 + 13 * 32 (one block) + 2 * 32 (final LayerNorm); T = 16
    assert model.flops_per_token(16) == 6 * 1_622_496 + 12 * 32 * 16 == 9_741_120
    y = torch.full((3, 16), -1)
    y[0, 2:10] = 7  # a prompt of 2, a reply of 8, then padding: 10 tokens
    y[1, 4] = 7  # 5 tokens
    y[2] = 7  # a full row: 16
    tokens, flops = train.Meter(model, torch.device("cpu"), torch.float32, world=1).work(y, y).tolist()
    assert (tokens, flops) == (31, 31 * 9_741_120)

    model.restrict_output(torch.arange(100, 164))  # 64 ids and the shared row: N - (50304 - 65) * 32 = 14,848
    meter = train.Meter(model, torch.device("cuda", 0), torch.bfloat16, world=2)
    tokens, flops = meter.work(y, y).tolist()
    assert (tokens, flops) == (31, 31 * (6 * 14_848 + 12 * 32 * 16))
    meter.update(2 * tokens, 2 * flops, 60.0)  # two ranks
    rate, mfu = meter.update(2 * tokens, 2 * flops, 0.001)
    assert rate == pytest.approx(62_000) and mfu == pytest.approx(62_000 * 95_232 / (2 * 836e12))


def test_warmup_never_fills_a_short_run():
    """A preset's warmup (700 steps for gpt2) takes at most a fifth of a shorter run, and the schedule still ends
    at min_lr; a long run keeps it as given."""
    cfg = TrainConfig(lr=1.0, warmup_steps=700, min_lr_ratio=0.1, schedule="cosine")
    assert train.warmup_steps(cfg, 500) == 100 and train.warmup_steps(cfg, 19000) == 700
    lrs = [train.lr_at(s, cfg, 500) for s in range(500)]
    assert max(lrs) == pytest.approx(1.0) and lrs.index(max(lrs)) == 99
    assert lrs[-1] == pytest.approx(0.1, abs=1e-4) and all(0 < lr <= 1.0 for lr in lrs)
    assert train.lr_at(0, cfg, 3) <= 1.0 and train.lr_at(0, cfg, math.inf) == pytest.approx(1 / 700)
    text = train.describe(GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)),
                          TrainConfig(warmup_steps=700, max_steps=500), "cpu", torch.float32, 1, 1, 500)
    assert "warmup 100 steps, 20% of the run (not 700)" in text


def test_tf32_leaves_every_reader_of_the_precision_settings_an_answer():
    """enable_tf32 turns TF32 on for the legacy readers (allow_tf32, get_float32_matmul_precision) and the
    fp32_precision ones alike. Setting only fp32_precision leaves the legacy readers raising torch's mixed-API
    error, and Inductor still reads them (its autotuning cache keys: a compiled matmul failed to lower)."""
    before = torch.get_float32_matmul_precision()
    try:
        enable_tf32()
        assert torch.backends.cuda.matmul.fp32_precision == "tf32" and torch.backends.cuda.matmul.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32" and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before)


# ---- host syncs, devices, compile and bf16 on the GPU's loss branch (section 4 of the review) ---------------

class HostReads(TorchDispatchMode):
    """Counts the ops that read a device tensor on the host (a sync on CUDA) and tensors built from Python data
    (a blocking host-to-device copy on CUDA)."""
    SYNCS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.equal.default"}

    def __init__(self):
        super().__init__()
        self.syncs, self.from_python = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in self.SYNCS:
            self.syncs.append(name)
        self.from_python += name == "aten.lift_fresh.default"
        return func(*args, **(kwargs or {}))


@pytest.fixture
def gpu_loss_branch(monkeypatch):
    """The loss as CUDA computes it: no CPU-only shortcuts (skipped rows, LinearCrossEntropy)."""
    monkeypatch.setattr(model_module, "cpu_speedups", lambda x: False)


def small_model(restricted: bool = False) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, rope=True, smear=True))
    if restricted:
        model.restrict_output(torch.arange(100, 164))
    return model


@pytest.mark.parametrize("restricted", [False, True])
def test_a_training_forward_never_reads_the_device(gpu_loss_branch, restricted):
    """Sync budget: 0 host reads in forward(x, y) with every target set, restricted output or not."""
    model = small_model(restricted)
    x = torch.randint(100, 164, (2, 32))
    with HostReads() as reads:
        loss = model(x, x.roll(-1, 1))
        loss.backward()
    assert reads.syncs == [] and reads.from_python == 0


def test_a_decode_step_has_a_fixed_budget():
    """One decode step of 3 rows, the engine's (step_forward) and the static engine's (decode_one_step, all 4 rows):
    no host reads; its inputs (tokens, positions, prevs) come from Python in one copy."""
    from engine import KVCache, decode_one_step, output_layer, step_forward
    model = small_model().eval()
    cache = KVCache(model.config, 4, 32, torch.device("cpu"), torch.float32)
    output_layer(model)  # the CPU's transposed copy of the output layer is made once, outside the step
    steps = {3: lambda: step_forward(model, cache, [(5, 3, 1), (6, 4, 2), (7, 5, 3)], []),
             4: lambda: decode_one_step(model, cache, [(5, 3, 1), (6, 4, 2), (7, 5, 3)])}
    for rows, step in steps.items():
        with torch.no_grad(), HostReads() as reads:
            logits = output_layer(model)(step())
        assert logits.shape == (rows, 50304) and reads.syncs == [] and reads.from_python == 1


def test_a_packed_step_has_a_fixed_budget():
    """A step that decodes 2 rows (and pads a free one) and prefills 2 prompts of different lengths in the same
    forward: no host reads; its inputs (tokens, positions, prevs, rows) come from Python in one copy."""
    from engine import KVCache, output_layer, step_forward
    model = small_model().eval()
    cache = KVCache(model.config, 5, 32, torch.device("cpu"), torch.float32)
    output_layer(model)  # the CPU's copies of the output layer are made once, outside the step
    with torch.no_grad(), HostReads() as reads:
        x = step_forward(model, cache, [(5, 3, 1), None, (6, 4, 2)], [(3, [7, 8, 9], 0, 0), (4, [10], 2, 1)])
    assert x.shape == (7, 32)
    assert reads.syncs == [] and reads.from_python == 1


def test_the_static_decode_step_compiles_into_one_graph():
    """decode_one_step exists for torch.compile and CUDA graphs: the model's part of it compiles with
    fullgraph and dynamic=False into one graph that serves every step, the positions moving, and equals eager."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from engine import KVCache, decode_one_step
    torch._dynamo.reset()
    counters.clear()
    model = small_model().eval()
    caches = [KVCache(model.config, 3, 32, torch.device("cpu"), torch.float32) for _ in range(2)]
    eager = model.hidden_states
    compiled = torch.compile(eager, backend="aot_eager", fullgraph=True, dynamic=False)
    with torch.no_grad():
        for position in range(4):
            decode = [(5 + position, position, 1), (6, position + 2, 2), (7, position + 5, 3)]
            model.hidden_states = compiled
            got = decode_one_step(model, caches[0], decode)
            model.hidden_states = eager
            assert torch.allclose(got, decode_one_step(model, caches[1], decode), atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("restricted", [False, True])
def test_the_hot_paths_run_on_the_meta_device(gpu_loss_branch, restricted):
    """Device plumbing: after restrict_output and .to(), every tensor the model owns is on its device, and the
    training forward and backward run on the meta device, where any host read would raise."""
    model = small_model(restricted).to("meta")
    owned = [*model.parameters(), *(b for b in model.buffers() if b is not None)]
    assert owned and all(t.device.type == "meta" for t in owned)
    x = torch.randint(100, 164, (2, 32), device="meta")
    model(x, x).backward()
    assert model.wte.weight.grad.device.type == "meta"


def test_the_pretraining_step_compiles_without_graph_breaks():
    import torch._dynamo
    torch._dynamo.reset()
    model = small_model(restricted=True)
    x = torch.randint(100, 164, (2, 32))
    explained = torch._dynamo.explain(model)(x, x.roll(-1, 1))
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(model, backend="aot_eager")
    assert compiled(x, x.roll(-1, 1)).item() == pytest.approx(model(x, x.roll(-1, 1)).item(), abs=1e-5)


@pytest.mark.parametrize("restricted", [False, True])
def test_the_gpu_loss_branch_has_the_cpu_branchs_loss_and_gradients(monkeypatch, restricted):
    """CUDA's loss (full-shape logits, cross_entropy with ignore_index; faster_loss's full-shape branch when
    restricted) against the CPU's (masked rows skipped, LinearCrossEntropy in chunks): the same loss and gradients,
    with masked targets."""
    monkeypatch.setattr(LinearCrossEntropy, "CHUNK_ELEMENTS", 640)  # several chunks, restricted or not
    chunked = []
    apply = LinearCrossEntropy.apply
    monkeypatch.setattr(LinearCrossEntropy, "apply", lambda *args: chunked.append(1) or apply(*args))
    model = small_model(restricted)
    x = torch.randint(100, 164, (2, 32))
    y = x.roll(-1, 1)
    y[0, :7], y[1, 20:] = -1, -1

    def loss_and_gradients():
        model.zero_grad()
        loss = model(x, y)
        loss.backward()
        return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}

    cpu_loss, cpu_grads = loss_and_gradients()
    monkeypatch.setattr(model_module, "cpu_speedups", lambda x: False)
    gpu_loss, gpu_grads = loss_and_gradients()
    assert chunked == [1]  # the CPU branch chunked, the GPU branch did not
    assert gpu_loss == pytest.approx(cpu_loss, abs=1e-5) and cpu_loss > 1
    for name, grad in gpu_grads.items():
        assert grad.abs().sum() > 0 and torch.allclose(grad, cpu_grads[name], atol=1e-6, rtol=1e-4), name


def test_bf16_autocast_trains_through_the_gpu_loss_branch(gpu_loss_branch):
    """bf16 autocast (as on CUDA) on the CPU: the loss is within 1e-2 of fp32, backward and a fused AdamW step
    work, and the ids restrict_output tied stay tied."""
    model = small_model(restricted=True)
    x = torch.randint(100, 164, (4, 32))
    fp32 = model(x, x.roll(-1, 1)).item()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, x.roll(-1, 1))
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(fp32, abs=1e-2)
    loss.backward()
    optimizer.step()
    weight, rest = model.state_dict()["wte.weight"], model.rest_ids
    assert torch.equal(weight[rest], weight[rest[:1]].expand(len(rest), -1))
    assert model(x, x.roll(-1, 1)).item() < fp32  # the step helped


def test_compiled_fine_tuning_builds_one_graph_per_length_and_evaluates_uncompiled(tmp_path):
    """fit compiles with dynamic=False; fine-tuning batches come in length_buckets' few lengths: one graph for each
    length trained on (a dynamic graph, or one per multiple of 16, would give another count), and none for the
    evaluations, which run the uncompiled model (its no-grad forward would be a graph of its own)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from chat_data import ChatData, encode_conversations, length_buckets
    from test_chat_data import exchanges
    convs = [exchanges(1 + i % 8, start=i) for i in range(64)]  # 8 to 64 tokens
    data = ChatData(encode_conversations(convs, 65), encode_conversations(convs[:6], 65), 64, 4, seed=0, eval_batches=2,
                    buckets=length_buckets(64))
    steps = 6
    trained = {data.batch(step)[0].size(1) for step in range(steps)}
    assert trained <= {16, 32, 64} and len(trained) >= 2
    torch._dynamo.reset()
    counters.clear()
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=64))
    cfg = TrainConfig(out=str(tmp_path / "run"), device="cpu", compile_cpu="aot_eager", max_steps=steps,
                      batch_size=4, eval_every=2, eval_batches=2, save_every=0, log_every=1)
    train.fit(model, cfg, data, {"kind": "finetune"})
    assert counters["stats"]["unique_graphs"] == len(trained)
