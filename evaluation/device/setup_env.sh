# Source this on the GPU machine (device tool) before running the evaluation.
# The machine's own torch stays; transformers 5.2 + kvpress 0.5.5 (kvpress needs transformers < 5.3)
# come from the wheels in .whl/ (built here with the recipe in ../shared/DESIGN.md section 7).
# WHEELS: the folder of wheels (default .whl; the SmolLM2 calls carry .whl_quality, the same without torchao
# and optimum-quanto, to leave room for a GGUF part under the 64 MiB carry: evaluation/device/smollm2_sweep.sh).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${WHEELS:-.whl}"/*.whl \
  || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, kvpress; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
