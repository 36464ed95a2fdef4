//! Tests that cannot run what they test on this machine (no AVX-512 VNNI, no qemu-x86_64, not
//! root) pass, since libtest has no skip; this makes the skip seen. It is said on the terminal
//! (past libtest's capture of a passing test's output) and, where `EDGELLM_SKIPPED_TESTS` names a
//! file, added to it, which scripts/test.sh and .ci/run print at their end.

use std::io::Write;

/// Environment variable naming the file skipped tests are listed in, one a line.
pub const LIST_ENV: &str = "EDGELLM_SKIPPED_TESTS";

#[doc(hidden)]
pub fn report(test: &str, why: &str) {
    let line = format!("skipped: {test}: {why}\n");
    // `std::io::stderr()` directly: eprintln! in a test is captured and shown only on failure.
    let _ = std::io::stderr().write_all(line.as_bytes());
    if let Some(path) = std::env::var_os(LIST_ENV) {
        // One write of one line with O_APPEND: tests on other threads do not interleave.
        if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = file.write_all(line.as_bytes());
        }
    }
}
