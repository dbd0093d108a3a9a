//! OCPP-J framing: the JSON arrays `[2, id, action, payload]` (CALL),
//! `[3, id, payload]` (CALLRESULT), `[4, id, code, description, details]`
//! (CALLERROR) and, in 2.1, `[5, ...]` (CALLRESULTERROR) and
//! `[6, id, action, payload]` (SEND).
//!
//! Decoding never panics and never gives up silently: a frame that cannot be
//! read yields a [`FrameError`] that says which CALLERROR to answer with.

use serde_json::Value;

use crate::{ErrorKind, OcppVersion};

/// OCPP-J message type numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    Call = 2,
    CallResult = 3,
    CallError = 4,
    CallResultError = 5,
    Send = 6,
}

impl MessageType {
    pub fn from_u8(n: u8) -> Option<Self> {
        Some(match n {
            2 => MessageType::Call,
            3 => MessageType::CallResult,
            4 => MessageType::CallError,
            5 => MessageType::CallResultError,
            6 => MessageType::Send,
            _ => return None,
        })
    }

    /// Whether the version defines this type (5 and 6 are new in 2.1).
    pub fn defined_in(self, version: OcppVersion) -> bool {
        match self {
            MessageType::CallResultError | MessageType::Send => version == OcppVersion::V21,
            _ => true,
        }
    }
}

/// The longest message id the specifications allow.
pub const MAX_MESSAGE_ID_LEN: usize = 36;

/// A decoded OCPP-J frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Call {
        message_id: String,
        action: String,
        payload: Value,
    },
    CallResult {
        message_id: String,
        payload: Value,
    },
    CallError {
        message_id: String,
        error_code: String,
        error_description: String,
        error_details: Value,
    },
    CallResultError {
        message_id: String,
        error_code: String,
        error_description: String,
        error_details: Value,
    },
    Send {
        message_id: String,
        action: String,
        payload: Value,
    },
}

impl Frame {
    pub fn message_type(&self) -> MessageType {
        match self {
            Frame::Call { .. } => MessageType::Call,
            Frame::CallResult { .. } => MessageType::CallResult,
            Frame::CallError { .. } => MessageType::CallError,
            Frame::CallResultError { .. } => MessageType::CallResultError,
            Frame::Send { .. } => MessageType::Send,
        }
    }

    pub fn message_id(&self) -> &str {
        match self {
            Frame::Call { message_id, .. }
            | Frame::CallResult { message_id, .. }
            | Frame::CallError { message_id, .. }
            | Frame::CallResultError { message_id, .. }
            | Frame::Send { message_id, .. } => message_id,
        }
    }

    /// Serialises the frame as OCPP-J text.
    pub fn to_text(&self) -> String {
        let v = match self {
            Frame::Call {
                message_id,
                action,
                payload,
            } => serde_json::json!([2, message_id, action, payload]),
            Frame::CallResult {
                message_id,
                payload,
            } => serde_json::json!([3, message_id, payload]),
            Frame::CallError {
                message_id,
                error_code,
                error_description,
                error_details,
            } => {
                serde_json::json!([4, message_id, error_code, error_description, error_details])
            }
            Frame::CallResultError {
                message_id,
                error_code,
                error_description,
                error_details,
            } => {
                serde_json::json!([5, message_id, error_code, error_description, error_details])
            }
            Frame::Send {
                message_id,
                action,
                payload,
            } => serde_json::json!([6, message_id, action, payload]),
        };
        v.to_string()
    }

    /// A CALLERROR with the code the version prescribes for `kind`.
    pub fn call_error(
        version: OcppVersion,
        message_id: impl Into<String>,
        kind: ErrorKind,
        description: impl Into<String>,
    ) -> Frame {
        let mut description = description.into();
        // The 2.x specifications cap errorDescription at 255 characters.
        truncate_chars(&mut description, 255);
        Frame::CallError {
            message_id: message_id.into(),
            error_code: kind.code(version).to_string(),
            error_description: description,
            error_details: Value::Object(Default::default()),
        }
    }
}

fn truncate_chars(s: &mut String, max: usize) {
    if let Some((idx, _)) = s.char_indices().nth(max) {
        s.truncate(idx);
    }
}

