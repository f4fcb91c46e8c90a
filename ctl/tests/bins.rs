//! The binaries the process tests run are the ones cargo built from the
//! current sources. This test target is also what `pollen_tests::proc`
//! names to bring them up to date (`cargo test --workspace --no-run --test
//! bins`): any integration test of this package makes cargo build the
//! package's binaries, and a small one keeps that build short.

use std::process::Command;

/// `pollen_tests::proc` hands out exactly the executables cargo built for
/// this test, and they are this version's.
#[test]
fn the_helpers_run_the_binaries_of_this_build() {
    for (name, built, helper) in [
        ("pollen", env!("CARGO_BIN_EXE_pollen"), pollen_tests::proc::pollen_bin()),
        ("pollenctl", env!("CARGO_BIN_EXE_pollenctl"), pollen_tests::proc::pollenctl_bin()),
    ] {
        let same = std::fs::canonicalize(built).expect("cargo's binary exists")
            == std::fs::canonicalize(&helper).expect("the helper's binary exists");
        assert!(same, "{name}: the helpers run {}, cargo built {built}", helper.display());
        let out = Command::new(&helper).arg("--version").output().expect("the binary runs");
        assert!(out.status.success(), "{name} --version: {}", out.status);
        let version = String::from_utf8_lossy(&out.stdout);
        assert_eq!(version.trim(), format!("{name} {}", env!("CARGO_PKG_VERSION")));
    }
}
