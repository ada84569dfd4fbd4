"""A Cargo workspace of real crates from Debian's ``librust-*-dev`` packages (no network).

    write_workspace(root, "full")    ~150 crates: serde, syn, tokio, clap, ring, openssl-sys,
                                     libz-sys, zstd-sys, lzma-sys, bzip2-sys, libsqlite3-sys...
    write_workspace(root, "small")   ~20 crates for ``make test``: serde_derive, syn, libc,
                                     memchr, libz-sys, anyhow... (a proc macro, build scripts)

Debian unpacks each crate's source under ``/usr/share/cargo/registry`` with the
``.cargo-checksum.json`` a directory source needs; the workspace's ``.cargo/config.toml``
replaces crates.io with that directory, so ``cargo build --offline`` resolves and builds real
published code: real build scripts (probing rustc, compiling C with ``cc``, finding system
libraries with ``pkg-config``) and real proc macros. The members are small crates of our own
that use each dependency in code and in a test, so ``cargo test`` runs too. The apt packages
are the Makefile's ``REALCRATES_APT``; :func:`missing_crates` says what is not unpacked.

:func:`ran_build_scripts` is the ground truth of which build scripts ran: cargo writes
``target/<profile>/build/<package>-<hash>/output`` after it runs a package's build script.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

REGISTRY = Path("/usr/share/cargo/registry")

CONFIG = """\
[source.crates-io]
replace-with = "debian"

[source.debian]
directory = "{registry}"

[net]
offline = true
"""

# member -> (dependencies as Cargo.toml lines, lib.rs text). Each lib has a test that calls
# into every dependency, so `cargo test` links and runs real code of each.
_DERIVE = (
    'serde = { version = "1", features = ["derive"] }\nserde_json = "1"\n',
    """\
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, PartialEq)]
pub struct Record { pub name: String, pub n: u32 }

pub fn roundtrip(r: &Record) -> Record {
    serde_json::from_str(&serde_json::to_string(r).unwrap()).unwrap()
}

#[cfg(test)]
mod tests {
    #[test]
    fn json() {
        let r = super::Record { name: "x".into(), n: 3 };
        assert_eq!(super::roundtrip(&r), r);
    }
}
""")

_MACRO_TOML = ('[lib]\nproc-macro = true\n\n[dependencies]\n'
               'syn = { version = "1", features = ["full"] }\nquote = "1"\nproc-macro2 = "1"\n')
_MACRO = """\
use proc_macro::TokenStream;
use quote::quote;

