"""Run the fuzz harnesses of ``tests/fuzz/`` (see README.md there).

    python -m tests.fuzz.run                     # every harness, the default counts
    python -m tests.fuzz.run packets dns_query --inputs 100000 --seed 7
    python -m tests.fuzz.run --binary-inputs 1000000 --yaml-inputs 200000 --jobs 2

Each harness runs in a child process of its own, under a memory bound (RLIMIT_AS) and a
watchdog: before every call the child writes the input and its index to a shared page, so
an input that hangs or kills the child (even inside C code, where no signal handler runs)
is still known and saved. An input slower than ``--slow`` seconds counts as a hang too.
Exceptions outside the harness's ``ALLOWED`` are crashes, grouped by signature (exception
type and the innermost frame in ``egress_monitor``); the first input of each signature is
saved to ``tests/fuzz/regressions/<name>/``. The exit status is 1 when anything was found.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import mmap
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType

from tests.fuzz.mutate import Mutator

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SEEDS = HERE / "seeds"
REGRESSIONS = HERE / "regressions"
MAX_CORPUS = 512
_SHARED = 8 + (1 << 17)  # index (u32), length (u32), input


@dataclass
class Report:
    """What one harness run found."""

    name: str
    inputs: int = 0
    seconds: float = 0.0
    allowed_errors: int = 0
    slowest_s: float = 0.0
    crashes: dict[str, int] = field(default_factory=dict)  # signature -> count
    saved: list[str] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return bool(self.crashes)


def harness_names() -> list[str]:
    """Every ``fuzz_<name>.py`` in this directory, by name."""
    return sorted(p.stem.removeprefix("fuzz_") for p in HERE.glob("fuzz_*.py"))


def load(name: str) -> ModuleType:
    """The harness module ``tests.fuzz.fuzz_<name>``."""
    return importlib.import_module(f"tests.fuzz.fuzz_{name}")


def seeds(name: str) -> list[bytes]:
    """The seed inputs of a harness (``seeds/<name>/*``, by file name)."""
    folder = SEEDS / name
    found = [p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()] \
        if folder.is_dir() else []
    return found or [b""]


def regressions(name: str | None = None) -> list[Path]:
    """Saved inputs, of one harness or all."""
    folders = [REGRESSIONS / name] if name else sorted(REGRESSIONS.glob("*"))
    return sorted(p for d in folders if d.is_dir() for p in d.iterdir() if p.is_file())


def signature(exc: BaseException) -> str:
    """Exception type and the innermost frame of the project's code (else the last)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/egress_monitor/" in f.filename]
    where = (ours or frames)[-1] if (ours or frames) else None
    place = f"{os.path.relpath(where.filename, REPO)}:{where.lineno}" if where else "?"
    return f"{type(exc).__name__} at {place}"


def is_yaml(module: ModuleType) -> bool:
    return getattr(module, "STRUCTURE", "bytes") == "yaml"


def _save(folder: Path, prefix: str, data: bytes) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{prefix}-{hashlib.sha256(data).hexdigest()[:16]}.bin"
    path.write_bytes(data)
    return str(path)


# -- the child ----------------------------------------------------------------------------
def child(name: str, inputs: int, seed: int, slow: float, shared_path: str,
          save_dir: Path) -> Report:
    """Run one harness here and now (the runner calls this in a child process)."""
    module = load(name)
    allowed: tuple[type[BaseException], ...] = module.ALLOWED
    mutator = Mutator(seed, yaml=is_yaml(module), max_len=getattr(module, "MAX_LEN", 1 << 16),
                      dictionary=getattr(module, "DICTIONARY", ()))
    corpus = seeds(name)
    outcomes: set[str] = set()
    report = Report(name)
    fd = os.open(shared_path, os.O_RDWR)
    shared = mmap.mmap(fd, _SHARED)
    started = time.perf_counter()
    for i in range(inputs):
        data = corpus[i] if i < len(corpus) else mutator.mutate(corpus)
        shared[0:8] = i.to_bytes(4, "little") + len(data).to_bytes(4, "little")
        shared[8:8 + len(data)] = data
        t0 = time.perf_counter()
        outcome = "ok"
        try:
            module.target(data)
        except allowed as exc:
            report.allowed_errors += 1
            outcome = type(exc).__name__ + ":" + "".join(
                c for c in str(exc)[:24] if not c.isdigit())
        except Exception as exc:  # everything else is what we are looking for
            sig = signature(exc)
            outcome = sig
            if sig not in report.crashes:
                report.saved.append(_save(save_dir / name, "crash", data))
            report.crashes[sig] = report.crashes.get(sig, 0) + 1
        elapsed = time.perf_counter() - t0
        report.slowest_s = max(report.slowest_s, elapsed)
        if elapsed > slow:
            sig = f"slow (> {slow} s)"
            if sig not in report.crashes:
                report.saved.append(_save(save_dir / name, "slow", data))
            report.crashes[sig] = report.crashes.get(sig, 0) + 1
        if outcome not in outcomes and len(corpus) < MAX_CORPUS:
            outcomes.add(outcome)  # a new kind of result: worth mutating further
            corpus.append(data)
        report.inputs = i + 1
    report.seconds = time.perf_counter() - started
    shared.close()
    os.close(fd)
    return report


# -- the parent ---------------------------------------------------------------------------
def run_one(name: str, inputs: int, seed: int = 0, *, slow: float = 0.5, hang: float = 10.0,
            memory_mb: int = 2048, save_dir: Path = REGRESSIONS) -> Report:
    """Run a harness in a child process under the memory bound and the watchdog."""
    with tempfile.NamedTemporaryFile(prefix="fuzz-", suffix=".shm") as shm:
        shm.truncate(_SHARED)
        shm.flush()
        argv = [sys.executable, "-m", "tests.fuzz.run", "--child", name, "--inputs",
                str(inputs), "--seed", str(seed), "--slow", str(slow), "--memory-mb",
                str(memory_mb), "--shared", shm.name, "--save-dir", str(save_dir)]
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
        fd = os.open(shm.name, os.O_RDONLY)
        shared = mmap.mmap(fd, _SHARED, prot=mmap.PROT_READ)
        last, since = -1, time.monotonic()
        try:
            while proc.poll() is None:
                time.sleep(0.2)
                index = int.from_bytes(shared[0:4], "little")
                if index != last:
                    last, since = index, time.monotonic()
                elif time.monotonic() - since > hang:
                    proc.kill()
                    proc.wait()
                    break
            out = proc.stdout.read() if proc.stdout else ""
            if proc.returncode == 0 and out.strip():
                return Report(**json.loads(out.strip().splitlines()[-1]))
            # Killed by the watchdog, the memory bound or a signal: the shared page holds
            # the input it was working on.
            length = int.from_bytes(shared[4:8], "little")
            data = bytes(shared[8:8 + length])
            why = "hang" if proc.returncode == -9 else f"child died ({proc.returncode})"
            return Report(name, inputs=last + 1, crashes={why: 1},
                          saved=[_save(save_dir / name, "hang", data)])
        finally:
            shared.close()
            os.close(fd)
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="harnesses (default: all)")
    p.add_argument("--inputs", type=int, help="inputs per harness (overrides the two below)")
    p.add_argument("--binary-inputs", type=int, default=20_000)
    p.add_argument("--yaml-inputs", type=int, default=2_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slow", type=float, default=0.5, help="seconds that make a hang")
    p.add_argument("--memory-mb", type=int, default=2048, help="address space bound")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--save-dir", type=Path, default=REGRESSIONS)
    p.add_argument("--json", action="store_true", help="one JSON report per line")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--shared", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        limit = args.memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        report = child(args.child, args.inputs, args.seed, args.slow, args.shared,
                       args.save_dir)
        print(json.dumps(asdict(report)))
        return 0
    names = args.names or harness_names()
    unknown = set(names) - set(harness_names())
    if unknown:
        p.error(f"no harness named {', '.join(sorted(unknown))}")

    def count(name: str) -> int:
        if args.inputs is not None:
            return int(args.inputs)
        return int(args.yaml_inputs if is_yaml(load(name)) else args.binary_inputs)

    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        reports = list(pool.map(lambda n: run_one(n, count(n), args.seed, slow=args.slow,
                                                  memory_mb=args.memory_mb,
                                                  save_dir=args.save_dir), names))
    for r in reports:
        if args.json:
            print(json.dumps(asdict(r)))
            continue
        rate = r.inputs / r.seconds if r.seconds else 0
        print(f"{r.name:16} {r.inputs:>9} inputs {r.seconds:8.1f} s {rate:9.0f}/s  "
              f"slowest {r.slowest_s * 1000:7.1f} ms  documented errors {r.allowed_errors:>8}"
              f"  crashes {sum(r.crashes.values())}")
        for sig, n in sorted(r.crashes.items()):
            print(f"    {n:>7} x {sig}")
        for path in r.saved:
            print(f"    saved {os.path.relpath(path, REPO)}")
    return 1 if any(r.found for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
