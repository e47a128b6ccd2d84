# The two commands of the README. Both set up ./.venv on first use.
#   make demo   run the demo grid end to end on this machine (make, 2 local workers, analyze)
#   make test   run the test suite (Slurm tests start a one-node cluster when they can; see tests/slurm/)
VENV ?= .venv
PIP_EXTRAS ?= tasks,analysis,dev
GRID ?= grids/demo.yaml
RUNS ?= runs

.PHONY: demo test install clean-demo

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[$(PIP_EXTRAS)]'
	touch $@

install: $(VENV)/.installed

DEMO_DIR = $(RUNS)/$(basename $(notdir $(GRID)))

# A second `make demo` keeps the finished grid and only rebuilds the report (`make clean-demo` starts over).
demo: $(VENV)/.installed
	$(VENV)/bin/gridrunner make $(GRID) --runs $(RUNS)
	@if $(VENV)/bin/python -c "import sys; from gridrunner.status import grid_status; sys.exit(not grid_status('$(DEMO_DIR)').finished)"; then \
		echo "$(DEMO_DIR): every row has finished already"; \
	else \
		$(VENV)/bin/gridrunner submit --grid $(DEMO_DIR) --shards 2 --executor local --wait; \
	fi
	$(VENV)/bin/gridrunner analyze --grid $(DEMO_DIR)

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest

clean-demo:
	rm -rf $(DEMO_DIR)
