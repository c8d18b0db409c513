//! What went wrong, as kinds every layer speaks, and the one place where a
//! kind becomes a gRPC code.
//!
//! The host layer (a path leading outside the kubelet directory), the
//! engines (a pool that is full, a name taken) and the core services (an
//! operation in flight) all say *what* went wrong in the driver's own
//! terms; which CSI status code that means is decided in [`Kind::code`]
//! only, so the spec's error tables are applied consistently. The kinds live
//! in this small leaf crate rather than in the core because the host layer,
//! which the core builds on, reports them too; and the conversion into a
//! gRPC status lives beside the type because Rust lets only this crate (or
//! tonic) implement it.

#![forbid(unsafe_code)]

use std::fmt;
use std::io;

use tonic::{Code, Status};

/// What kind of thing went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The request is malformed or asks for something never possible here.
    Invalid,
    /// A volume, snapshot, group, node or path the request names is not there.
    NotFound,
    /// The name is taken by an object made with incompatible arguments.
    Exists,
    /// Another operation on the same object is in flight; retry later.
    Busy,
    /// The object's state forbids the call now (still published, has
    /// snapshots, staged elsewhere).
    Precondition,
    /// A size or range outside what this engine can ever provide.
    OutOfRange,
    /// Not enough space (or another resource) right now.
    Exhausted,
    /// The call or feature is not offered by this driver or engine.
    Unsupported,
    /// The backend cannot be reached or is not ready; retrying may help.
    Unavailable,
    /// Credentials were refused (a wrong key, an unknown user).
    Unauthenticated,
    /// Credentials are accepted but may not do this (missing caps).
    Denied,
    /// A bug or an unexpected system failure.
    Internal,
}

impl Kind {
    /// The gRPC code a CSI caller sees for this kind: the one mapping.
    pub fn code(self) -> Code {
        match self {
            Kind::Invalid => Code::InvalidArgument,
            Kind::NotFound => Code::NotFound,
            Kind::Exists => Code::AlreadyExists,
            Kind::Busy => Code::Aborted,
            Kind::Precondition => Code::FailedPrecondition,
            Kind::OutOfRange => Code::OutOfRange,
            Kind::Exhausted => Code::ResourceExhausted,
            Kind::Unsupported => Code::Unimplemented,
            Kind::Unavailable => Code::Unavailable,
            Kind::Unauthenticated => Code::Unauthenticated,
            Kind::Denied => Code::PermissionDenied,
            Kind::Internal => Code::Internal,
        }
    }

    /// The kind of another CSI endpoint's answer (the relay's node agents).
    /// A transport failure (a dropped link, a deadline, a cancelled call,
    /// an unknown answer) is UNAVAILABLE: retrying may reach the node
    /// again. Codes no CSI driver answers are INTERNAL.
    pub fn of_code(code: Code) -> Kind {
        match code {
            Code::InvalidArgument => Kind::Invalid,
            Code::NotFound => Kind::NotFound,
            Code::AlreadyExists => Kind::Exists,
            Code::Aborted => Kind::Busy,
            Code::FailedPrecondition => Kind::Precondition,
            Code::OutOfRange => Kind::OutOfRange,
            Code::ResourceExhausted => Kind::Exhausted,
            Code::Unimplemented => Kind::Unsupported,
            Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled => {
                Kind::Unavailable
            }
            Code::Unauthenticated => Kind::Unauthenticated,
            Code::PermissionDenied => Kind::Denied,
            Code::Ok | Code::Internal | Code::DataLoss => Kind::Internal,
        }
    }
}

