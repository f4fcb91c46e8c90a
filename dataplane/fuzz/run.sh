#!/usr/bin/env bash
# Fuzzes the wire-protocol decoders for a fixed time.
#
#   dataplane/fuzz/run.sh [SECONDS] [libFuzzer args...]     (SECONDS defaults to 30)
#
# Installs cargo-fuzz if it is missing. Uses the nightly toolchain when rustup
# has one; otherwise the default (stable) toolchain with RUSTC_BOOTSTRAP=1,
# because cargo-fuzz passes -Z flags (sanitizer, coverage) to rustc.
#
# SANITIZER (default: none) is passed to `cargo fuzz -s`. The decoders are safe
# Rust, so AddressSanitizer finds nothing that bounds and overflow checks
# (always on here) do not; without it the build is faster and the target runs
# several times more inputs per second. Use SANITIZER=address for unsafe code.
#
# Exits non-zero if the fuzzer finds a crash; the input is saved under
# dataplane/fuzz/artifacts/decode/ and can be replayed with
#   cargo +nightly fuzz run -s none decode <that file>
# (on stable: RUSTC_BOOTSTRAP=1 cargo fuzz run -s none decode <that file>).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

seconds="${1:-30}"
shift || true
case "$seconds" in
  '' | *[!0-9]*) echo "usage: $0 [SECONDS] [libFuzzer args...]" >&2; exit 2 ;;
esac

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi

if rustup run nightly rustc --version >/dev/null 2>&1; then
  cargo=(cargo +nightly)
else
  cargo=(cargo)
  export RUSTC_BOOTSTRAP=1
  # Cargo caches rustc's target probe without regard to RUSTC_BOOTSTRAP; a probe
  # that failed once on plain stable would otherwise fail every later build.
  rm -f target/.rustc_info.json
fi

sanitizer="${SANITIZER:-none}"
mkdir -p corpus/decode
"${cargo[@]}" fuzz build -s "$sanitizer" decode
exec "${cargo[@]}" fuzz run -s "$sanitizer" decode corpus/decode -- \
  -max_total_time="$seconds" -dict="$here/decode.dict" -print_final_stats=1 "$@"
