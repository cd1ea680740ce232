# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel this project's machines carry; elsewhere set TORCH= to keep your own torch.
TORCH  ?= torch==2.13.0
JOB    ?= jobs/quickstart.toml

.PHONY: install demo test test-well bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q '$(TORCH)')
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/gradlake run $(JOB)

test: install
	$(PY) -m pytest -q

# The Well's own models (tests/grads/test_grads_well.py) need the_well 1.2.0 and the neuraloperator
# 0.3.0 it pins, which conflict with this project's (fsspec==2024.10.0, neuraloperator>=2): a second
# environment over this one (its packages first, then the project's), installed without dependencies.
WELL_VENV ?= .venv-well
WELL      := the-well==1.2.0 neuraloperator==0.3.0 torch-harmonics==0.6.3 einops 'huggingface-hub<1.0'

$(WELL_VENV)/.installed: $(VENV)/.installed
	$(PY) -m venv $(WELL_VENV)
	echo "import site; site.addsitedir('$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')')" \
		> "$$($(WELL_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/project.pth"
	$(WELL_VENV)/bin/python -m pip install -q --no-deps $(WELL)
	touch $@

test-well: $(WELL_VENV)/.installed
	PYTHONPATH=src $(WELL_VENV)/bin/python -m pytest -q tests/grads/test_grads_well.py

bench: install
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) $(WELL_VENV) runs .pytest_cache
