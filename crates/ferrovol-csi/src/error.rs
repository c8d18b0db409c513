//! The driver's error type, and the one place where errors become gRPC codes.
//!
//! Engines and services speak in terms of *what went wrong* (a missing volume,
//! a conflicting name, a full pool); which CSI status code that means is
//! decided here only, so the spec's error table is applied consistently.

use std::fmt;
use std::io;

use tonic::{Code, Status};

/// What went wrong, in CSI terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The request itself is malformed or asks for something never possible.
    InvalidArgument(String),
    /// A volume, snapshot, group or path the request names does not exist.
    NotFound(String),
    /// The name is taken by an object created with incompatible arguments.
    AlreadyExists(String),
    /// Another operation on the same name or ID is in flight; retry later.
    Aborted(String),
    /// The object is in a state that forbids the call (e.g. still published).
    FailedPrecondition(String),
    /// A size outside what this engine can ever provide.
    OutOfRange(String),
    /// Not enough space (or another resource) right now.
    ResourceExhausted(String),
    /// The call is not supported by this driver or engine.
    Unimplemented(String),
    /// The backend cannot be reached or is not ready; retrying may help.
    Unavailable(String),
    /// The credentials were refused (a wrong key, an unknown user).
    Unauthenticated(String),
    /// The credentials are accepted but may not do this (missing caps).
    PermissionDenied(String),
    /// A bug or an unexpected system failure.
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::Aborted(_) => Code::Aborted,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Unimplemented(_) => Code::Unimplemented,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Internal(_) => Code::Internal,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Error::InvalidArgument(m)
            | Error::NotFound(m)
            | Error::AlreadyExists(m)
            | Error::Aborted(m)
            | Error::FailedPrecondition(m)
            | Error::OutOfRange(m)
            | Error::ResourceExhausted(m)
            | Error::Unimplemented(m)
            | Error::Unavailable(m)
            | Error::Unauthenticated(m)
            | Error::PermissionDenied(m)
            | Error::Internal(m) => m,
        }
    }

    /// Wraps an I/O error with what we were doing. A full disk or quota is
    /// RESOURCE_EXHAUSTED (the CO may retry elsewhere or later); a read-only
    /// filesystem is UNAVAILABLE (nothing wrong with the request; retrying
    /// once it is writable again works); everything else is INTERNAL,
    /// because callers decide NOT_FOUND themselves.
    pub fn io(context: impl fmt::Display, err: io::Error) -> Error {
        let msg = format!("{context}: {err}");
        if is_no_space(&err) {
            return Error::ResourceExhausted(msg);
        }
        match rustix::io::Errno::from_io_error(&err) {
            Some(rustix::io::Errno::ROFS) => Error::Unavailable(msg),
            _ => Error::Internal(msg),
        }
    }
}

/// A full disk or an exhausted quota.
pub fn is_no_space(err: &io::Error) -> bool {
    matches!(
        rustix::io::Errno::from_io_error(err),
        Some(rustix::io::Errno::NOSPC | rustix::io::Errno::DQUOT)
    )
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code(), self.message())
    }
}

impl std::error::Error for Error {}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        Status::new(e.code(), e.message().to_string())
    }
}

impl Error {
    /// What another CSI endpoint answered (the relay's node agents), kept
    /// as it was where our codes have it. A transport failure (a dropped
    /// link, a deadline, a cancelled call, an unknown answer) is
    /// UNAVAILABLE: retrying may reach the node again. Codes no CSI
    /// driver answers are INTERNAL.
    pub fn from_status(status: &Status, context: impl fmt::Display) -> Error {
        let msg = match status.message() {
            "" => format!("{context}: {}", code_name(status.code())),
            m => format!("{context}: {m}"),
        };
        match status.code() {
            Code::InvalidArgument => Error::InvalidArgument(msg),
            Code::NotFound => Error::NotFound(msg),
            Code::AlreadyExists => Error::AlreadyExists(msg),
            Code::Aborted => Error::Aborted(msg),
            Code::FailedPrecondition => Error::FailedPrecondition(msg),
            Code::OutOfRange => Error::OutOfRange(msg),
            Code::ResourceExhausted => Error::ResourceExhausted(msg),
            Code::Unimplemented => Error::Unimplemented(msg),
            Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled => {
                Error::Unavailable(msg)
            }
            Code::Unauthenticated => Error::Unauthenticated(msg),
            Code::PermissionDenied => Error::PermissionDenied(msg),
            Code::Ok | Code::Internal | Code::DataLoss => Error::Internal(msg),
        }
    }
}

