"""What `make install` puts on a runner: runtime packages only, without recommends."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).parents[2]
SCRIPT = (REPO / "scripts" / "install.sh").read_text()
MAKEFILE = (REPO / "Makefile").read_text()


def make_variable(name: str) -> set[str]:
    m = re.search(rf"^{name} := ((?:.*\\\n)*.*)$", MAKEFILE, re.M)
    assert m, f"no {name} in the Makefile"
    return set(m.group(1).replace("\\\n", " ").split())


def test_the_install_scripts_apt_list_holds_no_test_only_package() -> None:
    m = re.search(r'^RUNTIME_APT="([^"]*)"$', SCRIPT, re.M)
    assert m
    runtime = set(m.group(1).split())
    test_only = make_variable("TEST_APT")
    assert runtime and test_only
    assert not runtime & test_only, runtime & test_only
    assert "iptables" in runtime  # the daemon's own chains
    # `make test` installs both; the Makefile reads the runtime list from the script.
    assert "$(RUNTIME_APT) $(TEST_APT)" in MAKEFILE


def test_apt_never_pulls_recommends_and_make_install_installs_no_test_packages() -> None:
    for text in (SCRIPT, MAKEFILE):
        for line in re.findall(r"apt-get install[^\n]*", text.replace("\\\n", " ")):
            assert "--no-install-recommends" in line, line
    install = re.search(r"^install:(.*)$", MAKEFILE, re.M)
    assert install and install.group(1).split() == []  # not `apt`, which is the test list


def test_make_path_links_the_checkouts_command_onto_path(tmp_path: Path) -> None:
    import os
    import subprocess

    bindir = tmp_path / "bin"
    bindir.mkdir()
    subprocess.run(["make", "-s", "path", f"BINDIR={bindir}"], cwd=REPO, check=True,
                   timeout=120, capture_output=True)
    link = bindir / "egress-monitor"
    assert os.readlink(link) == str(REPO / ".venv" / "bin" / "egress-monitor")
    out = subprocess.run(["egress-monitor", "--version"], capture_output=True, text=True,
                         check=True, env=dict(os.environ, PATH=str(bindir))).stdout
    assert out.startswith("egress-monitor ")
    # An installed command there is left alone (INSTALLED: where `make install` puts it).
    installed = tmp_path / "opt-egress-monitor"
    installed.write_text("#!/bin/sh\n")
    link.unlink()
    link.symlink_to(installed)
    out = subprocess.run(["make", "-s", "path", f"BINDIR={bindir}", f"INSTALLED={installed}"],
                         cwd=REPO, check=True, timeout=120, capture_output=True,
                         text=True).stdout
    assert "is the installed one" in out
    assert os.readlink(link) == str(installed)
