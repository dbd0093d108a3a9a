//! CALLERROR codes. The two protocol families name some errors differently
//! (1.6 `FormationViolation` and the misspelt `OccurenceConstraintViolation`,
//! 2.x `FormatViolation` and `OccurrenceConstraintViolation`), so handlers pick a
//! version-neutral [`ErrorKind`] and the wire code is chosen per version.

use crate::OcppVersion;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The action is not known to this version.
    NotImplemented,
    /// The action is known but not accepted in this direction or by this CSMS.
    NotSupported,
    InternalError,
    /// The payload does not match the PDU structure.
    ProtocolError,
    SecurityError,
    /// The payload is syntactically incorrect.
    FormatViolation,
    PropertyConstraintViolation,
    OccurrenceConstraintViolation,
    TypeConstraintViolation,
    GenericError,
    /// 2.x: the frame is not a valid RPC message (message id unreadable, ...).
    RpcFrameworkError,
    /// 2.x: the message type number is unknown.
    MessageTypeNotSupported,
}

impl ErrorKind {
    /// The code the given version's OCPP-J specification prescribes.
    pub const fn code(self, version: OcppVersion) -> &'static str {
        let v16 = !version.is_2x();
        match self {
            ErrorKind::NotImplemented => "NotImplemented",
            ErrorKind::NotSupported => "NotSupported",
            ErrorKind::InternalError => "InternalError",
            ErrorKind::ProtocolError => "ProtocolError",
            ErrorKind::SecurityError => "SecurityError",
            ErrorKind::FormatViolation if v16 => "FormationViolation",
            ErrorKind::FormatViolation => "FormatViolation",
            ErrorKind::PropertyConstraintViolation => "PropertyConstraintViolation",
            ErrorKind::OccurrenceConstraintViolation if v16 => "OccurenceConstraintViolation",
            ErrorKind::OccurrenceConstraintViolation => "OccurrenceConstraintViolation",
            ErrorKind::TypeConstraintViolation => "TypeConstraintViolation",
            ErrorKind::GenericError => "GenericError",
            // 1.6 has neither; the closest 1.6 codes are used.
            ErrorKind::RpcFrameworkError if v16 => "FormationViolation",
            ErrorKind::RpcFrameworkError => "RpcFrameworkError",
            ErrorKind::MessageTypeNotSupported if v16 => "NotSupported",
            ErrorKind::MessageTypeNotSupported => "MessageTypeNotSupported",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_specific_spelling() {
        assert_eq!(
            ErrorKind::FormatViolation.code(OcppVersion::V16),
            "FormationViolation"
        );
        assert_eq!(
            ErrorKind::FormatViolation.code(OcppVersion::V201),
            "FormatViolation"
        );
        assert_eq!(
            ErrorKind::OccurrenceConstraintViolation.code(OcppVersion::V16),
            "OccurenceConstraintViolation"
        );
        assert_eq!(
            ErrorKind::OccurrenceConstraintViolation.code(OcppVersion::V21),
            "OccurrenceConstraintViolation"
        );
        assert_eq!(
            ErrorKind::RpcFrameworkError.code(OcppVersion::V21),
            "RpcFrameworkError"
        );
    }
}
