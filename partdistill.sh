#!/usr/bin/env bash
# The two set-up commands of README:
#   ./partdistill.sh demo   create the environment on first use, then run the demo pipeline
#   ./partdistill.sh test   create the environment on first use, then run the test suite
# Also: ./partdistill.sh setup (environment only), ./partdistill.sh <any partdistill command ...>
set -euo pipefail
cd "$(dirname "$0")"

VENV=${PARTDISTILL_VENV:-.venv}
TORCH_SPEC=${PARTDISTILL_TORCH:-torch==2.13.0}   # the CPU wheel on this machine's disk
MMCV_SPEC=mmcv==2.1.0                            # mmdet 3.3.0 needs 2.0.0rc4 <= mmcv < 2.2.0
LOGS=.setup-logs
SETUP_VERSION=1

say() { printf '[partdistill setup] %s\n' "$*" >&2; }

# pip here warns about local index folders that are absent; the noise hides what matters.
quiet_pip() {
  "$VENV/bin/pip" "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}

stamp() {
  { echo "$SETUP_VERSION $TORCH_SPEC $MMCV_SPEC"; cat pyproject.toml; } | sha256sum | cut -d' ' -f1
}

find_python() {
  for py in ${PYTHON:-} python3.11 python3.12 python3; do
    if command -v "$py" >/dev/null 2>&1 &&
       "$py" -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] <= (3, 12)))' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  say "need Python 3.11 or 3.12 (set PYTHON=/path/to/python)"; exit 1
}

build_mmcv() {
  # mmcv 2.1.0 has no wheel for this torch: compile it with its C++ ops. pip keeps the built
  # wheel in its cache, so only the first set-up on a machine pays for this.
  local log="$LOGS/mmcv-build.log" start=$SECONDS pid done total
  say "installing $MMCV_SPEC with compiled ops: 10-33 minutes on 2 cores the first time on a"
  say "machine, seconds once pip has the wheel cached. Full log: $log"
  MMCV_WITH_OPS=1 MAX_JOBS=$(nproc) "$VENV/bin/pip" install -v --no-build-isolation --no-deps "$MMCV_SPEC" >"$log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 20
    done=$(grep -oE '\[[0-9]+/[0-9]+\]' "$log" | tail -1 | tr -d '[]' || true)
    if [ -n "$done" ]; then
      say "mmcv: compiled ${done%/*} of ${done#*/} C++ files, $(( (SECONDS - start) / 60 )) min elapsed"
    elif kill -0 "$pid" 2>/dev/null; then
      say "mmcv: $(tail -c 300 "$log" | tr '\n' ' ' | grep -oE '(Collecting|Downloading|Building|Using cached|Running|Processing)[^ ]* [^ ]*' | tail -1 || echo working) ($(( SECONDS - start )) s)"
    fi
  done
  if ! wait "$pid"; then
    say "mmcv build failed; the last lines of $log:"; tail -30 "$log" >&2; exit 1
  fi
}

ensure_env() {
  mkdir -p "$LOGS"
  if [ -f "$VENV/.partdistill-setup" ] && [ "$(cat "$VENV/.partdistill-setup")" = "$(stamp)" ]; then
    return 0
  fi
  local py; py=$(find_python)
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating the virtual environment $VENV with $($py --version)"
    "$py" -m venv "$VENV"
  fi
  say "installing build tools and $TORCH_SPEC"
  quiet_pip install -q --upgrade pip
  quiet_pip install -q "$TORCH_SPEC" 'setuptools<81' ninja wheel numpy
  if "$VENV/bin/python" -c 'import mmcv, mmcv._ext; assert mmcv.__version__ == "2.1.0"' 2>/dev/null; then
    say "mmcv 2.1.0 with compiled ops is already installed"
  else
    build_mmcv
  fi
  say "installing partdistill and its dependencies (prefect, mmdet, zarr, faiss-cpu, ...)"
  "$VENV/bin/pip" install -q -e '.[cpu,dev]' >"$LOGS/pip-install.log" 2>&1 || {
    say "pip install failed; the last lines of $LOGS/pip-install.log:"; tail -30 "$LOGS/pip-install.log" >&2; exit 1; }
  "$VENV/bin/python" -c 'import mmcv._ext, mmdet.models, prefect, zarr, faiss, pydensecrf.densecrf, pycocotools' \
    || { say "the environment does not import cleanly"; exit 1; }
  stamp >"$VENV/.partdistill-setup"
  say "environment ready: $VENV"
}

cmd=${1:-help}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) ensure_env ;;
  demo)
    ensure_env
    rc=0
    "$VENV/bin/partdistill" run configs/demo_partsworld.py "$@" || rc=$?
    # every artifact the demo left must match its manifest, whatever the run's outcome
    "$VENV/bin/partdistill" verify --store store || rc=$?
    exit "$rc" ;;
  test)  ensure_env; exec "$VENV/bin/python" -m pytest "$@" ;;
  help|-h|--help)
    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' ;;
  *)     ensure_env; exec "$VENV/bin/partdistill" "$cmd" "$@" ;;
esac
