//! Faults a test injects into a node process to see how it copes, in debug builds only.
//!
//! `WARDEN_FAILPOINT_LOG_WRITES=<path>`: while `<path>` exists, every write to the node's Raft
//! log fails with an I/O error, as on a failing disk. The variable is read once, when the store
//! opens; a release build ignores it (it has no failpoints), so no setting of a production node
//! can break its storage. The test suite builds in debug, and so does the CI chaos run.

use std::path::PathBuf;

/// The variable that arms the log-write failpoint.
pub const LOG_WRITES_ENV: &str = "WARDEN_FAILPOINT_LOG_WRITES";

/// The failpoints armed in this process.
#[derive(Debug, Default)]
pub struct Faults {
    log_writes_fail_while: Option<PathBuf>,
}

impl Faults {
    /// The failpoints the environment arms (none in a release build).
    pub fn from_env() -> Faults {
        #[cfg(debug_assertions)]
        {
            let log_writes_fail_while = std::env::var_os(LOG_WRITES_ENV).map(PathBuf::from);
            if let Some(path) = &log_writes_fail_while {
                tracing::warn!(
                    ?path,
                    "failpoint armed: Raft log writes fail while this file exists"
                );
            }
            Faults {
                log_writes_fail_while,
            }
        }
        #[cfg(not(debug_assertions))]
        Faults::default()
    }

    /// Whether a Raft log write must fail now. Costs a `stat` only when armed.
    pub fn log_write_fails(&self) -> bool {
        self.log_writes_fail_while
            .as_ref()
            .is_some_and(|p| p.exists())
    }
}