/// `#[derive(FieldCount)]`: an associated `FIELDS` constant with the struct's field count.
#[proc_macro_derive(FieldCount)]
pub fn field_count(input: TokenStream) -> TokenStream {
    let ast = syn::parse_macro_input!(input as syn::DeriveInput);
    let name = &ast.ident;
    let n = match &ast.data {
        syn::Data::Struct(s) => s.fields.len(),
        _ => 0,
    };
    let span = proc_macro2::Span::call_site();
    let _ = span;
    quote!(impl #name { pub const FIELDS: usize = #n; }).into()
}
"""

_NATIVE_SMALL = (
    'libc = "0.2"\nmemchr = "2"\nanyhow = "1"\nthiserror = "1"\nlog = "0.4"\n'
    'libz-sys = "1"\nrm-macro = { path = "../rm-macro" }\n',
    """\
use rm_macro::FieldCount;

#[derive(FieldCount)]
pub struct Three { pub a: u8, pub b: u8, pub c: u8 }

#[derive(thiserror::Error, Debug)]
#[error("bad input {0}")]
pub struct Bad(pub u32);

pub fn crc(data: &[u8]) -> u32 {
    unsafe { libz_sys::crc32(0, data.as_ptr(), data.len() as libz_sys::uInt) as u32 }
}

pub fn find(hay: &[u8], b: u8) -> Option<usize> { memchr::memchr(b, hay) }

pub fn pid() -> i32 { unsafe { libc::getpid() } }

pub fn check(n: u32) -> anyhow::Result<u32> {
    log::debug!("check {}", n);
    if n == 0 { Err(Bad(n).into()) } else { Ok(n) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn all() {
        assert_eq!(super::Three::FIELDS, 3);
        assert_eq!(super::crc(b"hello"), 0x3610a686);
        assert_eq!(super::find(b"abc", b'c'), Some(2));
        assert!(super::pid() > 0);
        assert!(super::check(0).is_err());
    }
}
""")

_CORE = (
    'serde = { version = "1", features = ["derive"] }\nserde_json = "1"\ntoml = "0.5"\n'
    'anyhow = "1"\nregex = "1"\nitertools = "0.10"\nindexmap = { version = "1", features = '
    '["serde"] }\nhashbrown = "0.12"\nsmallvec = "1"\nbytes = "1"\nonce_cell = "1"\n'
    'lazy_static = "1"\nbitflags = "1"\nhex = "0.4"\nbase64 = "0.13"\nsha2 = "0.10"\n'
    'rand = "0.8"\nurl = "2"\ncrossbeam = "0.8"\nrayon = "1"\nenv_logger = "0.9"\n'
    'clap = { version = "4", features = ["derive"] }\nuuid = { version = "1", features = '
    '["v4"] }\ncsv = "1"\nunicode-segmentation = "1"\ntextwrap = "0.16"\npetgraph = "0.6"\n'
    'rustc-hash = "1"\nnom = "7"\n',
    """\
use clap::Parser;
use rayon::prelude::*;
use sha2::Digest;

#[derive(Parser, Debug)]
pub struct Args { #[arg(long, default_value_t = 2)] pub jobs: u32 }

bitflags::bitflags! { pub struct Flags: u8 { const A = 1; const B = 2; } }

lazy_static::lazy_static! { static ref WORD: regex::Regex = regex::Regex::new(r"\\w+").unwrap(); }
pub static ONCE: once_cell::sync::Lazy<u32> = once_cell::sync::Lazy::new(|| 7);

pub fn words(s: &str) -> usize { WORD.find_iter(s).count() }

pub fn digest(s: &str) -> String { hex::encode(sha2::Sha256::digest(s.as_bytes())) }

pub fn sum_squares(n: u64) -> u64 { (0..n).into_par_iter().map(|x| x * x).sum() }

#[cfg(test)]
mod tests {
    use super::*;
    use itertools::Itertools;
    #[test]
    fn all() {
        assert_eq!(Args::parse_from(["x", "--jobs", "5"]).jobs, 5);
        assert_eq!((Flags::A | Flags::B).bits(), 3);
        assert_eq!(*ONCE, 7);
        assert_eq!(words("two words"), 2);
        assert!(digest("").starts_with("e3b0c442"));
        assert_eq!(sum_squares(4), 14);
        assert_eq!([3, 1, 2].iter().sorted().join(","), "1,2,3");
        let v: toml::Value = toml::from_str("a = 1").unwrap();
        assert_eq!(v["a"].as_integer(), Some(1));
        let mut m = indexmap::IndexMap::new();
        m.insert("k", 1);
        assert_eq!(serde_json::to_string(&m).unwrap(), r#"{"k":1}"#);
        let mut h = hashbrown::HashMap::new();
        h.insert(1, 2);
        let mut sv: smallvec::SmallVec<[u8; 4]> = smallvec::SmallVec::new();
        sv.push(1);
        assert_eq!(bytes::Bytes::from_static(b"ab").len(), 2);
        assert_eq!(base64::encode(b"hi"), "aGk=");
        let _: u8 = rand::random();
        assert_eq!(url::Url::parse("https://example.com/a").unwrap().path(), "/a");
        let (tx, rx) = crossbeam::channel::bounded(1);
        tx.send(1).unwrap();
        assert_eq!(rx.recv().unwrap(), 1);
        let _ = env_logger::builder().is_test(true).try_init();
        assert_eq!(uuid::Uuid::new_v4().get_version_num(), 4);
        let mut r = csv::Reader::from_reader("a,b\\n1,2\\n".as_bytes());
        assert_eq!(r.records().count(), 1);
        use unicode_segmentation::UnicodeSegmentation;
        assert_eq!("ab".graphemes(true).count(), 2);
        assert_eq!(textwrap::wrap("a b", 1).len(), 2);
        let mut g = petgraph::Graph::<u8, ()>::new();
        g.add_node(1);
        let mut fx = rustc_hash::FxHashMap::default();
        fx.insert(1, 1);
        let p: nom::IResult<&str, &str> = nom::bytes::complete::tag("a")("ab");
        assert_eq!(p.unwrap().0, "b");
    }
}
""")

_ASYNC = (
    'tokio = { version = "1", features = ["full"] }\nfutures = "0.3"\n',
    """\
pub async fn add(a: u32, b: u32) -> u32 {
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move { tx.send(a + b).unwrap() });
    rx.await.unwrap()
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn spawn_and_join() {
        let both = futures::future::join(super::add(1, 2), super::add(3, 4)).await;
        assert_eq!(both, (3, 7));
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}
""")

_NATIVE = (
    'ring = "0.16"\nopenssl = "0.10"\nopenssl-sys = "0.9"\nlibz-sys = "1"\n'
    'flate2 = { version = "1", features = ["zlib"], default-features = false }\n'
    'zstd = "0.12"\nzstd-sys = "2"\nxz2 = "0.1"\nlzma-sys = "0.1"\nbzip2 = "0.4"\n'
    'bzip2-sys = "0.1"\nrusqlite = "0.28"\nlibsqlite3-sys = "0.25"\nnix = "0.26"\n'
    'libc = "0.2"\nrm-macro = { path = "../rm-macro" }\n',
    """\
use std::io::{Read, Write};

#[derive(rm_macro::FieldCount)]
pub struct Pair { pub a: u8, pub b: u8 }

pub fn sha256_ring(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data).as_ref().to_vec()
}

pub fn sha256_openssl(data: &[u8]) -> Vec<u8> { openssl::sha::sha256(data).to_vec() }

pub fn gzip_roundtrip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&e.finish().unwrap()[..]).read_to_end(&mut out).unwrap();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn all() {
        assert_eq!(Pair::FIELDS, 2);
        assert_eq!(sha256_ring(b"abc"), sha256_openssl(b"abc"));
        assert_eq!(gzip_roundtrip(b"hello"), b"hello");
        let z = zstd::encode_all(&b"hello"[..], 3).unwrap();
        assert_eq!(zstd::decode_all(&z[..]).unwrap(), b"hello");
        let mut x = Vec::new();
        xz2::read::XzEncoder::new(&b"hello"[..], 6).read_to_end(&mut x).unwrap();
        let mut back = Vec::new();
        xz2::read::XzDecoder::new(&x[..]).read_to_end(&mut back).unwrap();
        assert_eq!(back, b"hello");
        let mut b = Vec::new();
        bzip2::read::BzEncoder::new(&b"hello"[..], bzip2::Compression::fast())
            .read_to_end(&mut b).unwrap();
        let db = rusqlite::Connection::open_in_memory().unwrap();
        let n: i64 = db.query_row("select 40 + 2", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 42);
        assert!(unsafe { libsqlite3_sys::sqlite3_libversion_number() } > 3_000_000);
        assert!(unsafe { zstd_sys::ZSTD_versionNumber() } > 10000);
        assert!(unsafe { lzma_sys::lzma_version_number() } > 0);
        assert!(unsafe { openssl_sys::OpenSSL_version_num() } > 0);
        assert!(!unsafe { libz_sys::zlibVersion() }.is_null());
        let _ = bzip2_sys::BZ_OK;
        assert_eq!(nix::unistd::getpid().as_raw(), unsafe { libc::getpid() });
    }
}
""")

# A member with a build script of its own: C compiled with `cc`, a library found with
# pkg-config, as -sys crates do.
_SHIM_TOML = ('build = "build.rs"\n\n[build-dependencies]\ncc = "1"\npkg-config = "0.3"\n'
              '\n[dependencies]\n')
_SHIM_BUILD = """\
fn main() {
    pkg_config::probe_library("zlib").unwrap();
    cc::Build::new().file("shim.c").compile("shim");
    println!("cargo:rerun-if-changed=shim.c");
}
"""
_SHIM_C = "int shim_add(int a, int b) { return a + b; }\n"
_SHIM = """\
extern "C" { fn shim_add(a: i32, b: i32) -> i32; }

pub fn add(a: i32, b: i32) -> i32 { unsafe { shim_add(a, b) } }

#[cfg(test)]
mod tests {
    #[test]
    fn c_code() { assert_eq!(super::add(2, 3), 5); }
}
"""

SETS: dict[str, dict[str, tuple[str, str]]] = {
    "small": {"rm-derive": _DERIVE, "rm-native": _NATIVE_SMALL},
    "full": {"rm-derive": _DERIVE, "rm-native": _NATIVE, "rm-core": _CORE,
             "rm-async": _ASYNC},
}

# Crates (name-version directories of the registry) each set needs unpacked: a quick check
# that gives the apt package to install instead of cargo's resolution error.
NEEDED = {
    "small": ["serde", "serde_derive", "serde_json", "syn", "quote", "proc-macro2", "libc",
              "memchr", "anyhow", "thiserror", "log", "libz-sys", "cc", "pkg-config"],
    "full": ["tokio", "clap", "ring", "openssl-sys", "openssl", "zstd-sys", "lzma-sys",
             "bzip2-sys", "libsqlite3-sys", "rusqlite", "flate2", "rayon", "regex", "nix"],
}


def missing_crates(which: str, registry: Path = REGISTRY) -> list[str]:
    """Crates of the set with no unpacked source in ``registry`` (empty when ready)."""
    names = NEEDED["small"] + (NEEDED["full"] if which == "full" else [])
    have = {re.sub(r"-[0-9][^-]*(-.*)?$", "", p.name) for p in registry.iterdir()} \
        if registry.is_dir() else set()
    return [n for n in names if n not in have]


def write_workspace(root: Path, which: str = "full", registry: Path = REGISTRY) -> Path:
    """Write the workspace of set ``which`` ("small" or "full") at ``root``; returns root.

    Members: ``rm-macro`` (a proc macro on syn), ``rm-shim`` (a build script compiling C),
    and the set's members using the real crates.
    """
    members = dict(SETS[which])
    root.mkdir(parents=True, exist_ok=True)
    (root / ".cargo").mkdir(exist_ok=True)
    (root / ".cargo" / "config.toml").write_text(CONFIG.format(registry=registry))
    names = ["rm-macro", "rm-shim", *members]
    (root / "Cargo.toml").write_text(
        f'[workspace]\nmembers = {json.dumps(names)}\nresolver = "2"\n')

    def crate(name: str, toml_tail: str, lib: str) -> Path:
        src = root / name / "src"
        src.mkdir(parents=True, exist_ok=True)
        (root / name / "Cargo.toml").write_text(
            f'[package]\nname = "{name}"\nversion = "0.1.0"\nedition = "2021"\n'
            f'publish = false\n{toml_tail}')
        (src / "lib.rs").write_text(lib)
        return root / name

    crate("rm-macro", _MACRO_TOML, _MACRO)
    shim = crate("rm-shim", _SHIM_TOML, _SHIM)
    (shim / "build.rs").write_text(_SHIM_BUILD)
    (shim / "shim.c").write_text(_SHIM_C)
    for name, (deps, lib) in members.items():
        crate(name, "\n[dependencies]\n" + deps, lib)
    return root


def ran_build_scripts(target: Path) -> set[str]:
    """Packages whose build script ran, from the filesystem: every
    ``target/<profile>/build/<package>-<hash>/`` holding the ``output`` cargo writes after
    running it. Hyphens and underscores are kept as the package spells them."""
    found = set()
    for out in target.glob("*/build/*/output"):
        name, _, tail = out.parent.name.rpartition("-")
        if name and re.fullmatch(r"[0-9a-f]{16}", tail):
            found.add(name)
    return found


def norm(name: str) -> str:
    """A package name compared without case and with ``_`` as ``-``."""
    return name.lower().replace("_", "-")


def reported_build_scripts(build_ends: Iterable[Mapping[str, Any]]) -> set[str]:
    """Crate names the daemon says ran a build script, from ``build_end`` summaries (each
    entry ``"name version"`` or a bare name)."""
    return {norm(str(entry).split(" ", 1)[0]) for end in build_ends
            for entry in (end.get("summary") or {}).get("build_scripts") or ()}


def problems(events: Iterable[Mapping[str, Any]], workspace: Path, target: Path,
             builds: int) -> list[str]:
    """What is wrong with a monitored build and test of the workspace, from the daemon's
    events: an alert, a denial (applied or what enforce mode would do), fewer than
    ``builds`` builds of the workspace seen to their end, or a build script that ran (the
    filesystem says) and that no ``build_end`` names. Empty when all is well."""
    out: list[str] = []
    ends = []
    for e in events:
        kind = e.get("type")
        if kind == "alert":
            out.append(f"alert {e.get('kind')}: {e.get('evidence')}")
        elif kind in ("connection", "dns") and e.get("decision") == "deny":
            out.append(f"{kind} denied: {e.get('dst') or e.get('name')} role {e.get('role')}")
        elif kind == "build_end" and (e.get("build") or {}).get("cwd") == str(workspace):
            ends.append(e)
            summary = e.get("summary") or {}
            if summary.get("would_be_denied"):
                out.append(f"build {e['build']['id']}: would_be_denied "
                           f"{summary['would_be_denied']}")
            for role, decisions in (summary.get("connections_by_role") or {}).items():
                if decisions.get("deny"):
                    out.append(f"build {e['build']['id']}: {decisions['deny']} {role} denied")
    if len(ends) < builds:
        out.append(f"{len(ends)} build_end records for {workspace}, expected {builds}")
    truth = {norm(n) for n in ran_build_scripts(target)}
    missing = truth - reported_build_scripts(ends)
    if missing:
        out.append(f"build scripts that ran but no build_end names: {sorted(missing)}")
    return out


def cargo(root: Path, target: Path, *args: str, timeout: float = 900
          ) -> tuple[float, subprocess.CompletedProcess[str]]:
    """``cargo ARGS --offline`` in the workspace with its own target directory; returns the
    wall time and the result (rustup's bin directory first on PATH)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path.home() / '.cargo' / 'bin'}:{env.get('PATH', '')}"
    env.update(CARGO_TARGET_DIR=str(target), CARGO_TERM_COLOR="never")
    exe = shutil.which("cargo", path=env["PATH"])
    if exe is None:
        raise FileNotFoundError("cargo is not installed")
    t0 = time.perf_counter()
    result = subprocess.run([exe, *args, "--offline"], cwd=root, env=env, capture_output=True,
                            text=True, timeout=timeout, check=False)
    return time.perf_counter() - t0, result


def package_count(root: Path) -> int:
    """Packages in the workspace's Cargo.lock (after a build): the crates it compiled."""
    lock = (root / "Cargo.lock").read_text()
    return lock.count("[[package]]")


if __name__ == "__main__":
    which = sys.argv[2] if len(sys.argv) > 2 else "full"
    print(write_workspace(Path(sys.argv[1]), which))
