//! Finds the system libjpeg-turbo (TurboJPEG API 2.0 or newer) and links it,
//! or builds without it: never a build failure.
//!
//! Found: `cargo:rustc-cfg=tjdecode_linked`, and the crate's FFI is compiled
//! in (`tjdecode::AVAILABLE` is true). Not found: a `cargo:warning` naming the
//! fix, and every call returns [`Error::Unavailable`]; the sidecar then uses
//! its pure-Rust JPEG decoder and says so at start-up.
//!
//! Where it looks, in order:
//! 1. `TURBOJPEG_LIB_DIR` (a non-standard install, e.g. libjpeg-turbo 3.x in
//!    /opt/libjpeg-turbo/lib64);
//! 2. `pkg-config libturbojpeg` when pkg-config is installed;
//! 3. the usual library folders (Debian/Ubuntu multiarch, /usr/lib64,
//!    /usr/local/lib, /usr/lib).
//!
//! `libturbojpeg.a` (Debian's -dev package ships it) is linked statically, so
//! the binary needs no libjpeg-turbo where it runs (a slim container image,
//! another distribution); `TJDECODE_DYNAMIC=1` links the shared library
//! instead. `libturbojpeg.so` (the -dev package's link) is linked as
//! `-lturbojpeg`; with only the runtime's `libturbojpeg.so.0` it is linked by
//! that name.
//! A `turbojpeg.h` beside the library (include/ next to lib/) that lacks
//! `tjGetErrorCode` is TurboJPEG 1.x, which this crate cannot use.
//!
//! `TJDECODE_DISABLE=1` builds without the library even where it exists (to
//! test the fallback). `scripts/setup.sh` touches this file after installing
//! the library, so the next build finds it.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// How to link the library that was found.
struct Found {
    dir: PathBuf,
    /// The library file, watched so that removing it re-runs the detection.
    file: PathBuf,
    /// `-l` argument: `turbojpeg`, or `:libturbojpeg.so.0` style verbatim.
    link: String,
    /// `static` or `dylib`.
    kind: &'static str,
    how: String,
}

fn main() {
    println!("cargo::rustc-check-cfg=cfg(tjdecode_linked)");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=TURBOJPEG_LIB_DIR");
    println!("cargo:rerun-if-env-changed=TJDECODE_DISABLE");
    println!("cargo:rerun-if-env-changed=TJDECODE_DYNAMIC");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");

    if env::var_os("TJDECODE_DISABLE").is_some_and(|v| !v.is_empty() && v != "0") {
        println!("cargo:warning=TJDECODE_DISABLE is set: building without libjpeg-turbo (pure-Rust JPEG decoding, about 2x slower)");
        return;
    }
    let linux = env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    match if linux { find() } else { None } {
        Some(found) => {
            println!("cargo:rerun-if-changed={}", found.file.display());
            println!("cargo:rustc-link-search=native={}", found.dir.display());
            if let Some(name) = found.link.strip_prefix(':') {
                println!("cargo:rustc-link-lib={}:+verbatim={name}", found.kind);
            } else {
                println!("cargo:rustc-link-lib={}={}", found.kind, found.link);
            }
            println!("cargo:rustc-cfg=tjdecode_linked");
            println!("cargo:rustc-env=TJDECODE_FOUND={}", found.how);
        }
        None => {
            println!(
                "cargo:warning=libjpeg-turbo (TurboJPEG 2.x) not found: JPEG frames will be decoded \
                 by the pure-Rust fallback, about 2x slower. Install it (Debian/Ubuntu: \
                 `apt-get install libturbojpeg0-dev`, which scripts/setup.sh does when it can) \
                 and rebuild, or set TURBOJPEG_LIB_DIR."
            );
        }
    }
}

fn find() -> Option<Found> {
    if let Some(dir) = env::var_os("TURBOJPEG_LIB_DIR") {
        let dir = PathBuf::from(dir);
        return in_dir(&dir, "TURBOJPEG_LIB_DIR");
    }
    if let Some(found) = pkg_config() {
        return Some(found);
    }
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = match arch.as_str() {
        "x86_64" => "x86_64-linux-gnu",
        "aarch64" => "aarch64-linux-gnu",
        "arm" => "arm-linux-gnueabihf",
        "x86" => "i386-linux-gnu",
        "powerpc64" => "powerpc64le-linux-gnu",
        "s390x" => "s390x-linux-gnu",
        "riscv64" => "riscv64-linux-gnu",
        _ => "",
    };
    let mut dirs = Vec::new();
    if !multiarch.is_empty() {
        dirs.push(format!("/usr/lib/{multiarch}"));
        dirs.push(format!("/lib/{multiarch}"));
    }
    dirs.extend(
        [
            "/usr/lib64",
            "/usr/local/lib",
            "/usr/local/lib64",
            "/usr/lib",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    dirs.iter()
        .find_map(|d| in_dir(Path::new(d), "the library folders"))
}

/// The library in `dir`, if it is there and usable.
fn in_dir(dir: &Path, how: &str) -> Option<Found> {
    let dynamic = env::var_os("TJDECODE_DYNAMIC").is_some_and(|v| !v.is_empty() && v != "0");
    let (link, file, kind) = if !dynamic && dir.join("libturbojpeg.a").exists() {
        (
            "turbojpeg".to_string(),
            dir.join("libturbojpeg.a"),
            "static",
        )
    } else if dir.join("libturbojpeg.so").exists() {
        (
            "turbojpeg".to_string(),
            dir.join("libturbojpeg.so"),
            "dylib",
        )
    } else if dir.join("libturbojpeg.so.0").exists() {
        (
            ":libturbojpeg.so.0".to_string(),
            dir.join("libturbojpeg.so.0"),
            "dylib",
        )
    } else {
        return None;
    };
    if !header_is_v2(dir) {
        println!(
            "cargo:warning={}: turbojpeg.h there has no tjGetErrorCode (TurboJPEG 1.x); not used",
            dir.display()
        );
        return None;
    }
    Some(Found {
        dir: dir.to_path_buf(),
        file,
        link,
        kind,
        how: format!("{} ({how}, {kind})", dir.display()),
    })
}

/// False only when a header beside the library proves it is TurboJPEG 1.x.
fn header_is_v2(lib_dir: &Path) -> bool {
    let candidates = [
        lib_dir.join("../include/turbojpeg.h"),
        lib_dir.join("../../include/turbojpeg.h"),
        PathBuf::from("/usr/include/turbojpeg.h"),
    ];
    match candidates.iter().find(|p| p.exists()) {
        Some(header) => std::fs::read_to_string(header)
            .map(|text| text.contains("tjGetErrorCode"))
            .unwrap_or(true),
        None => true,
    }
}

fn pkg_config() -> Option<Found> {
    let out = Command::new("pkg-config")
        .args(["--variable=libdir", "libturbojpeg"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = String::from_utf8(out.stdout).ok()?.trim().to_string();
    if dir.is_empty() {
        return None;
    }
    let version = Command::new("pkg-config")
        .args(["--modversion", "libturbojpeg"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .unwrap_or_default();
    let major: u32 = version
        .trim()
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major < 2 {
        println!(
            "cargo:warning=pkg-config reports libturbojpeg {}; 2.0 or newer is needed",
            version.trim()
        );
        return None;
    }
    in_dir(Path::new(&dir), "pkg-config")
}
