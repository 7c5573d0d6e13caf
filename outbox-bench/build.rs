//! Records which engine source a benchmark binary was built from: the git
//! revision and a hash of the uncommitted changes to outbox-core and
//! outbox-kafka, so that every result names the engine it measured.

use std::process::Command;

fn git(args: &[&str]) -> Option<Vec<u8>> {
    let out = Command::new("git")
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .ok()?;
    out.status.success().then_some(out.stdout)
}

/// FNV-1a, 64 bits.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn main() {
    for p in [
        "../outbox-core/src",
        "../outbox-kafka/src",
        "../.git/HEAD",
        "../.git/index",
    ] {
        println!("cargo:rerun-if-changed={p}");
    }
    let rev = git(&["rev-parse", "--short=10", "HEAD"])
        .map(|o| String::from_utf8_lossy(&o).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    let diff = git(&["diff", "HEAD", "--", "outbox-core", "outbox-kafka"]);
    let dirty = match diff {
        Some(d) if d.is_empty() => "clean".to_owned(),
        Some(d) => format!("{:016x}", fnv(&d)),
        None => "unknown".to_owned(),
    };
    println!("cargo:rustc-env=OUTBOX_BENCH_GIT={rev}");
    println!("cargo:rustc-env=OUTBOX_BENCH_ENGINE_DIFF={dirty}");
}
