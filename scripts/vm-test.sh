#!/usr/bin/env bash
# edgellm under a real systemd: debootstraps a minimal Debian (systemd, dbus, a Debian kernel)
# into an image, installs edgellm into it with scripts/install.sh (DESTDIR), boots it under
# qemu-system-x86_64 (software emulation: no KVM needed) and runs the checks in
# scripts/vm/check.sh inside the guest: the README's service commands on the first boot, then
# the service after a second boot. Prints each check and ends with "N passed, N failed".
#
# Environment: EDGELLM_VM_DIR (default .edgellm/vm: the cached Debian tree lives there),
# EDGELLM_BIN_DIR (binaries to install; default: a release build), DEBIAN_MIRROR.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${EDGELLM_VM_DIR:-$root/.edgellm/vm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
packages=systemd,systemd-sysv,dbus,udev,kmod,procps,initramfs-tools,linux-image-amd64
started=$(date +%s)
say() { echo "vm-test: [$(( $(date +%s) - started ))s] $*" >&2; }

missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v debugfs >/dev/null || missing+=(e2fsprogs)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null
fi
[ "$(id -u)" = 0 ] || { echo "vm-test: debootstrap needs root (run it with sudo)" >&2; exit 2; }

# The Debian tree, cached between runs: made again only when the suite or packages change.
base=$work/base
stamp="$suite $packages $mirror"
if [ ! -f "$work/base.stamp" ] || [ "$(cat "$work/base.stamp")" != "$stamp" ]; then
  say "debootstrap $suite ($packages) into $base (a few minutes, once)"
  rm -rf "$base" "$work/base.stamp"
  mkdir -p "$work"
  debootstrap --variant=minbase --include="$packages" "$suite" "$base" "$mirror" > "$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  chroot "$base" apt-get clean
  echo "$stamp" > "$work/base.stamp"
else
  say "reusing the Debian tree in $base"
fi

# This run's tree: the base, edgellm installed by install.sh, a user without privileges, and
# the check service.
if [ -z "${EDGELLM_BIN_DIR:-}" ]; then
  say "building the release binaries"
  (cd "$root" && cargo build --release --locked --bins 2>&1 | tail -1 >&2)
  export EDGELLM_BIN_DIR=$root/target/release
fi
tree=$work/run
rm -rf "$tree"
cp -a "$base" "$tree"
say "installing edgellm into the guest with scripts/install.sh"
DESTDIR=$tree EDGELLM_SKIP_BUILD=1 bash "$root/scripts/install.sh" > "$work/install.log"
echo edgellm-vm > "$tree/etc/hostname"
echo "/dev/vda / ext4 rw,errors=remount-ro 0 1" > "$tree/etc/fstab"
chroot "$tree" useradd --create-home --shell /bin/sh tester
install -D -m 0755 "$root/scripts/vm/check.sh" "$tree/usr/local/sbin/vm-check"
# The README's hardening score, for the guest to compare with systemd-analyze's.
sed -n 's/.*\*\*\([0-9.]* [A-Z]*\) in the booted VM\*\*.*/\1/p' "$root/README.md" | head -1 > "$tree/etc/vm-check-expected-score"
cat > "$tree/etc/systemd/system/vm-check.service" <<'EOF'
[Unit]
Description=edgellm checks under systemd
After=multi-user.target edgellm.service
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/vm-check
TimeoutStartSec=infinity
StandardOutput=journal+console
StandardError=journal+console
[Install]
WantedBy=multi-user.target
EOF
ln -sf /etc/systemd/system/vm-check.service "$tree/etc/systemd/system/multi-user.target.wants/vm-check.service"

image=$work/run.img
rm -f "$image"
mkfs.ext4 -q -F -L edgellm-vm -d "$tree" "$image" 3G
kernel=$work/vmlinuz initrd=$work/initrd.img
cp "$(ls "$tree"/boot/vmlinuz-* | sort -V | tail -1)" "$kernel"
cp "$(ls "$tree"/boot/initrd.img-* | sort -V | tail -1)" "$initrd"
rm -rf "$tree"

# Two boots: the first runs the README's install commands and reboots (qemu exits on the reboot:
# -no-reboot), the second checks the service as it comes up at boot.
for boot in 1 2; do
  say "boot $boot of 2 under qemu-system-x86_64 (TCG)"
  timeout 1500 qemu-system-x86_64 -machine q35 -cpu max -smp 2 -m 2048 -nographic -no-reboot -nic none \
    -kernel "$kernel" -initrd "$initrd" -append "root=/dev/vda rw console=ttyS0 panic=-1 quiet" \
    -drive "file=$image,format=raw,if=virtio" > "$work/console-$boot.log" 2>&1 || true
done

results=$(debugfs -R "cat /var/log/vm-check.log" "$image" 2>/dev/null || true)
if [ -z "$results" ]; then
  echo "vm-test: the guest wrote no results; its console is in $work/console-1.log and console-2.log" >&2
  tail -30 "$work/console-2.log" >&2 || true
  echo "0 passed, 1 failed"
  exit 1
fi
echo "$results"
passed=$(grep -c '^PASS' <<<"$results" || true)
failed=$(grep -c '^FAIL' <<<"$results" || true)
say "done"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ] && [ "$passed" -gt 0 ]
