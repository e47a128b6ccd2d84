# The two commands of the README. Both set up ./.venv on first use, from the lock.
#   make demo   run the demo grid end to end on this machine (make, 2 local workers, analyze)
#   make test   run the test suite (Slurm tests start a one-node cluster when they can; see tests/slurm/)
#   make lock   re-resolve requirements/*.lock from setup.cfg (after changing a dependency)
VENV ?= .venv
LOCK ?= requirements/cpu.lock
# The locks are resolved for CPython 3.11 (Debian 12's python3): other versions would install other wheels.
PYTHON ?= python3.11
LOCK_PYTHON = --python-version 3.11 --python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" -q
GRID ?= grids/demo.yaml
RUNS ?= runs

.PHONY: demo test install clean-demo lock

$(VENV)/.installed: setup.cfg pyproject.toml $(LOCK)
	@command -v $(PYTHON) >/dev/null || { echo "Error: $(PYTHON) not found; the locks are for CPython 3.11 (make PYTHON=/path/to/python3.11 ...)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r $(LOCK)
	$(VENV)/bin/pip install -q --no-deps -e .
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

# The locks: exact versions for CPython 3.11 on x86_64 Linux, one per set of extras (CPU or CUDA TensorFlow).
lock: $(VENV)/.installed
	$(VENV)/bin/pip install -q uv
	$(VENV)/bin/uv pip compile setup.cfg --extra tasks --extra analysis --extra dev $(LOCK_PYTHON) -o requirements/cpu.lock
	$(VENV)/bin/uv pip compile setup.cfg --extra tasks-gpu --extra analysis $(LOCK_PYTHON) -o requirements/gpu.lock
