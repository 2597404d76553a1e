#!/usr/bin/env bash
# Packs what a bare lent GPU machine needs for bench/gpu_session.sh. That machine has Python 3.12 and
# torch with CUDA, nothing else, and cannot reach a package index; one call carries at most 64 MiB.
#   .whl/           the wheels of open_clip, timm, DeepSpeed (no ops built), PyAV and their
#                   small dependencies, for CPython 3.12 (carried as `carry: [".whl"]`; installed there
#                   with `pip install --no-index --no-deps --target /tmp/site .whl/*.whl`).
#   .gpu/p1..pN/    DALI from this machine's .venv (its Python 3.12 bindings, nvimgcodec, nvcomp and the
#                   `wds2idx` indexer), as one xz tar split into parts under the carry limit; carry one
#                   part per call, copy it out of the tree (`cp .gpu/pK/* /tmp/parts/`), and on the last
#                   call `cat /tmp/parts/dali.part.* | xz -d | tar -x -C /tmp/site` (dali.sha256 checks it).
# A call carries at most 64 MiB in all, so: call 1 carries .whl, installs it into /tmp/site and runs
# `S4V_SITE=/tmp/site bash bench/gpu_session.sh bench`; calls 2..N+1 carry one DALI part each (call 2
# also runs the `tests` stage); the last joins the parts and runs the `dali` stage. Calls must follow
# each other while the machine is warm: what is outside the tree is lost when it is given back.
# Checked: the parts join (sha256), and with the wheels DALI imports and decodes on CPython 3.12 (a
# VP9 clip, CPU backend). Both folders are git-ignored (.git/info/exclude). Usage: bash bench/pack_for_device.sh [wheels|dali|all]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
SITE=$($PY -c "import site; print(site.getsitepackages()[0])")
PART_BYTES=56400000

wheels() {
  mkdir -p .whl
  local get=($PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
             --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
             -d .whl)
  "${get[@]}" open_clip_torch==3.3.0 timm==1.0.31 ftfy wcwidth hjson \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection av==18.1.0 libcst nvtx \
    astunparse six packaging gast makefun optree
  [ -n "$(ls .whl/deepspeed-*.whl 2>/dev/null)" ] || DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps deepspeed==0.19.8 -w .whl
  ls -1 .whl
}

dali() {
  local tmp
  tmp=$(mktemp -d)
  (cd "$SITE" && tar -c --exclude='__pycache__' --exclude='nvidia/dali/include' \
      --exclude='*.cpython-3[0-9]-*' --exclude='*.cpython-31[013-9]-*' --exclude='*.cpython-31[0-9]t-*' \
      nvidia/dali nvidia_dali_cuda1*.dist-info nvidia/nvimgcodec nvidia_nvimgcodec_*.dist-info \
      nvidia/libnvcomp nvidia_libnvcomp_*.dist-info wds2idx.py) | xz -T2 -9 > "$tmp/dali.tar.xz"
  (cd "$tmp" && sha256sum dali.tar.xz > dali.sha256 && split -b $PART_BYTES -d dali.tar.xz dali.part.)
  rm -rf .gpu/p[0-9]*
  local i=1
  for part in "$tmp"/dali.part.*; do
    mkdir -p ".gpu/p$i"
    mv "$part" ".gpu/p$i/"
    i=$((i + 1))
  done
  echo "DALI: $((i - 1)) parts, one per device call" 
  mv "$tmp/dali.sha256" ".gpu/p$((i - 1))/"
  rm -rf "$tmp"
  ls -l .gpu/p*
}

case "${1:-all}" in
wheels) wheels ;;
dali) dali ;;
all) wheels; dali ;;
*) echo "usage: $0 [wheels|dali|all]" >&2; exit 2 ;;
esac
