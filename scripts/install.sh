#!/usr/bin/env bash
# Installs edgellm system-wide (or into DESTDIR for packaging):
#   $PREFIX/bin/edgellmd, $PREFIX/bin/edgellm
#   $PREFIX/lib/edgellm/            ONNX Runtime and the OpenVINO plugin (from .edgellm/)
#   /etc/edgellm/edgellm.toml       the config (system bus, models below), kept if present
#   /var/lib/edgellm/models/        the bundled models (ProtectHome hides home directories)
#   unit, sysusers.d, tmpfiles.d, D-Bus system policy, activation file, introspection XML
# Environment: DESTDIR, PREFIX (default /usr), EDGELLM_SKIP_BUILD=1 with EDGELLM_BIN_DIR,
# EDGELLM_SKIP_RUNTIME=1, EDGELLM_SKIP_MODELS=1.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/usr}
bin_dir=${EDGELLM_BIN_DIR:-$root/target/release}

if [ "${EDGELLM_SKIP_BUILD:-0}" != 1 ]; then
  (cd "$root" && cargo build --release --locked --bins)
fi
install -d "$DESTDIR$PREFIX/bin"
install -m 0755 "$bin_dir/edgellmd" "$bin_dir/edgellm" "$DESTDIR$PREFIX/bin/"

lib=$PREFIX/lib/edgellm
install -d "$DESTDIR$lib"
if [ "${EDGELLM_SKIP_RUNTIME:-0}" != 1 ]; then
  bash "$root/scripts/setup-runtime.sh"
  rt=$root/.edgellm/runtime
  cp -L "$rt/libonnxruntime.so" "$DESTDIR$lib/libonnxruntime.so"
  cp -L "$rt/libonnxruntime_providers_shared.so" "$DESTDIR$lib/"
  if [ -e "$rt/libonnxruntime_providers_openvino_plugin.so" ]; then
    # The plugin finds its OpenVINO libraries beside itself.
    ov=$(dirname "$(readlink -f "$rt/libonnxruntime_providers_openvino_plugin.so")")
    cp -L "$ov"/*.so* "$DESTDIR$lib/"
  fi
fi

install -d "$DESTDIR/etc/edgellm"
if [ ! -e "$DESTDIR/etc/edgellm/edgellm.toml" ]; then
  sed -e 's|^bus = "session"|bus = "system"|' \
      -e "s|^# library = .*|library = \"$lib/libonnxruntime.so\"|" \
      -e 's|^# admin_group = |admin_group = |' \
      -e 's|path = "../models/|path = "/var/lib/edgellm/models/|' \
      "$root/config/edgellm.toml" > "$DESTDIR/etc/edgellm/edgellm.toml"
  chmod 0644 "$DESTDIR/etc/edgellm/edgellm.toml"
fi
if [ "${EDGELLM_SKIP_MODELS:-0}" != 1 ]; then
  install -d "$DESTDIR/var/lib/edgellm/models"
  for m in kjv-target kjv-draft kjv-hamburger; do
    cp -rL "$root/models/$m" "$DESTDIR/var/lib/edgellm/models/"
  done
fi

sed "s|/usr/bin/edgellmd|$PREFIX/bin/edgellmd|" "$root/systemd/edgellm.service" | install -D -m 0644 /dev/stdin "$DESTDIR$PREFIX/lib/systemd/system/edgellm.service"
install -D -m 0644 "$root/systemd/edgellm.sysusers" "$DESTDIR$PREFIX/lib/sysusers.d/edgellm.conf"
install -D -m 0644 "$root/systemd/edgellm.tmpfiles" "$DESTDIR$PREFIX/lib/tmpfiles.d/edgellm.conf"
install -D -m 0644 "$root/dbus/org.edgellm.Daemon1.conf" "$DESTDIR$PREFIX/share/dbus-1/system.d/org.edgellm.Daemon1.conf"
install -D -m 0644 "$root/dbus/org.edgellm.Daemon1.service" "$DESTDIR$PREFIX/share/dbus-1/system-services/org.edgellm.Daemon1.service"
install -D -m 0644 "$root/dbus/org.edgellm.Daemon1.xml" "$DESTDIR$PREFIX/share/dbus-1/interfaces/org.edgellm.Daemon1.xml"
install -D -m 0644 "$root/README.md" "$DESTDIR$PREFIX/share/doc/edgellm/README.md"
echo "installed into ${DESTDIR:-/}"
if [ -z "$DESTDIR" ]; then
  echo "next: systemd-sysusers; systemd-tmpfiles --create; systemctl daemon-reload; systemctl reload dbus; systemctl enable --now edgellm"
fi
