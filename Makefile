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

demo: $(VENV)/.installed
	$(VENV)/bin/gridrunner make $(GRID) --runs $(RUNS)
	$(VENV)/bin/gridrunner submit --grid $(RUNS)/$(basename $(notdir $(GRID))) --shards 2 --executor local --wait
	$(VENV)/bin/gridrunner analyze --grid $(RUNS)/$(basename $(notdir $(GRID)))

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest

clean-demo:
	rm -rf $(RUNS)/$(basename $(notdir $(GRID)))
