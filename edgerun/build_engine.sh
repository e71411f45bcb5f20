#!/usr/bin/env bash
# Builds this bundle's TensorRT engine on THIS device: an engine runs only on the GPU and the
# TensorRT version that built it. The script is the same in every bundle; the bundle's own values
# are in engine.env and trtexec_args_trt<major>.txt beside it (export.trt_options.write_build_files).
#   1. find trtexec and the TensorRT version it reports;
#   2. static pre-flight (python3 -m edgerun check): refuse an ONNX this TensorRT cannot build
#      before a long build, not after;
#   3. trtexec with the generated arguments: it builds, then times inference (its summary is the
#      first latency measured on the device);
#   4. python3 -m edgerun record: <engine>.json, so a runtime elsewhere refuses the engine in one line.
# Nothing is read before it is verified against manifest.json: the build files before they are
# sourced, the ONNX file by sha256sum right before trtexec reads it.
set -euo pipefail
cd "$(dirname "$0")"

fail() {
  echo "error: $*" >&2
  exit 1
}

command -v python3 >/dev/null 2>&1 ||
  fail "python3 not found: it verifies the bundle, runs the pre-flight check and records the engine"
[ -f engine.env ] || fail "engine.env missing beside build_engine.sh: regenerate the bundle"
# `python3 -m edgerun...` from this folder runs the bundle's own edgerun; PYTHONPATH is left alone,
# as a folder on it is searched before site-packages from the interpreter's start.
BUILD_FILES=(build_engine.sh engine.env engine_build.json trtexec_args_trt*.txt)
python3 -m edgerun.verify "${BUILD_FILES[@]}" || fail "the bundle's build files do not match manifest.json (above)"
# shellcheck source=/dev/null
. ./engine.env

TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"
[ -x "$TRTEXEC" ] || fail "trtexec not found at $TRTEXEC (set TRTEXEC=/path/to/trtexec)"

# trtexec prints a banner on every run: "&&&& RUNNING TensorRT.trtexec [TensorRT v100300] ..." is 10.3.0.
CODE=$("$TRTEXEC" --help 2>&1 | sed -n 's/.*\[TensorRT v\([0-9][0-9]*\)\].*/\1/p' | head -n 1 || true)
if [ -n "$CODE" ]; then
  VERSION="$((CODE / 10000)).$((CODE / 100 % 100)).$((CODE % 100))"
else
  VERSION=$(python3 -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null || true)
fi
MAJOR="${VERSION%%.*}"
case "$MAJOR" in
  '' | *[!0-9]*) fail "cannot read the TensorRT version from $TRTEXEC --help nor from python3's tensorrt" ;;
esac

REFUSED="TRT${MAJOR}_REFUSED"
[ -z "${!REFUSED:-}" ] || fail "TensorRT $VERSION: ${!REFUSED}"
ARGS_FILE="trtexec_args_trt${MAJOR}.txt"
[ -f "$ARGS_FILE" ] || fail "TensorRT $VERSION is not supported (this bundle builds with TensorRT 10 or 11)"

echo "TensorRT $VERSION: pre-flight check of $ONNX"
python3 -m edgerun check "$ONNX" --trt-major "$MAJOR" ||
  fail "the pre-flight check refused $ONNX for TensorRT $MAJOR (reason above): not building"

# One timing cache per TensorRT version (and device: the cache stays on it).
TIMING_CACHE="${ENGINE%.*}.trt$VERSION.timing-cache"
mapfile -t ARGS <"$ARGS_FILE"
ARGS=("${ARGS[@]//@TIMING_CACHE@/$TIMING_CACHE}")
SHA256=$(python3 -m edgerun.verify --sha256 "$ONNX") || fail "$ONNX does not match manifest.json (above)"
echo "$SHA256  $ONNX" | sha256sum --check --status ||
  fail "$ONNX: its sha256 is not the one manifest.json lists: copy the bundle again"
echo "TensorRT $VERSION (trtexec): building $ENGINE"
"$TRTEXEC" "${ARGS[@]}" || fail "trtexec could not build $ENGINE (its log is above)"

python3 -m edgerun record --onnx "$ONNX" --engine "$ENGINE" --build-info "$BUILD_INFO" --trt-version "$VERSION"
