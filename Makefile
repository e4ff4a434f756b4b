# The two set-up commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
CHECKED := src tests benchmarks examples

.PHONY: demo test lint bench clean

# torch is pinned to the release that is a CPU build on the project's machines, so pip
# does not download a CUDA build of several GB; pyproject.toml keeps torch>=2.6 for users.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# The demo: tokenize the standard library's Python source with a BPE tokenizer trained on it
# (a rerun finds the shards done), then pretrain the gpt task's small model on them.
DEMO_DATA := runs/data/stdlib-bpe4096
DEMO_FILES := --include '*.py' --exclude 'site-packages/*' --exclude 'test/*' --exclude '*/test/*' \
	--exclude '*/tests/*' --exclude '*/idle_test/*'
demo: $(STAMP)
	$(BIN)/linscale preprocess "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')" \
		--out $(DEMO_DATA) --tokenizer bpe --vocab-size 4096 $(DEMO_FILES)
	$(BIN)/linscale train gpt --task.data=$(DEMO_DATA) --train.max_steps=500

lint: $(STAMP)
	$(BIN)/ruff check $(CHECKED)
	$(BIN)/ruff format --check $(CHECKED)

test: lint
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_overhead.py
	$(BIN)/python benchmarks/bench_links.py
	$(BIN)/python benchmarks/bench_scaling.py
	$(BIN)/python benchmarks/bench_preprocess.py
	$(BIN)/python benchmarks/bench_checkpoint.py
	$(BIN)/python benchmarks/bench_images.py
	$(BIN)/python benchmarks/bench_optimizer_step.py
	$(BIN)/python benchmarks/bench_prediction.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
