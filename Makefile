# make setup | phantom | test | bench | demo | compare   (run from the repository root)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)/code:$(CURDIR)

.PHONY: setup phantom test bench demo compare clean-demo

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

# The main job on the built-in phantom: three seeds of DHC at 20 % labels, test, evaluate, print the table, draw
# the figures (overlay of a test case, learning curves, per-class Dice bars) and name them.
P20 := logs/Task_phantom_20p
demo: phantom clean-demo
	@start=$$(date +%s); \
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash train3times_seeds_20p.sh -c 0 -t phantom -m dhc -e '' -l 3e-2 -w 0.1 && \
	$(PY) code/make_table.py --exps $(P20)/dhc --out $(P20)/table && \
	$(PY) code/plot_run.py --exp $(P20)/dhc --out $(P20)/figures && \
	echo "DHC on the phantom: $$(grep "Final Avg Dice" $(P20)/dhc/evaluation_res.txt) (details: $(P20)/dhc/evaluation_res.txt);" \
	     "training to figures took $$(( $$(date +%s) - start )) s"

# Every implemented method (each code/train_<m>.py) on the phantom with the demo's settings and three seeds, then
# one table + chart of all of them ($(P20)/compare.{md,tex,csv,png}). fully = the labeled-only VNet (the 2
# labeled cases), the lower bound the paper's tables start from. A method whose evaluation_res.txt exists is not
# retrained (the demo's dhc is reused; rerun after an interruption to continue); a failing method is reported and
# left out of the table. UNETR++ needs patch sides divisible by 32 (32x64x64 here). COMPARE_METHODS="dhc cps" picks a subset.
COMPARE_METHODS ?= $(patsubst code/train_%.py,%,$(sort $(wildcard code/train_*.py)))
compare: phantom
	@failed=""; for m in $(COMPARE_METHODS); do \
	  if [ -f $(P20)/$$m/evaluation_res.txt ]; then echo "== $$m: evaluated already, kept"; continue; fi; \
	  echo "== $$m"; rm -rf $(P20)/$$m; extra=""; \
	  if [ $$m = dhc_unetrpp ]; then extra="-- --patch_size 32 64 64"; fi; \
	  PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash train3times_seeds_20p.sh -c 0 -t phantom -m $$m -e '' -l 3e-2 -w 0.1 \
	    $$extra || failed="$$failed $$m"; \
	done; \
	done_=$$(for m in $(COMPARE_METHODS); do [ -f $(P20)/$$m/results.json ] && echo $(P20)/$$m; done); \
	$(PY) code/make_table.py --exps $$done_ --out $(P20)/compare; \
	if [ -n "$$failed" ]; then echo "failed (left out of the table):$$failed"; exit 1; fi

clean-demo:
	rm -rf logs/Task_phantom_20p/dhc
