#!/bin/sh
# Runs inside the VM that scripts/vm-test.sh boots (as the oneshot vm-check.service). First boot:
# the README's service commands, then a reboot. Second boot: the checks, then power off. Each
# result is a line "PASS name" or "FAIL name: detail" in /var/log/vm-check.log.
log=/var/log/vm-check.log
result() { # result PASS|FAIL name [detail]
  line="$1 $2${3:+: $3}"
  echo "$line" >> "$log"
  echo "vm-check: $line" > /dev/console
}
check() { # check name command...: PASS when the command succeeds
  name=$1; shift
  if out=$("$@" 2>&1); then result PASS "$name"; else result FAIL "$name" "$(echo "$out" | tail -3 | tr '\n' ' ')"; fi
}
main_pid() { systemctl show -p MainPID --value edgellm; }
wait_active() { # up to $1 s
  i=0
  while [ "$(systemctl is-active edgellm)" != active ]; do
    i=$((i + 1)); [ $i -gt "$1" ] && return 1; sleep 1
  done
}
wait_new_pid() { # wait_new_pid OLD SECONDS: active under another main PID
  i=0
  while :; do
    pid=$(main_pid)
    if [ "$pid" != 0 ] && [ "$pid" != "$1" ] && [ "$(systemctl is-active edgellm)" = active ]; then return 0; fi
    i=$((i + 1)); [ $i -gt "$2" ] && return 1; sleep 1
  done
}
as_tester() { runuser -u tester -- "$@"; }

if [ ! -e /var/lib/vm-check/installed ]; then
  mkdir -p /var/lib/vm-check
  # The README's commands, after scripts/install.sh (which vm-test.sh ran with DESTDIR).
  check "README service commands (sysusers, tmpfiles, daemon-reload, reload dbus, enable --now)" \
    sh -c 'systemd-sysusers && systemd-tmpfiles --create && systemctl daemon-reload && systemctl reload dbus && systemctl enable --now edgellm'
  touch /var/lib/vm-check/installed
  sync
  systemctl reboot
  exit 0
fi

# Second boot: the service came up by itself.
if wait_active 600; then result PASS "systemctl is-active edgellm after boot"; else result FAIL "systemctl is-active edgellm after boot" "$(systemctl status edgellm 2>&1 | tail -5 | tr '\n' ' ')"; fi
check "edgellm --system models as an unprivileged user" sh -c 'runuser -u tester -- edgellm --system models | grep -q "^kjv .*ready"'
check "edgellm --system generate streams as an unprivileged user" \
  sh -c 'out=$(runuser -u tester -- edgellm --system generate --max-new-tokens 16 --temperature 0 "In the beginning" 2>/dev/null) && [ -n "$out" ]'
check "LoadModel refused to the unprivileged user" sh -c 'runuser -u tester -- edgellm --system load kjv-draft 2>&1 | grep -q AccessDenied'
check "LoadModel allowed to root" edgellm --system load kjv-draft

pid=$(main_pid)
printf '\n[[model]]\nname = "kjv-reloaded"\npath = "/var/lib/edgellm/models/kjv-target"\npreload = false\n' >> /etc/edgellm/edgellm.toml
systemctl reload edgellm
i=0
until edgellm --system models 2>/dev/null | grep -q '^kjv-reloaded '; do i=$((i + 1)); [ $i -gt 60 ] && break; sleep 1; done
if [ $i -le 60 ] && [ "$(main_pid)" = "$pid" ]; then result PASS "systemctl reload (SIGHUP) picks up a changed config"; else result FAIL "systemctl reload (SIGHUP) picks up a changed config" "models: $(edgellm --system models 2>&1 | tr '\n' ' ')"; fi

pid=$(main_pid)
kill -KILL "$pid"
if wait_new_pid "$pid" 300; then result PASS "a killed daemon is restarted"; else result FAIL "a killed daemon is restarted" "$(systemctl status edgellm 2>&1 | tail -3 | tr '\n' ' ')"; fi

# The shipped WatchdogSec (60 s) and abort timeout (30 s), shortened for the test.
mkdir -p /run/systemd/system/edgellm.service.d
printf '[Service]\nWatchdogSec=10\nTimeoutAbortSec=10\n' > /run/systemd/system/edgellm.service.d/vm-watchdog.conf
systemctl daemon-reload
systemctl restart edgellm
wait_active 300
pid=$(main_pid)
restarts=$(systemctl show -p NRestarts --value edgellm)
kill -STOP "$pid"
if wait_new_pid "$pid" 300 && journalctl -u edgellm --no-pager | grep -qi "watchdog timeout"; then
  result PASS "the watchdog restarts a daemon stopped with SIGSTOP (restarts $restarts -> $(systemctl show -p NRestarts --value edgellm))"
else
  result FAIL "the watchdog restarts a daemon stopped with SIGSTOP" "$(journalctl -u edgellm --no-pager | tail -3 | tr '\n' ' ')"
fi

systemctl stop edgellm
status=$(systemctl show -p ExecMainStatus --value edgellm)
outcome=$(systemctl show -p Result --value edgellm)
if [ "$status" = 0 ] && [ "$outcome" = success ]; then result PASS "systemctl stop exits cleanly (ExecMainStatus=0)"; else result FAIL "systemctl stop exits cleanly" "ExecMainStatus=$status Result=$outcome"; fi

expected=$(cat /etc/vm-check-expected-score)
score=$(systemd-analyze security edgellm 2>/dev/null | sed -n 's/.*Overall exposure level for edgellm.service: \([0-9.]* [A-Z]*\).*/\1/p')
if [ -n "$score" ] && [ "$score" = "$expected" ]; then result PASS "systemd-analyze security edgellm: $score (the README's)"; else result FAIL "systemd-analyze security edgellm" "got '$score', the README says '$expected'"; fi

sync
systemctl poweroff
