# `make demo` and `make test` each install what they need into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EPS := 0 2/255 4/255 8/255 16/255 32/255

.PHONY: install demo test clean-venv

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

## Train a small classifier and segmenter on the synthetic sample (replacing an earlier demo run),
## then sweep PGD on the classifier and PGD, SegPGD and CosPGD on the segmenter, with the checklist.
demo: install
	$(PY) train.py --task classification --depth 18 --image-size 64 --epochs 10 --overwrite
	$(PY) main.py --task classification --attack pgd --eps-list $(EPS) --limit 64 --check-limit 32 --overwrite
	$(PY) train.py --task segmentation --depth 18 --image-size 96 --epochs 6 --limit 300 --overwrite
	$(PY) main.py --task segmentation --attack pgd,segpgd,cospgd --eps-list $(EPS) --limit 24 --check-limit 8 --overwrite

test: install
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
