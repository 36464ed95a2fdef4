#!/usr/bin/env bash
# Installs the Debian packages edgellm's scripts and tests need, only when missing.
set -euo pipefail
need=()
command -v dbus-daemon >/dev/null || need+=(dbus-daemon)
command -v busctl >/dev/null || need+=(systemd)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v gdbus >/dev/null || need+=(libglib2.0-bin)
command -v dbus-monitor >/dev/null || need+=(dbus-bin)
command -v setpriv >/dev/null || need+=(util-linux)
# The OpenVINO tests run under qemu-x86_64 reporting an Intel CPU where the CPU is not Intel's.
[ "$(uname -m)" != x86_64 ] || command -v qemu-x86_64 >/dev/null || need+=(qemu-user)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  echo "installing: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
