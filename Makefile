# Everything runs from a local virtual environment that `make setup` creates.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch, pinned to the version the tests ran with. Where pip finds a CPU build of it (this project's machines)
# that is what installs; PyPI's Linux wheel of the same pin carries CUDA. Another: e.g. `make setup TORCH=torch`.
TORCH ?= torch==2.13.0

.PHONY: setup test demo chromium clean gpu-reference

setup: $(VENV)/.installed .cache/tiktoken/r50k_base.tiktoken

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

# The GPT-2 BPE file, obtained once so that everything after works offline.
.cache/tiktoken/r50k_base.tiktoken: | $(VENV)/.installed
	$(PY) tokenizer.py --fetch

test: setup
	$(PY) -m pytest -q tests

# The whole pipeline on the built-in data (BENCHMARKS.md, Demo: wall times and the suite's spread over seeds):
# pretrain the tiny preset on the demo corpus, fine-tune it on the demo dialogs, evaluate it on held-out dialogs
# and held-out wordings. SEED=n changes every random choice: the data, the corpus, the initialisation and the order.
# Both training stages run for a wall time, not a step count: the schedule is sized to the steps that fit the
# time (README, the limit rule), so on a slower or busier machine the learning rate still decays to its end and
# the demo still ends in time.
# Pretraining computes its softmax over the token ids of the corpus only (--data_vocab: the same loss, several
# times faster at this size), takes small batches (more steps: the model learns to copy from its context after
# many of them) and keeps the learning rate at its peak for the first half of the steps, then decays it over the
# second half (wsd, --decay_fraction 0.5: at the same steps both seeds tried scored higher than with a decay over
# the last fifth, BENCHMARKS.md "After v4: a longer decay"). The blocks' matrices train with Muon, as the preset's
# do, the embeddings and gains with AdamW: at this batch Muon's orthogonalization costs a quarter of the steps that
# fit the time, and each step learns enough more that each seed tried scored higher on average, the support bot's
# look-ups most of all (BENCHMARKS.md, "Demo v4.3").
# Fine-tuning keeps that restricted softmax (finetune.py) and rehearses: 2 windows of pretraining text in every
# batch keep what pretraining taught (the sums, copying) from being overwritten by the narrow dialogs.
SEED ?= 0
DEMO_PRETRAIN := --preset tiny --data data/demo --out checkpoints/demo-pretrain --data_vocab --seed $(SEED) \
	--batch_size 4 --optimizer muon --muon_lr 0.02 --lr 3e-3 --schedule wsd --warmup_steps 50 --decay_fraction 0.5 \
	--eval_every 400 --save_every 400 --max_time 550
DEMO_FINETUNE := --init checkpoints/demo-pretrain --out checkpoints/demo-chat --data data/demo_chat/train.jsonl \
	--rehearse data/demo --rehearse_rows 2 --seed $(SEED) --lr 1e-3 --batch_size 32 --warmup_steps 50 \
	--eval_every 250 --save_every 250 --eval_batches 4 --max_time 260
demo: setup
	@stage() { name=$$1; shift; echo "== $$name: $$*"; s=$$(date +%s); "$$@" || exit 1; \
		echo "== $$name took $$(( $$(date +%s) - s )) s"; }; \
	rm -rf checkpoints/demo-pretrain checkpoints/demo-chat && \
	stage data $(PY) demo_data.py --out data/demo_chat --seed $(SEED) && \
	stage tokenize $(PY) tokenize_data.py --out data/demo --seed $(SEED) && \
	stage pretrain $(PY) pretrain.py $(DEMO_PRETRAIN) && \
	stage finetune $(PY) finetune.py $(DEMO_FINETUNE) && \
	stage plot $(PY) plot_loss.py checkpoints/demo-pretrain checkpoints/demo-chat --out checkpoints/demo-loss.png && \
	stage evaluate $(PY) evaluate.py checkpoints/demo-chat --seed $(SEED) --data data/demo data/demo_chat/eval.jsonl && \
	echo && echo "Losses: checkpoints/demo-loss.png. Evaluation: checkpoints/demo-chat/eval.md." && \
	echo "Chat with the model: $(PY) serve.py --checkpoint checkpoints/demo-chat  (then open http://127.0.0.1:8000)"

# The GPU reference run (gpu_reference.py; README, GPU): every stage on one GPU in about ten minutes, its report in
# checkpoints/gpu-reference/report. SMOKE=1: the same stages at toy sizes on the CPU. On a GPU machine without
# internet, with the machine's own python and torch: make gpu-reference PY=python3 (no setup), after
# pack_gpu_run.py's carry is unpacked; GPU_REFERENCE_ARGS passes more options (e.g. --data_root, --report, and
# --deadline 540 inside a 600 s call: stages share the time and the report is always written).
gpu-reference: $(if $(filter $(VENV)/bin/python,$(PY)),setup)
	$(PY) gpu_reference.py $(if $(SMOKE),--smoke) $(GPU_REFERENCE_ARGS)

# Optional: Chromium for the web page's browser test (tests/test_serve.py skips it when absent). Debian/Ubuntu, as root.
chromium:
	apt-get update && apt-get install -y chromium

clean:
	rm -rf data checkpoints .pytest_cache