/// Why a frame could not be decoded, and what to answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{kind:?}: {description}")]
pub struct FrameError {
    /// The message id to echo: the frame's own where it could be read, else `-1`.
    pub message_id: String,
    pub kind: ErrorKind,
    pub description: String,
    /// The message type number, where the frame had a readable one.
    pub message_type: Option<u8>,
    /// The action, where the frame was a CALL whose action could be read.
    pub action: Option<String>,
    /// Whether the peer expects an answer: true for CALLs and for frames too
    /// broken to tell; false for broken results and errors, which are never
    /// answered (answering a CALLRESULT with a CALLERROR could loop forever).
    pub answerable: bool,
}

impl FrameError {
    fn new(kind: ErrorKind, description: impl Into<String>) -> Self {
        FrameError {
            message_id: "-1".to_string(),
            kind,
            description: description.into(),
            message_type: None,
            action: None,
            answerable: true,
        }
    }

    /// The CALLERROR frame to send back.
    pub fn to_call_error(&self, version: OcppVersion) -> Frame {
        Frame::call_error(
            version,
            self.message_id.clone(),
            self.kind,
            self.description.clone(),
        )
    }
}

/// Decodes one text frame received on a connection of `version`.
pub fn decode(text: &str, version: OcppVersion) -> Result<Frame, FrameError> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        FrameError::new(
            ErrorKind::RpcFrameworkError,
            format!("frame is not valid JSON: {e}"),
        )
    })?;
    let Value::Array(items) = value else {
        return Err(FrameError::new(
            ErrorKind::RpcFrameworkError,
            "frame is not a JSON array",
        ));
    };
    let mut items = items.into_iter();
    let type_num = items.next().and_then(|v| v.as_u64()).ok_or_else(|| {
        FrameError::new(
            ErrorKind::RpcFrameworkError,
            "first element must be the message type number",
        )
    })?;
    let message_id = match items.next() {
        Some(Value::String(id)) if !id.is_empty() && id.len() <= MAX_MESSAGE_ID_LEN => id,
        Some(Value::String(id)) if id.len() > MAX_MESSAGE_ID_LEN => {
            return Err(FrameError::new(
                ErrorKind::RpcFrameworkError,
                format!(
                    "message id is {} characters long, at most {MAX_MESSAGE_ID_LEN} allowed",
                    id.len()
                ),
            ));
        }
        _ => {
            return Err(FrameError::new(
                ErrorKind::RpcFrameworkError,
                "second element must be the message id (a string)",
            ));
        }
    };
    let with_id = |mut e: FrameError| {
        e.message_id = message_id.clone();
        e.message_type = u8::try_from(type_num).ok();
        e
    };
    let Some(mtype) = u8::try_from(type_num)
        .ok()
        .and_then(MessageType::from_u8)
        .filter(|t| t.defined_in(version))
    else {
        return Err(with_id(FrameError::new(
            ErrorKind::MessageTypeNotSupported,
            format!("message type {type_num} is not defined in OCPP {version}"),
        )));
    };
    let rest: Vec<Value> = items.collect();
    let expected = match mtype {
        MessageType::Call | MessageType::Send => 2,
        MessageType::CallResult => 1,
        MessageType::CallError | MessageType::CallResultError => 3,
    };
    let not_answerable = |mut e: FrameError| {
        if !matches!(mtype, MessageType::Call) {
            e.answerable = false;
        }
        e
    };
    if rest.len() != expected {
        return Err(not_answerable(with_id(FrameError::new(
            ErrorKind::RpcFrameworkError,
            format!(
                "message type {type_num} needs {} elements, got {}",
                expected + 2,
                rest.len() + 2
            ),
        ))));
    }
    let mut rest = rest.into_iter();
    let mut next = || rest.next().unwrap_or(Value::Null);
    match mtype {
        MessageType::Call | MessageType::Send => {
            let action = match next() {
                Value::String(a) if !a.is_empty() && a.len() <= 64 => a,
                _ => {
                    return Err(not_answerable(with_id(FrameError::new(
                        ErrorKind::RpcFrameworkError,
                        "third element must be the action name (a string)",
                    ))));
                }
            };
            let payload = next();
            if !payload.is_object() {
                let mut e = with_id(FrameError::new(
                    ErrorKind::FormatViolation,
                    "payload must be a JSON object",
                ));
                e.action = Some(action);
                return Err(not_answerable(e));
            }
            Ok(if mtype == MessageType::Call {
                Frame::Call {
                    message_id,
                    action,
                    payload,
                }
            } else {
                Frame::Send {
                    message_id,
                    action,
                    payload,
                }
            })
        }
        MessageType::CallResult => {
            let payload = next();
            if !payload.is_object() {
                return Err(not_answerable(with_id(FrameError::new(
                    ErrorKind::FormatViolation,
                    "payload must be a JSON object",
                ))));
            }
            Ok(Frame::CallResult {
                message_id,
                payload,
            })
        }
        MessageType::CallError | MessageType::CallResultError => {
            let (code, desc, details) = (next(), next(), next());
            let (Value::String(error_code), Value::String(error_description)) = (code, desc) else {
                return Err(not_answerable(with_id(FrameError::new(
                    ErrorKind::RpcFrameworkError,
                    "error code and description must be strings",
                ))));
            };
            Ok(if mtype == MessageType::CallError {
                Frame::CallError {
                    message_id,
                    error_code,
                    error_description,
                    error_details: details,
                }
            } else {
                Frame::CallResultError {
                    message_id,
                    error_code,
                    error_description,
                    error_details: details,
                }
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const V16: OcppVersion = OcppVersion::V16;
    const V201: OcppVersion = OcppVersion::V201;
    const V21: OcppVersion = OcppVersion::V21;

    #[test]
    fn decodes_each_type() {
        assert_eq!(
            decode(r#"[2,"a1","Heartbeat",{}]"#, V16).unwrap(),
            Frame::Call {
                message_id: "a1".into(),
                action: "Heartbeat".into(),
                payload: json!({})
            }
        );
        assert_eq!(
            decode(r#"[3,"a1",{"x":1}]"#, V201).unwrap(),
            Frame::CallResult {
                message_id: "a1".into(),
                payload: json!({"x":1})
            }
        );
        let e = decode(r#"[4,"a1","NotSupported","nope",{}]"#, V201).unwrap();
        assert_eq!(e.message_type(), MessageType::CallError);
        assert!(matches!(
            decode(r#"[6,"s1","NotifyPeriodicEventStream",{}]"#, V21).unwrap(),
            Frame::Send { .. }
        ));
        assert!(matches!(
            decode(r#"[5,"s1","GenericError","",{}]"#, V21).unwrap(),
            Frame::CallResultError { .. }
        ));
    }

    #[test]
    fn garbage_gets_minus_one_and_version_code() {
        let e = decode("not json", V201).unwrap_err();
        assert_eq!(e.message_id, "-1");
        assert_eq!(
            e.to_call_error(V201).to_text(),
            json!([4, "-1", "RpcFrameworkError", e.description, {}]).to_string()
        );
        assert_eq!(e.kind.code(V16), "FormationViolation");
        assert_eq!(decode("{}", V16).unwrap_err().message_id, "-1");
        assert_eq!(decode("[]", V16).unwrap_err().message_id, "-1");
        assert_eq!(
            decode(r#"[2, 5, "Heartbeat", {}]"#, V16)
                .unwrap_err()
                .message_id,
            "-1"
        );
    }

    #[test]
    fn readable_id_is_echoed() {
        let e = decode(r#"[2,"m7","Heartbeat"]"#, V201).unwrap_err();
        assert_eq!(e.message_id, "m7");
        assert!(e.answerable);
        let e = decode(r#"[2,"m8","Heartbeat",[]]"#, V16).unwrap_err();
        assert_eq!(
            (e.kind, e.action.as_deref()),
            (ErrorKind::FormatViolation, Some("Heartbeat"))
        );
        let e = decode(r#"[9,"m9",{}]"#, V201).unwrap_err();
        assert_eq!(
            (e.message_id.as_str(), e.kind),
            ("m9", ErrorKind::MessageTypeNotSupported)
        );
        // SEND is 2.1 only.
        assert_eq!(
            decode(r#"[6,"s1","X",{}]"#, V201).unwrap_err().kind,
            ErrorKind::MessageTypeNotSupported
        );
        // A broken CALLRESULT is never answered.
        assert!(!decode(r#"[3,"r1"]"#, V201).unwrap_err().answerable);
    }

    #[test]
    fn overlong_id_refused() {
        let id = "x".repeat(37);
        let e = decode(&format!(r#"[2,"{id}","Heartbeat",{{}}]"#), V16).unwrap_err();
        assert_eq!(e.message_id, "-1");
    }

    #[test]
    fn call_error_round_trips_and_truncates() {
        let f = Frame::call_error(
            V16,
            "id",
            ErrorKind::OccurrenceConstraintViolation,
            "d".repeat(300),
        );
        let back = decode(&f.to_text(), V16).unwrap();
        let Frame::CallError {
            error_code,
            error_description,
            ..
        } = back
        else {
            panic!()
        };
        assert_eq!(error_code, "OccurenceConstraintViolation");
        assert_eq!(error_description.len(), 255);
    }
}
