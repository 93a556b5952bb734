//! hvmctl's one error type, and the exit status each kind of failure gives. `main` is the
//! only place an exit status is chosen; the table is in `hvmctl --help`, the man page and
//! the README:
//!
//! | status | meaning |
//! |---|---|
//! | 0 | done |
//! | 1 | the agent (or the backup host, or the array) refused, or the operation failed; the message says why |
//! | 2 | usage: a bad argument or input (clap's own errors also exit 2) |
//! | 3 | the agent cannot be reached on its control socket, or answered garbage |
//! | 4 | a deadline passed: a backup's freeze deadline (everything was thawed and rolled back), or `pair wait --timeout` |
//! | 5 | `verify` found legs that differ and did not repair them |

/// Why hvmctl failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request was refused or the operation failed.
    #[error("{0}")]
    Failed(String),
    /// A bad argument or input.
    #[error("{0}")]
    Usage(String),
    /// The control socket cannot be reached, or the reply is not HTTP.
    #[error("{0}")]
    Unreachable(String),
    /// A deadline passed.
    #[error("{0}")]
    Deadline(String),
    /// `verify` found legs that differ (the report is printed).
    #[error("{0}")]
    Differ(String),
    /// A command that printed its own messages (the backup policy runner) failed with
    /// this kind; nothing more to say.
    #[error("")]
    Reported(Box<Error>),
}

impl Error {
    /// The exit status (see the module's table).
    pub fn exit_status(&self) -> u8 {
        match self {
            Error::Failed(_) => 1,
            Error::Usage(_) => 2,
            Error::Unreachable(_) => 3,
            Error::Deadline(_) => 4,
            Error::Differ(_) => 5,
            Error::Reported(e) => e.exit_status(),
        }
    }

    /// The same error, its message prefixed by the command it came from
    /// (`backup run: ...`).
    pub fn during(self, what: &str) -> Error {
        let at = |m: String| format!("{what}: {m}");
        match self {
            Error::Failed(m) => Error::Failed(at(m)),
            Error::Usage(m) => Error::Usage(at(m)),
            Error::Unreachable(m) => Error::Unreachable(at(m)),
            Error::Deadline(m) => Error::Deadline(at(m)),
            Error::Differ(m) => Error::Differ(at(m)),
            e @ Error::Reported(_) => e,
        }
    }

    /// A rate argument that is not one.
    pub fn not_a_rate(s: &str) -> Error {
        Error::Usage(format!(
            "{s:?} is not a rate (bytes per second, e.g. 100M, 1G, 0)"
        ))
    }
}

/// What hvmctl's commands return.
pub type Result<T = ()> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_has_its_documented_status() {
        let m = || "x".to_string();
        let all = [
            (Error::Failed(m()), 1),
            (Error::Usage(m()), 2),
            (Error::Unreachable(m()), 3),
            (Error::Deadline(m()), 4),
            (Error::Differ(m()), 5),
            (Error::Reported(Box::new(Error::Usage(m()))), 2),
        ];
        for (e, status) in all {
            assert_eq!(e.during("backup run").exit_status(), status);
        }
        assert_eq!(
            Error::Failed(m()).during("backup run").to_string(),
            "backup run: x"
        );
    }
}
