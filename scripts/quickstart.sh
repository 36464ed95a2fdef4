#!/usr/bin/env bash
# Quick start: installs what is missing, builds, starts edgellmd on the bundled model on a
# private D-Bus bus, and streams a real generation through the CLI. Pass a prompt to change it;
# set KEEP=1 to leave the daemon running (the script prints how to reach it).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
prompt=${1:-"And God said, Let there be light"}
bash scripts/ensure-system-packages.sh
bash scripts/setup-runtime.sh
cargo build --release --locked --bins
run=$root/.edgellm/quickstart
mkdir -p "$run"
address="unix:path=$run/bus"
rm -f "$run/bus"
cat > "$run/bus.conf" <<CONF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>session</type><listen>$address</listen>
<policy context="default"><allow user="*"/><allow send_destination="*"/><allow receive_sender="*"/><allow own="*"/></policy></busconfig>
CONF
dbus-daemon --config-file="$run/bus.conf" --fork --print-pid > "$run/bus.pid"
sed "s|^bus = \"session\"|address = \"$address\"|; s|\"\.\./models/|\"$root/models/|" config/edgellm.toml > "$run/edgellm.toml"
target/release/edgellmd --config "$run/edgellm.toml" 2> "$run/edgellmd.log" &
daemon=$!
cleanup() { if [ "${KEEP:-0}" != 1 ]; then kill "$daemon" 2>/dev/null || true; wait "$daemon" 2>/dev/null || true; kill "$(cat "$run/bus.pid")" 2>/dev/null || true; fi; }
trap cleanup EXIT
for _ in $(seq 100); do
  target/release/edgellm --address "$address" models 2>/dev/null | grep -q "^kjv  *ready" && break
  sleep 0.2
done
echo "--- edgellmd is serving org.edgellm.Daemon1 on $address"
target/release/edgellm --address "$address" models
echo "--- edgellm generate --max-new-tokens 48 \"$prompt\""
target/release/edgellm --address "$address" generate --max-new-tokens 48 "$prompt"
if [ "${KEEP:-0}" = 1 ]; then
  echo "--- still running (pid $daemon); try: target/release/edgellm --address '$address' chat 'Who made the heaven?'"
fi
