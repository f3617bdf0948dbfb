# make setup | phantom | test | bench | demo | benchmark   (run from the repository root)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)/code:$(CURDIR)

.PHONY: setup phantom test bench demo benchmark compare clean-demo

setup: $(VENV)/.installed

# Re-runs only when requirements.txt changes.
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

# FORCE=1 rewrites both (e.g. after an upgrade that changed the phantom: the old folder is refused otherwise).
phantom: setup
	$(PY) code/data/phantom.py $(if $(FORCE),--force)
	$(PY) code/data/preprocess.py --task phantom $(if $(FORCE),--force)

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) bench/bench_data.py
	$(PY) bench/bench_train.py
	$(PY) bench/bench_inference.py
	$(PY) bench/bench_metrics.py

# The main job on the built-in phantom: three seeds of DHC at 20 % labels trained side by side (one thread each),
# test, evaluate, print the table, draw the figures (overlay of a test case, learning curves, per-class Dice bars),
# then segment one raw phantom scan with predict.py (as a new scan would be) and draw it.
P20 := logs/Task_phantom_20p
PHANTOM_RAW  := $(or $(DHC_PHANTOM_RAW),Datasets/Phantom)
PHANTOM_DATA := $(or $(DHC_PHANTOM_DATA),phantom_data)
demo: phantom clean-demo
	@start=$$(date +%s); \
	JOBS=3 PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash train3times_seeds_20p.sh -c 0 -t phantom -m dhc -e '' -l 3e-2 -w 0.1 && \
	$(PY) code/make_table.py --exps $(P20)/dhc --out $(P20)/table && \
	$(PY) code/plot_run.py --exp $(P20)/dhc --out $(P20)/figures && \
	id=$$(head -n 1 $(PHANTOM_DATA)/splits/test.txt) && \
	$(PY) code/predict.py -i $(PHANTOM_RAW)/imagesTr/img$$id.nii.gz -o $(P20)/dhc/predict --task phantom \
	    --exp Task_phantom_20p/dhc/fold1 --cps AB --overwrite && \
	$(PY) code/plot_run.py --scan $(PHANTOM_RAW)/imagesTr/img$$id.nii.gz --pred $(P20)/dhc/predict/img$$id.nii.gz \
	    --label $(PHANTOM_RAW)/labelsTr/label$$id.nii.gz --task phantom --out $(P20)/figures && \
	echo "DHC on the phantom: $$(grep "Final Avg Dice" $(P20)/dhc/evaluation_res.txt) (details: $(P20)/dhc/evaluation_res.txt);" \
	     "training to figures took $$(( $$(date +%s) - start )) s"

# The paper's comparison on the phantom, docs/benchmark/phantom_20p.md: every code/train_<m>.py plus the two bounds
# (fully: labeled-only VNet; fully_all: VNet on every training case) under config.BENCHMARK, JOBS single-threaded
# folds side by side (default 2), then evaluation, table and figures. Hours on a 2-core CPU; rerun to continue
# (finished folds kept, interrupted ones resumed). METHODS="dhc cps" and SEEDS="0" pick a subset.
benchmark: setup
	$(PY) scripts/benchmark.py $(if $(METHODS),--methods $(METHODS)) $(if $(SEEDS),--seeds $(SEEDS)) \
	  --jobs $(or $(JOBS),2)
compare: benchmark

clean-demo:
	rm -rf logs/Task_phantom_20p/dhc
