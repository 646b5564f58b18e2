# dsv3lab: `make lab` opens JupyterLab on notebooks/, `make test` runs every test.
# Both create the virtual environment in .venv on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=
# JupyterLab refuses to run as root unless told; containers often are root
JUPYTER_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: setup lab test test-browser bench report clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

# the committed lab model's run (docs/lab-model.md): ~100 minutes on one thread
data/lab-model/config.json: | $(STAMP)
	$(BIN)/python -m dsv3lab train-lab --out data/lab-model --source-code --seq-len 512 --steps 1600 --threads 1 --seed 0

lab: $(STAMP) data/lab-model/config.json
	DSV3LAB_MODEL=$(CURDIR)/data/lab-model $(BIN)/jupyter lab --notebook-dir=notebooks $(JUPYTER_ARGS)

# every test under this CPU's bf16 policy, then the `numerics` ones (tests/conftest.py) under the
# other policy (DSV3LAB_CPU_BF16, dsv3lab/model/layers.py), so either kind of CPU checks both
OTHER_BF16 = $$($(BIN)/python -c "from dsv3lab.model.layers import cpu_bf16_policy as p; \
	print({'native': 'upcast', 'upcast': 'native'}[p()])")

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -rs -n 2 $(PYTEST_ARGS)
	TRITON_INTERPRET=1 DSV3LAB_CPU_BF16=$(OTHER_BF16) $(BIN)/python -m pytest -q -n 2 -m numerics $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m dsv3lab bench engine
	$(BIN)/python -m dsv3lab bench hooks
	$(BIN)/python -m dsv3lab bench parallel

# JupyterLab in headless Chromium (tests/test_browser.py, docs/browser-test.md); `make test` runs
# it too when Chromium is there and says why it skipped otherwise
SUDO = $(if $(filter 0,$(shell id -u)),,sudo )
test-browser: $(STAMP) data/lab-model/config.json
	@if ! test -x /usr/bin/chromium; then \
	  echo "test-browser: /usr/bin/chromium is missing: installing Debian's chromium with apt-get"; \
	  $(SUDO)apt-get update -q && $(SUDO)apt-get install -y -q chromium; \
	fi
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -rs tests/test_browser.py $(PYTEST_ARGS)

# every notebook executed (each on its own, so one failure does not hide the others), rendered to
# results/report/NAME.html; then the README's figures are cut from the executed notebooks into
# docs/figures/ (dsv3lab/viz/report_figures.py)
REPORT_TIMEOUT ?= 900
report: $(STAMP) data/lab-model/config.json
	@rm -rf results/report/executed; mkdir -p results/report/executed; fail=0; \
	for nb in notebooks/*.ipynb; do \
	  echo "report: executing $$nb"; \
	  DSV3LAB_MODEL=$(CURDIR)/data/lab-model MPLBACKEND=Agg TRITON_INTERPRET=1 OMP_NUM_THREADS=1 \
	  $(BIN)/jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=$(REPORT_TIMEOUT) \
	    --ExecutePreprocessor.kernel_name=python3 --output-dir results/report/executed "$$nb" \
	  && $(BIN)/jupyter nbconvert --to html --output-dir results/report "results/report/executed/$$(basename $$nb)" \
	  || { echo "report: $$nb FAILED"; fail=1; }; \
	done; \
	$(BIN)/python -m dsv3lab.viz.report_figures results/report/executed docs/figures || fail=1; \
	echo "report: results/report/*.html"; exit $$fail

clean:
	rm -rf $(VENV) .pytest_cache
