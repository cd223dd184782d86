#!/usr/bin/env bash
# `make sanitize`: the C speedups built under AddressSanitizer and UndefinedBehaviorSanitizer
# with libFuzzer's coverage (clang), and the runtime that loads them into Python (ASan,
# UBSan and libFuzzer merged, preloaded), into .sanitize/. `make fuzz` runs fuzz/ on them.
set -euo pipefail
cd "$(dirname "$0")/.."
CLANG=${CLANG:-clang-14}
ARCH=$(uname -m)
if ! command -v "$CLANG" >/dev/null 2>&1 || [ ! -e "$("$CLANG" -print-resource-dir 2>/dev/null)/lib/linux/libclang_rt.fuzzer_no_main-$ARCH.a" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "sanitize: installing clang-14 and its runtimes (Debian packages)"
        apt-get install -y -qq --no-install-recommends clang-14 libclang-rt-14-dev >/dev/null 2>&1 || {
            apt-get update -qq >/dev/null
            apt-get install -y -qq --no-install-recommends clang-14 libclang-rt-14-dev >/dev/null
        }
    else
        echo "sanitize: needs $CLANG with its runtimes: apt-get install clang-14 libclang-rt-14-dev" >&2
        exit 1
    fi
fi
RUNTIME="$("$CLANG" -print-resource-dir)/lib/linux"
OUT=.sanitize
mkdir -p "$OUT/lib" "$OUT/build"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# ASan's preinit object would run it before Python: the merged library is preloaded instead.
cp "$RUNTIME/libclang_rt.asan-$ARCH.a" "$scratch/asan.a"
ar d "$scratch/asan.a" asan_preinit.cpp.o asan_preinit.cc.o 2>/dev/null || true
"${CLANG/clang/clang++}" -Wl,--whole-archive "$RUNTIME/libclang_rt.fuzzer_no_main-$ARCH.a" \
    "$scratch/asan.a" -Wl,--no-whole-archive -lpthread -ldl -shared -o "$OUT/asan_with_fuzzer.so"
cd native
CC="$CLANG" LDSHARED="$CLANG -shared" \
SWITCHBOARD_SANITIZE_FLAGS="-fsanitize=address,undefined,fuzzer-no-link -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -O1" \
    ../.venv/bin/python setup.py -q build_ext --force --build-lib "../$OUT/lib" --build-temp "../$OUT/build"
echo "sanitize: $OUT/lib (ASan, UBSan, libFuzzer coverage), $OUT/asan_with_fuzzer.so"
