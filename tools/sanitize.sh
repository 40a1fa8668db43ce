#!/usr/bin/env bash
# Build mmfast._C with AddressSanitizer + UndefinedBehaviorSanitizer and run the kernel tests against it.
#
#   tools/sanitize.sh [pytest args...]
#
# Default: tests/kernels (every kernel against its reference, odd shapes) plus tests/test_index.py and
# tests/reliability/test_threads.py, which drive the same kernels from the runtime objects and from 8
# threads at once.
#
# The sanitized module is built as a wheel into build/sanitize/ (CMake option MMFAST_SANITIZE=ON, its own
# build folder) and loaded for this run only, through a sitecustomize.py that maps `mmfast._C` to it: the
# installed / editable mmfast._C is never replaced, so other processes keep importing the normal build.
# Python is not instrumented, so the sanitizer runtimes are preloaded; leak detection is off (CPython and
# torch keep allocations alive until exit by design). The run's output goes to
# benchmarks/results/sanitizers-cpu.txt and the last line printed is the number of sanitizer reports.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
BUILD=build/sanitize
OUT=${OUT:-benchmarks/results/sanitizers-cpu.txt}
mkdir -p "$BUILD/py" "$(dirname "$OUT")"

# 1. build (scikit-build-core in pip's isolated build env; nothing is installed)
"$PY" -m pip wheel . --no-deps -q -w "$BUILD/wheel" -Cbuild-dir="$BUILD/cmake" \
    -Ccmake.define.MMFAST_SANITIZE=ON -Ccmake.build-type=Debug || { echo "sanitizer build failed"; exit 2; }
SO=$(ls "$BUILD"/cmake/_C*.so | head -1)
[ -f "$SO" ] || { echo "no _C*.so in $BUILD/cmake"; exit 2; }

# 2. this run imports the sanitized module as mmfast._C
cat > "$BUILD/py/sitecustomize.py" <<EOF
import importlib.util, sys

class _SanitizedC:
    def find_spec(self, name, path=None, target=None):
        if name == "mmfast._C":
            return importlib.util.spec_from_file_location(name, "$PWD/$SO")

sys.meta_path.insert(0, _SanitizedC())
EOF

ASAN_LIB=$(gcc -print-file-name=libasan.so)
UBSAN_LIB=$(gcc -print-file-name=libubsan.so)
export LD_PRELOAD="$ASAN_LIB $UBSAN_LIB"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=0:halt_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export PYTHONPATH="$PWD/$BUILD/py${PYTHONPATH:+:$PYTHONPATH}"
[ $# -gt 0 ] || set -- tests/kernels tests/test_index.py tests/reliability/test_threads.py

{
  echo "# mmfast._C under AddressSanitizer + UndefinedBehaviorSanitizer (tools/sanitize.sh)"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
  echo "compiler: $(gcc --version | head -1)"
  echo "flags: -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -O1 -g"
  echo "module: $SO ($(nm -D "$SO" | grep -c '__asan_report') ASan checks, $(nm -D "$SO" | grep -c '__ubsan_handle') UBSan handlers linked)"
  echo "LD_PRELOAD=$LD_PRELOAD"
  echo "ASAN_OPTIONS=$ASAN_OPTIONS"
  echo "UBSAN_OPTIONS=$UBSAN_OPTIONS"
  "$PY" -c "import mmfast._C as c, sys; print('loaded:', c.__file__); sys.exit(0 if c.__file__.endswith('$SO') else 3)" \
      || { echo "the sanitized module was not the one imported"; exit 3; }
  echo "command: $PY -m pytest -q -p no:cacheprovider $*"
  echo
  "$PY" -m pytest -q -p no:cacheprovider "$@"
  echo "pytest exit status: $?"
} > "$OUT" 2>&1
status=$(grep -a '^pytest exit status:' "$OUT" | tail -1 | awk '{print $4}')
reports=$(grep -acE 'ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer' "$OUT")
echo "sanitizer reports: $reports" >> "$OUT"
tail -3 "$OUT"
[ "$reports" = 0 ] && [ "${status:-1}" = 0 ]
