//! The fuzz targets' committed inputs, replayed on stable as ordinary tests: every corpus entry
//! under `fuzz/corpus/<target>/` and every crash under `fuzz/artifacts/<target>/` must hold the
//! target's invariant (`stepgate::fuzzing`). A crash the fuzzer found stays here after its fix,
//! so it cannot come back.
//!
//! `STEPGATE_WRITE_SEEDS=1 cargo test --test fuzz_corpus` also writes the targets' seeds into
//! their corpora (`scripts/fuzz` does, before fuzzing).

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
};

use sha2::{Digest as _, Sha256};
use stepgate::fuzzing::{TARGETS, Target};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files directly in `dir` (none when it does not exist).
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `target`'s check on every file; the files whose input broke it, with the panic message.
fn replay(target: &Target, files: &[PathBuf]) -> Vec<String> {
    files
        .iter()
        .filter_map(|file| {
            let bytes = std::fs::read(file).expect("reading a corpus file");
            catch_unwind(AssertUnwindSafe(|| (target.check)(&bytes)))
                .err()
                .map(|panic| {
                    let message = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                        .unwrap_or_default();
                    format!("{}: {message}", file.display())
                })
        })
        .collect()
}

#[test]
fn every_committed_corpus_entry_and_crash_holds_its_invariant() {
    let mut failures = Vec::new();
    for target in TARGETS {
        let corpus = files(&fuzz_dir().join("corpus").join(target.name));
        assert!(
            !corpus.is_empty(),
            "fuzz/corpus/{} is empty or missing: run `STEPGATE_WRITE_SEEDS=1 cargo test --test \
             fuzz_corpus` (or scripts/fuzz) to write its seeds",
            target.name
        );
        failures.extend(replay(target, &corpus));
        let crashes = files(&fuzz_dir().join("artifacts").join(target.name));
        failures.extend(replay(target, &crashes));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The name a seed is stored under: its SHA-256, as libFuzzer names inputs by their hash.
fn seed_name(seed: &[u8]) -> String {
    let digest = Sha256::digest(seed);
    format!("seed-{}", &hex(&digest)[..16])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn every_seed_holds_its_invariant() {
    let write = std::env::var_os("STEPGATE_WRITE_SEEDS").is_some();
    for target in TARGETS {
        let dir = fuzz_dir().join("corpus").join(target.name);
        for seed in (target.seeds)() {
            (target.check)(&seed);
            if write {
                std::fs::create_dir_all(&dir).expect("creating a corpus folder");
                std::fs::write(dir.join(seed_name(&seed)), &seed).expect("writing a seed");
            }
        }
    }
}
