#!/usr/bin/env bash
# Install or uninstall egress-monitor (called by `make install` / `make uninstall`).
#
#   scripts/install.sh install   [DESTDIR=/some/root] [SYSTEMD=auto|yes|no]
#   scripts/install.sh uninstall [DESTDIR=/some/root] [KEEP_LOGS=1]
#
# Installs exactly (docs/operations.md lists the same), runtime files only:
#   /opt/egress-monitor/venv/            its own virtualenv with the package (no test tools)
#   /opt/egress-monitor/docs/*.md        the documentation the unit points to
#   /usr/local/bin/egress-monitor        a link to the virtualenv's command, so it is on PATH
#   /etc/systemd/system/egress-monitor.service
#   /etc/egress-monitor/config.yaml      daemon settings (kept if present)
#   /etc/egress-monitor/policy.yaml      the default policy (kept if present)
#   /etc/egress-monitor/policy.d/        drop-in policies
#   /etc/egress-monitor/iocs.yaml        known-bad crates for `scan` and the daemon
#   /etc/logrotate.d/egress-monitor      rotation of the event log
# From a `make dist` artifact (a wheelhouse/ beside this script's parent), nothing is fetched
# from any package index.
#
# SYSTEMD=auto (default): with no DESTDIR on a systemd host, reload systemd, enable the unit and
# start it; over a running install (an upgrade) restart it when its files changed. yes: do that
# even with DESTDIR (an image whose systemd is the one on PATH); no: never touch systemd.
set -euo pipefail
action=${1:?usage: install.sh install|uninstall}
here=$(cd "$(dirname "$0")/.." && pwd)
root=${DESTDIR:-}
python=${PYTHON:-python3}
unit=egress-monitor.service
# What the daemon runs with, and nothing else: iptables (its chains, iptables-restore),
# python3-venv (its virtualenv), ca-certificates (Alertmanager over https), logrotate (the
# event log). Test tools belong to `make test` (the Makefile's TEST_APT).
RUNTIME_APT="iptables python3-venv ca-certificates logrotate"
case "${SYSTEMD:-auto}" in
  yes) live=1 ;;
  no) live=0 ;;
  *) live=$([ -z "$root" ] && [ -d /run/systemd/system ] && echo 1 || echo 0) ;;
esac

apt_runtime() {
  [ -z "$root" ] && [ "$(id -u)" = 0 ] && command -v dpkg-query >/dev/null || return 0
  local missing="" p
  for p in $RUNTIME_APT; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || \
      missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    echo "installing:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing \
      >/dev/null
  fi
}

# A digest of everything the running daemon loaded from disk: changed means restart.
runtime_digest() {
  {
    find "$root/opt/egress-monitor/venv/lib" -path '*/site-packages/*' -type f \
      ! -name '*.pyc' -print0 2>/dev/null | sort -z | xargs -0r sha256sum || true
    sha256sum "$root/etc/systemd/system/$unit" 2>/dev/null || true
  } | sha256sum | cut -d' ' -f1
}

install_files() {
  apt_runtime
  local before venv=$root/opt/egress-monitor/venv
  before=$(runtime_digest)
  install -d -m 0755 "$root/opt/egress-monitor" "$root/opt/egress-monitor/docs"
  "$python" -m venv "$venv"
  if [ -d "$here/wheelhouse" ]; then
    # No index at all: the artifact carries every wheel.
    "$venv/bin/pip" install -q --no-index --find-links "$here/wheelhouse" egress-monitor
    "$venv/bin/pip" install -q --no-index --find-links "$here/wheelhouse" --force-reinstall \
      --no-deps egress-monitor
  else
    "$venv/bin/pip" install -q "$here"
    # The same version number with other code is still an upgrade.
    "$venv/bin/pip" install -q --force-reinstall --no-deps "$here"
  fi
  install -m 0644 "$here"/docs/*.md "$root/opt/egress-monitor/docs/"
  install -d -m 0755 "$root/usr/local/bin"
  ln -sfn /opt/egress-monitor/venv/bin/egress-monitor "$root/usr/local/bin/egress-monitor"
  install -D -m 0644 "$here/systemd/$unit" "$root/etc/systemd/system/$unit"
  install -d -m 0755 "$root/etc/egress-monitor" "$root/etc/egress-monitor/policy.d"
  [ -e "$root/etc/egress-monitor/config.yaml" ] || \
    install -m 0644 "$here/deploy/config.yaml" "$root/etc/egress-monitor/config.yaml"
  [ -e "$root/etc/egress-monitor/policy.yaml" ] || \
    install -m 0644 "$here/policies/default.yaml" "$root/etc/egress-monitor/policy.yaml"
  install -m 0644 "$here/policies/iocs.yaml" "$root/etc/egress-monitor/iocs.yaml"
  install -D -m 0644 "$here/deploy/logrotate/egress-monitor" "$root/etc/logrotate.d/egress-monitor"
  "$venv/bin/egress-monitor" policy check \
    "$root/etc/egress-monitor/policy.yaml" --dir "$root/etc/egress-monitor/policy.d"
  echo "egress-monitor $("$venv/bin/egress-monitor" --version | cut -d' ' -f2) installed;" \
    "command: /usr/local/bin/egress-monitor"
  if [ "$live" = 1 ]; then
    systemctl daemon-reload
    systemctl enable --quiet "$unit"
    if ! systemctl is-active --quiet "$unit"; then
      systemctl start "$unit"
      echo "egress-monitor: started $unit"
    elif [ "$before" != "$(runtime_digest)" ]; then
      # Builds carry on through the restart: the new daemon adopts them.
      systemctl restart "$unit"
      echo "egress-monitor: upgraded: its files changed, restarted the running $unit"
    else
      echo "egress-monitor: nothing changed; $unit left running"
    fi
  fi
}

uninstall_files() {
  if [ "$live" = 1 ]; then
    systemctl disable --now "$unit" 2>/dev/null || true
  fi
  if [ -z "$root" ] && [ -x /opt/egress-monitor/venv/bin/egress-monitor ]; then
    # A daemon that died leaves its chains and cgroups: remove them (builds carry on).
    /opt/egress-monitor/venv/bin/egress-monitor cleanup || true
  fi
  if [ "$(readlink "$root/usr/local/bin/egress-monitor" 2>/dev/null)" = \
       /opt/egress-monitor/venv/bin/egress-monitor ]; then
    rm -f "$root/usr/local/bin/egress-monitor"
  fi
  rm -rf "$root/opt/egress-monitor" "$root/etc/egress-monitor"
  rm -f "$root/etc/systemd/system/$unit" "$root/etc/logrotate.d/egress-monitor"
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
