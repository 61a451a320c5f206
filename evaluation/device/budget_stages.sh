# Sourced by the speed device scripts after they set $stage_root (where each stage's folder goes) and
# $budget (seconds for all their stages); the budget's clock starts here.
# stage SECONDS NAME PROGRAM ARGS...: python3 PROGRAM ARGS under min(SECONDS, what is left of the
# budget), its stderr (warnings dropped) kept as $stage_root/NAME/log.txt; a stage cut short or failing
# loses itself, not the rest; one with under 20 s left is skipped.
start=$SECONDS
stage() {
  local limit=$1 name=$2; shift 2
  local left=$((budget - (SECONDS - start)))
  ((limit > left)) && limit=$left
  if ((limit < 20)); then echo "== $name skipped: ${left}s of the budget left" >&2; return; fi
  mkdir -p "$stage_root/$name"
  echo "== $name (limit ${limit}s) at $((SECONDS - start))s" >&2
  timeout "$limit" python3 "$@" 2> >(grep -vE "Warning|warn|Failed to load" | tee "$stage_root/$name/log.txt" >&2) \
    || echo "== $name ended with status $? at $((SECONDS - start))s" >&2
}
