#!/usr/bin/env bash
# Runs the whole test suite on a fresh Debian/Ubuntu machine with Rust and Python 3:
# installs what is missing (dbus-daemon, systemd-analyze, ONNX Runtime and the reference
# onnxruntime-genai from PyPI into .edgellm/), then `cargo test`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/ensure-system-packages.sh
bash scripts/setup-runtime.sh
cargo test --locked "$@"