/// Shorthand constructors that read well at call sites.
macro_rules! err_ctor {
    ($($fn_name:ident => $variant:ident),* $(,)?) => {
        $(
            pub fn $fn_name(msg: impl Into<String>) -> Error {
                Error::$variant(msg.into())
            }
        )*
    };
}

err_ctor! {
    invalid => InvalidArgument,
    not_found => NotFound,
    already_exists => AlreadyExists,
    aborted => Aborted,
    failed_precondition => FailedPrecondition,
    out_of_range => OutOfRange,
    exhausted => ResourceExhausted,
    unimplemented => Unimplemented,
    unavailable => Unavailable,
    unauthenticated => Unauthenticated,
    permission_denied => PermissionDenied,
    internal => Internal,
}

/// The most of a client's value an error message or a log line repeats.
pub const ECHO_LIMIT: usize = 128;

/// `value` as an error or a log may echo it: whole when short, else its
/// first [`ECHO_LIMIT`] bytes (cut at a character boundary) and its full
/// length, so a huge name never becomes a huge message.
pub fn bounded(value: &str) -> std::borrow::Cow<'_, str> {
    if value.len() <= ECHO_LIMIT {
        return value.into();
    }
    let mut end = ECHO_LIMIT;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[{} bytes in all]", &value[..end], value.len()).into()
}

/// The canonical name of a gRPC code, as the CSI spec and grpc-go write it
/// (`OK`, `INVALID_ARGUMENT`, …): one spelling for logs and metric labels.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoed_values_are_bounded() {
        assert_eq!(bounded("short"), "short");
        let long = "é".repeat(1000);
        let cut = bounded(&long);
        assert!(cut.len() < ECHO_LIMIT + 32, "{}", cut.len());
        assert!(cut.ends_with("[2000 bytes in all]"), "{cut}");
    }

    #[test]
    fn full_disk_is_resource_exhausted() {
        let e = Error::io("writing", rustix::io::Errno::NOSPC.into());
        assert_eq!(e.code(), Code::ResourceExhausted);
        let e = Error::io("writing", rustix::io::Errno::DQUOT.into());
        assert_eq!(e.code(), Code::ResourceExhausted);
    }

    #[test]
    fn other_io_errors_are_internal_with_context() {
        let e = Error::io("opening pool", io::Error::from(io::ErrorKind::PermissionDenied));
        assert_eq!(e.code(), Code::Internal);
        assert!(e.message().starts_with("opening pool: "));
    }

    #[test]
    fn answers_of_other_endpoints_keep_their_code() {
        let e = Error::from_status(&Status::not_found("no volume"), "node n1");
        assert_eq!((e.code(), e.message()), (Code::NotFound, "node n1: no volume"));
        let e = Error::from_status(&Status::unknown("h2 protocol error"), "node n1");
        assert_eq!(e.code(), Code::Unavailable);
        // Refused credentials keep their codes (a Ceph key or caps).
        let e = Error::from_status(&Status::permission_denied(""), "node n1");
        assert_eq!((e.code(), e.message()), (Code::PermissionDenied, "node n1: PERMISSION_DENIED"));
        let e = Error::from_status(&Status::data_loss("gone"), "node n1");
        assert_eq!(e.code(), Code::Internal);
    }

    #[test]
    fn status_carries_code_and_message() {
        let s: Status = not_found("volume vol-x").into();
        assert_eq!(s.code(), Code::NotFound);
        assert_eq!(s.message(), "volume vol-x");
    }
}
