"""systemd's notify protocol: one datagram to $NOTIFY_SOCKET (no library needed).

``READY=1`` once the kernel hooks are in place, ``WATCHDOG=1`` from the main loop at half of
``WatchdogSec`` (so a wedged loop, not just a dead process, gets the daemon restarted),
``RELOADING=1``/``READY=1`` around a policy reload, ``STOPPING=1`` on a clean stop. Without
``NOTIFY_SOCKET`` (not under systemd) every call does nothing.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends notifications; ``watchdog_interval_s`` is None when no watchdog is asked for."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # abstract namespace
            address = "\0" + address[1:]
        self._address = address or None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_interval_s = int(usec) / 2e6 if usec.isdigit() and mine else None

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` lines; False when there is no socket or the send failed."""
        if self._address is None:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto("\n".join(fields).encode(), self._address)
            except OSError:
                return False
        return True
