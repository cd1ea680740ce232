# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch, chosen explicitly: DEVICE=cpu (default) or DEVICE=cuda pins the CPU build (+cpu) or the
# CUDA build (+$(CUDA)) of one version; only that build satisfies the pin, so pip never swaps one
# for the other. It comes from TORCH_INDEX (PyTorch's index of that build) or from an index pip is
# already configured with (this project's machines carry the +cpu wheel; an unreachable
# TORCH_INDEX there costs a few retry warnings; torch alone is looked up there, its dependencies
# come with gradlake's). TORCH= keeps the torch you have.
DEVICE      ?= cpu
CUDA        ?= cu128
TORCH_BUILD := $(if $(filter cuda,$(DEVICE)),$(CUDA),$(if $(filter cpu,$(DEVICE)),cpu,\
                 $(error DEVICE must be cpu or cuda, got '$(DEVICE)')))
TORCH       ?= torch==2.13.0+$(TORCH_BUILD)
TORCH_INDEX ?= https://download.pytorch.org/whl/$(TORCH_BUILD)
JOB         ?= jobs/quickstart.toml

.PHONY: install demo test test-well bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q --no-deps '$(TORCH)' $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)))
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
