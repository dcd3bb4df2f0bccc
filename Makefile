# Two commands (see README): `make report` runs the course and builds the report; `make test` checks everything.
# Both create .venv on first use and are idempotent.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ldm_course-installed
PROFILE ?= auto
# Nothing in the tests may reach the network (there is none in CI).
TEST_ENV := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg PYTHONUNBUFFERED=1

.PHONY: venv sync test test-notebooks test-pytest report clean-runs

$(STAMP): setup.py settings.ini
	@test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

# Notebooks are the source: cleaning and exporting them must not change the tree.
# In CI a difference is an error; locally the tree is simply brought in sync.
sync: venv
	$(BIN)/nbdev_clean
	$(BIN)/nbdev_export
	@if [ -n "$$CI" ] && [ -n "$$(git status --porcelain)" ]; then \
	  echo "nbdev_clean + nbdev_export changed the tree: run them and commit notebooks with ldm_course/."; \
	  git status --porcelain; git --no-pager diff --stat; exit 1; fi

test-notebooks: venv
	$(TEST_ENV) $(BIN)/nbdev_test --n_workers 2 --timing

test-pytest: venv
	$(TEST_ENV) $(BIN)/python -m pytest tests/ -q -ra

test: sync test-notebooks test-pytest

report: venv
	$(BIN)/ldm-course run --profile $(PROFILE)
	$(BIN)/ldm-course report --profile $(PROFILE)

# Deletes the runs folder ($LDM_COURSE_RUNS, else runs/): executed notebooks, checkpoints, metrics, figures of every profile.
clean-runs:
	@runs="$${LDM_COURSE_RUNS:-runs}"; \
	if [ -d "$$runs" ]; then \
	  echo "deleting $$runs/ ($$(du -sh "$$runs" | cut -f1): executed notebooks, checkpoints, metrics and figures of $$(ls "$$runs" | tr '\n' ' '))"; \
	  rm -rf "$$runs"; \
	else echo "nothing to delete: $$runs/ does not exist"; fi
