# dsv3lab: `make lab` opens JupyterLab on notebooks/, `make test` runs every test.
# Both create the virtual environment in .venv on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=
# JupyterLab refuses to run as root unless told; containers often are root
JUPYTER_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: setup lab test bench report clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

data/lab-model/config.json: | $(STAMP)
	$(BIN)/python -m dsv3lab train-lab --out data/lab-model

lab: $(STAMP) data/lab-model/config.json
	DSV3LAB_MODEL=$(CURDIR)/data/lab-model $(BIN)/jupyter lab --notebook-dir=notebooks $(JUPYTER_ARGS)

# every test under this CPU's bf16 policy, then the `numerics` ones (tests/conftest.py) under the
# other policy (DSV3LAB_CPU_BF16, dsv3lab/model/layers.py), so either kind of CPU checks both
OTHER_BF16 = $$($(BIN)/python -c "from dsv3lab.model.layers import cpu_bf16_policy as p; \
	print({'native': 'upcast', 'upcast': 'native'}[p()])")

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)
	TRITON_INTERPRET=1 DSV3LAB_CPU_BF16=$(OTHER_BF16) $(BIN)/python -m pytest -q -n 2 -m numerics $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m dsv3lab bench engine
	$(BIN)/python -m dsv3lab bench hooks
	$(BIN)/python -m dsv3lab bench parallel

report: $(STAMP) data/lab-model/config.json
	DSV3LAB_MODEL=$(CURDIR)/data/lab-model MPLBACKEND=Agg $(BIN)/jupyter nbconvert --to html --execute \
	  --output-dir results/report notebooks/*.ipynb

clean:
	rm -rf $(VENV) .pytest_cache
