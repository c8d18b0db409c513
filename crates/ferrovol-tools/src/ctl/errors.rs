//! What ctl says when it fails: the gRPC code, and an exit code per
//! failure class.

use serde_json::json;

use super::*;

/// Exit codes by failure class, so scripts can branch without parsing text.
pub mod exit {
    pub const USAGE: u8 = 2;
    pub const UNREACHABLE: u8 = 3;
    pub const INVALID: u8 = 4;
    pub const NOT_FOUND: u8 = 5;
    pub const CONFLICT: u8 = 6;
    pub const RETRY: u8 = 7;
    pub const NO_SPACE: u8 = 8;
    pub const UNSUPPORTED: u8 = 9;
    pub const FAILED: u8 = 10;
}

/// A failed ctl run: what to print and the exit code.
#[derive(Debug)]
pub struct CtlError {
    pub message: String,
    pub code: u8,
    /// The gRPC code, when the driver answered with one.
    pub grpc: Option<&'static str>,
}

impl CtlError {
    pub(crate) fn new(code: u8, message: impl Into<String>) -> CtlError {
        CtlError { message: message.into(), code, grpc: None }
    }

    /// The error as ctl prints it (once, on stderr): a line of text, or a
    /// JSON object when the output is JSON.
    pub fn render(&self, output: Output) -> String {
        match output {
            Output::Json => json!({ "error": {
                "message": self.message,
                "grpc_code": self.grpc,
                "exit_code": self.code,
            }})
            .to_string(),
            _ => format!("ferrovol ctl: {}", self.message),
        }
    }
}

impl From<tonic::Status> for CtlError {
    fn from(s: tonic::Status) -> CtlError {
        use tonic::Code::*;
        let code = match s.code() {
            InvalidArgument | OutOfRange => exit::INVALID,
            NotFound => exit::NOT_FOUND,
            AlreadyExists | FailedPrecondition => exit::CONFLICT,
            Aborted | Unavailable | DeadlineExceeded => exit::RETRY,
            // No CSI driver answers these: the call was cut off (the driver
            // stopped or crashed mid-call, the connection broke). Nothing
            // says it failed; it may have been done, and a retry finds out.
            Unknown | Cancelled => exit::RETRY,
            ResourceExhausted => exit::NO_SPACE,
            Unimplemented => exit::UNSUPPORTED,
            _ => exit::FAILED,
        };
        let name = crate::error::code_name(s.code());
        CtlError { message: format!("{name}: {}", s.message()), code, grpc: Some(name) }
    }
}
