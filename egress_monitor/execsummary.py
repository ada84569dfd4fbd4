"""``egress-monitor exec --summary FILE -- CMD``: run CMD as a build, then write its report.

The launcher forks: the child asks the daemon to make it a build and execs CMD (so CMD is
watched from its first instruction, as with plain ``exec``); the parent stays outside the
build, waits for CMD, waits (bounded) for the daemon's ``build_end`` record of that build in
the events file, and appends the build's report (markdown by default, as
``$GITHUB_STEP_SUMMARY`` wants) to FILE. CMD's exit status is passed through; a report that
cannot be written is said on stderr and never changes the status.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from egress_monitor import control, report

END_WAIT_S = 15.0
POLL_S = 0.1


def _events_from(path: str, offset: int) -> list[str]:
    """Lines of the events file written since ``offset`` (from the start after a rotation)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < offset:
            offset = 0
        f.seek(offset)
        return f.readlines()


def wait_report(path: str, offset: int, build_id: str, timeout_s: float = END_WAIT_S,
                clock: Callable[[], float] = time.monotonic) -> report.BuildReport | None:
    """The build's report once its ``build_end`` is written, or as far as it got."""
    deadline = clock() + timeout_s
    while True:
        records, _bad = report.parse_lines(_events_from(path, offset))
        found = report.build_reports(records, build=build_id)
        if (found and found[0].ended) or clock() >= deadline:
            return found[0] if found else None
        time.sleep(POLL_S)  # a file has no event to await; the daemon writes within a tick


def run(cmd: list[str], runtime_dir: str, summary_path: str, fmt: str = "markdown") -> int:
    """Run ``cmd`` as a build and write its report; returns CMD's exit status."""
    try:
        status = control.call({"op": "status"}, runtime_dir)
    except control.ControlError as exc:
        print(f"egress-monitor exec: not running {cmd[0]} unwatched: {exc}", file=sys.stderr)
        return 125
    events = str(status.get("events") or "")
    offset = os.path.getsize(events) if events not in ("", "-") and os.path.exists(events) \
        else 0
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: becomes the build, then CMD
        os.close(read_fd)
        try:
            answer = control.call({"op": "exec"}, runtime_dir)
        except control.ControlError as exc:
            print(f"egress-monitor exec: not running {cmd[0]} unwatched: {exc}",
                  file=sys.stderr)
            os._exit(125)
        os.write(write_fd, str(answer.get("build", "")).encode())
        os.close(write_fd)
        try:
            os.execvp(cmd[0], cmd)
        except OSError as exc:
            print(f"egress-monitor exec: {cmd[0]}: {exc.strerror}", file=sys.stderr)
        os._exit(126)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as r:
        build_id = r.read(256).decode(errors="replace")
    _pid, wait_status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(wait_status)
    code = 128 - code if code < 0 else code
    if not build_id:
        return code
    if events in ("", "-"):
        print("egress-monitor exec: --summary needs the daemon's events in a file (it writes "
              "them to stdout)", file=sys.stderr)
        return code
    try:
        found = wait_report(events, offset, build_id)
        text = report.render([found] if found else [], fmt)
        with open(summary_path, "a", encoding="utf-8") as out:
            out.write(text if text.endswith("\n") else text + "\n")
    except OSError as exc:
        print(f"egress-monitor exec: cannot make the summary: {exc}", file=sys.stderr)
    return code
