#!/usr/bin/env bash
# Wall time of README's two set-up commands on a fresh clone of this repo.
#   benchmarks/bench_setup.sh warm   pip's wheel cache as it is (mmcv's wheel cached after the first build)
#   benchmarks/bench_setup.sh cold   an empty pip cache: every wheel downloaded, mmcv compiled from source
set -euo pipefail
mode=${1:-warm}
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/partdistill-bench-setup.XXXXXX)
git clone -q "$repo" "$work/clone"
cd "$work/clone"
if [ "$mode" = cold ]; then export PIP_CACHE_DIR="$work/pip-cache"; fi
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "commit: $(git rev-parse --short HEAD), pip cache: $mode"
t0=$SECONDS; ./partdistill.sh setup >"$work/setup.log" 2>&1; t1=$SECONDS
echo "./partdistill.sh setup: $((t1 - t0)) s"
./partdistill.sh test -q >"$work/test.log" 2>&1 || { tail -20 "$work/test.log"; exit 1; }
t2=$SECONDS
echo "./partdistill.sh test:  $((t2 - t1)) s ($(tail -1 "$work/test.log"))"
rm -rf "$work"
