# make setup | phantom | test | bench | demo   (run from the repository root)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)/code:$(CURDIR)

.PHONY: setup phantom test bench demo clean-demo

setup: $(VENV)/.installed

# Re-runs only when requirements.txt changes.
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

phantom: setup
	$(PY) code/data/phantom.py
	$(PY) code/data/preprocess.py --task phantom

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) bench/bench_data.py
	$(PY) bench/bench_train.py
	$(PY) bench/bench_inference.py
	$(PY) bench/bench_metrics.py

# The main job on the built-in phantom: three seeds of DHC at 20 % labels, test, evaluate, print the table.
demo: phantom
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash train3times_seeds_20p.sh -c 0 -t phantom -m dhc -e '' -l 3e-2 -w 0.1
	$(PY) code/make_table.py --exps logs/Task_phantom_20p/dhc --out logs/Task_phantom_20p/table

clean-demo:
	rm -rf logs/Task_phantom_20p/dhc
