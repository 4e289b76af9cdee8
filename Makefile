# The two commands of the README. Each builds the environment when it is missing.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
RUN    ?= runs/demo
RECIPE ?= mini

.PHONY: demo test env bench clean-demo

env: $(STAMP)

# torch and torchvision first, from the one constraints file, so nothing else can pull an
# unpinned (multi-GB CUDA) build; then the package and its test extras against the same pins.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch torchvision
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/spar-pipeline run --run $(RUN) --recipe $(RECIPE)

# Two pytest workers, one test file each at a time (a file's fixtures are built once). Serially one of the two
# cores idled most of the time (load average 1.0; 41 min 11 s with the older demo test); so, 18 min 19 s.
test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -ra -n 2 --dist loadfile --no-loadscope-reorder --durations=15

bench: $(STAMP)
	$(BIN)/python -m bench all --quick

clean-demo:
	rm -rf $(RUN)
