#!/usr/bin/env bash
# Builds llama.cpp's own OpenAI-compatible server (llama-server), the peer serve_latency.py
# runs the GGUF specialist against, from the same llama.cpp source that the installed
# llama-cpp-python was built from (its sdist vendors it), so both run the same kernels.
# Output: benchmarks/.work/llama.cpp/llama-server. `make bench-deps` runs it.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-../.venv/bin/python}
OUT=.work/llama.cpp
VERSION=$($PY -c "import llama_cpp; print(llama_cpp.__version__)")
if [ -x "$OUT/llama-server" ] && [ "$(cat "$OUT/VERSION" 2>/dev/null)" = "$VERSION" ]; then
  echo "llama-server $VERSION is built: $OUT/llama-server"; exit 0
fi
SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
$PY -m pip download -q --no-deps --no-binary :all: -d "$SRC" "llama-cpp-python==$VERSION"
tar xzf "$SRC"/llama_cpp_python-"$VERSION".tar.gz -C "$SRC"
LLAMA="$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$LLAMA" -B "$SRC/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >/dev/null
cmake --build "$SRC/build" --target llama-server -j "$(nproc)" >/dev/null
mkdir -p "$OUT"
cp "$SRC/build/bin/llama-server" "$OUT/llama-server"
echo "$VERSION" > "$OUT/VERSION"
echo "built llama-server $VERSION: $OUT/llama-server"
