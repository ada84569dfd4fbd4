#!/usr/bin/env bash
# Install or uninstall egress-monitor (called by `make install` / `make uninstall`).
#
#   scripts/install.sh install   [DESTDIR=/some/root]
#   scripts/install.sh uninstall [DESTDIR=/some/root] [KEEP_LOGS=1]
#
# Installs exactly (docs/operations.md lists the same):
#   /opt/egress-monitor/venv/            its own virtualenv with the package
#   /opt/egress-monitor/docs/*.md        the documentation the unit points to
#   /etc/systemd/system/egress-monitor.service
#   /etc/egress-monitor/config.yaml      daemon settings (kept if present)
#   /etc/egress-monitor/policy.yaml      the default policy (kept if present)
#   /etc/egress-monitor/policy.d/        drop-in policies
#   /etc/egress-monitor/iocs.yaml        known-bad crates for `scan` and the daemon
#   /etc/logrotate.d/egress-monitor      rotation of the event log
# With no DESTDIR, it also reloads systemd and enables and starts the unit.
set -euo pipefail
action=${1:?usage: install.sh install|uninstall}
here=$(cd "$(dirname "$0")/.." && pwd)
root=${DESTDIR:-}
python=${PYTHON:-python3}
live=$([ -z "$root" ] && [ -d /run/systemd/system ] && echo 1 || echo 0)

install_files() {
  install -d -m 0755 "$root/opt/egress-monitor" "$root/opt/egress-monitor/docs"
  "$python" -m venv "$root/opt/egress-monitor/venv"
  "$root/opt/egress-monitor/venv/bin/pip" install -q "$here"
  install -m 0644 "$here"/docs/*.md "$root/opt/egress-monitor/docs/"
  install -D -m 0644 "$here/systemd/egress-monitor.service" \
    "$root/etc/systemd/system/egress-monitor.service"
  install -d -m 0755 "$root/etc/egress-monitor" "$root/etc/egress-monitor/policy.d"
  [ -e "$root/etc/egress-monitor/config.yaml" ] || \
    install -m 0644 "$here/deploy/config.yaml" "$root/etc/egress-monitor/config.yaml"
  [ -e "$root/etc/egress-monitor/policy.yaml" ] || \
    install -m 0644 "$here/policies/default.yaml" "$root/etc/egress-monitor/policy.yaml"
  install -m 0644 "$here/policies/iocs.yaml" "$root/etc/egress-monitor/iocs.yaml"
  install -D -m 0644 "$here/deploy/logrotate/egress-monitor" "$root/etc/logrotate.d/egress-monitor"
  "$root/opt/egress-monitor/venv/bin/egress-monitor" policy check \
    "$root/etc/egress-monitor/policy.yaml" --dir "$root/etc/egress-monitor/policy.d"
  if [ "$live" = 1 ]; then
    systemctl daemon-reload
    systemctl enable --now egress-monitor.service
  fi
}

uninstall_files() {
  if [ "$live" = 1 ]; then
    systemctl disable --now egress-monitor.service 2>/dev/null || true
  fi
  if [ -z "$root" ] && [ -x /opt/egress-monitor/venv/bin/egress-monitor ]; then
    # A daemon that died leaves its chains and cgroups: remove them (builds carry on).
    /opt/egress-monitor/venv/bin/egress-monitor cleanup || true
  fi
  rm -rf "$root/opt/egress-monitor" "$root/etc/egress-monitor"
  rm -f "$root/etc/systemd/system/egress-monitor.service" "$root/etc/logrotate.d/egress-monitor"
  if [ "${KEEP_LOGS:-0}" != 1 ]; then
    rm -rf "$root/var/log/egress-monitor" "$root/var/lib/egress-monitor"
  fi
  [ "$live" = 1 ] && systemctl daemon-reload || true
}

case "$action" in
  install) install_files ;;
  uninstall) uninstall_files ;;
  *) echo "usage: install.sh install|uninstall" >&2; exit 2 ;;
esac