/// A kind of failure and what happened, in words for the caller and the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: Kind,
    message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: Kind, message: impl Into<String>) -> Error {
        Error { kind, message: message.into() }
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Whether this is an error of `kind`.
    pub fn is(&self, kind: Kind) -> bool {
        self.kind == kind
    }

    pub fn code(&self) -> Code {
        self.kind.code()
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// The message without its kind.
    pub fn into_message(self) -> String {
        self.message
    }

    /// The same kind, its message prefixed with what we were doing.
    pub fn context(self, context: impl fmt::Display) -> Error {
        Error { kind: self.kind, message: format!("{context}: {}", self.message) }
    }

    /// Wraps an I/O error with what we were doing. A full disk or quota is
    /// exhausted (the CO may retry elsewhere or later); a read-only
    /// filesystem is unavailable (nothing wrong with the request; retrying
    /// once it is writable again works); everything else is internal,
    /// because callers decide "not found" themselves.
    pub fn io(context: impl fmt::Display, err: io::Error) -> Error {
        let message = format!("{context}: {err}");
        let kind = if is_no_space(&err) {
            Kind::Exhausted
        } else if rustix::io::Errno::from_io_error(&err) == Some(rustix::io::Errno::ROFS) {
            Kind::Unavailable
        } else {
            Kind::Internal
        };
        Error { kind, message }
    }

    /// What another CSI endpoint answered, kept as it was where our kinds
    /// have it (see [`Kind::of_code`]).
    pub fn from_status(status: &Status, context: impl fmt::Display) -> Error {
        let message = match status.message() {
            "" => format!("{context}: {}", code_name(status.code())),
            m => format!("{context}: {m}"),
        };
        Error { kind: Kind::of_code(status.code()), message }
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
        write!(f, "{}: {}", code_name(self.code()), self.message)
    }
}

impl std::error::Error for Error {}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        Status::new(e.code(), e.message)
    }
}

/// Shorthand constructors, one per kind, that read well at call sites.
macro_rules! constructors {
    ($($fn_name:ident => $kind:ident),* $(,)?) => {
        $(
            pub fn $fn_name(message: impl Into<String>) -> Error {
                Error::new(Kind::$kind, message)
            }
        )*
    };
}

constructors! {
    invalid => Invalid,
    not_found => NotFound,
    exists => Exists,
    busy => Busy,
    precondition => Precondition,
    out_of_range => OutOfRange,
    exhausted => Exhausted,
    unsupported => Unsupported,
    unavailable => Unavailable,
    unauthenticated => Unauthenticated,
    denied => Denied,
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

    const KINDS: [Kind; 12] = [
        Kind::Invalid,
        Kind::NotFound,
        Kind::Exists,
        Kind::Busy,
        Kind::Precondition,
        Kind::OutOfRange,
        Kind::Exhausted,
        Kind::Unsupported,
        Kind::Unavailable,
        Kind::Unauthenticated,
        Kind::Denied,
        Kind::Internal,
    ];

    #[test]
    fn every_kind_has_its_own_code_and_comes_back_from_it() {
        let codes: std::collections::HashSet<_> = KINDS.iter().map(|k| k.code()).collect();
        assert_eq!(codes.len(), KINDS.len());
        for kind in KINDS {
            assert_eq!(Kind::of_code(kind.code()), kind);
        }
        assert_eq!(busy("x").code(), Code::Aborted);
        assert_eq!(precondition("x").code(), Code::FailedPrecondition);
        assert_eq!(unsupported("x").code(), Code::Unimplemented);
    }

    #[test]
    fn echoed_values_are_bounded() {
        assert_eq!(bounded("short"), "short");
        let long = "é".repeat(1000);
        let cut = bounded(&long);
        assert!(cut.len() < ECHO_LIMIT + 32, "{}", cut.len());
        assert!(cut.ends_with("[2000 bytes in all]"), "{cut}");
    }

    #[test]
    fn full_disk_is_exhausted_and_a_read_only_filesystem_unavailable() {
        let e = Error::io("writing", rustix::io::Errno::NOSPC.into());
        assert_eq!(e.kind(), Kind::Exhausted);
        let e = Error::io("writing", rustix::io::Errno::DQUOT.into());
        assert_eq!(e.kind(), Kind::Exhausted);
        let e = Error::io("writing", rustix::io::Errno::ROFS.into());
        assert_eq!(e.kind(), Kind::Unavailable);
    }

    #[test]
    fn other_io_errors_are_internal_with_context() {
        let e = Error::io("opening pool", io::Error::from(io::ErrorKind::PermissionDenied));
        assert_eq!(e.code(), Code::Internal);
        assert!(e.message().starts_with("opening pool: "));
    }

    #[test]
    fn context_keeps_the_kind() {
        let e = not_found("no image").context("pool p");
        assert_eq!((e.kind(), e.message()), (Kind::NotFound, "pool p: no image"));
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
