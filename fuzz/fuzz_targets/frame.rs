//! Fuzzes the OCPP-J frame decoder and the request/response validators with
//! arbitrary text, for each of the three versions.
//!
//! Inputs are read as UTF-8 *lossily*: a WebSocket text frame is always valid
//! UTF-8, and replacing bad bytes with U+FFFD (instead of discarding the
//! input) keeps every mutation useful to the decoder.
//!
//! Properties, for every input and every version:
//! - nothing panics;
//! - a decode error's CALLERROR is valid OCPP-J: it decodes to a CALLERROR
//!   equal to itself, echoing the error's message id;
//! - a decoded frame re-encodes (`to_text`) to text that decodes to an equal
//!   frame;
//! - a CALL or SEND payload validates to `Ok` or a `Violation`, and the
//!   CALLERROR built from that violation is valid OCPP-J too;
//! - a CALLRESULT whose message id names an action of the version is checked
//!   against that action's response schema (the generated seeds use the action
//!   as message id, so the fuzzer starts from valid responses).
//!
//! Seeds: when `CSMS_FUZZ_SEEDS` names a directory, the init step writes one
//! CALL with the minimal and one with the full instance of every request
//! schema, and a CALLRESULT with the full instance of every response schema,
//! then exits (run with `-runs=0`; `scripts/fuzz` does this).

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use schemas::{
    Catalog, Frame, OcppVersion,
    frame::decode,
    sample::{full_instance, minimal_instance},
};

fuzz_target!(
    init: {
        if let Some(dir) = std::env::var_os("CSMS_FUZZ_SEEDS") {
            let n = write_seeds(Path::new(&dir));
            eprintln!("wrote {n} seeds to {}", Path::new(&dir).display());
            std::process::exit(0);
        }
        // Compiled once here so that the first input is not charged for it.
        Catalog::global();
    },
    |data: &[u8]| {
        let text = String::from_utf8_lossy(data);
        for version in OcppVersion::ALL {
            check(&text, version);
        }
    }
);

fn check(text: &str, version: OcppVersion) {
    match decode(text, version) {
        Ok(frame) => check_frame(&frame, version),
        Err(e) => {
            let answer = e.to_call_error(version);
            assert_eq!(answer.message_id(), e.message_id);
            assert_valid_call_error(&answer, version);
        }
    }
}

fn check_frame(frame: &Frame, version: OcppVersion) {
    let text = frame.to_text();
    match decode(&text, version) {
        Ok(back) => assert_eq!(
            &back, frame,
            "OCPP {version}: re-encoded frame {text} decodes to a different frame"
        ),
        Err(e) => panic!("OCPP {version}: re-encoded frame {text} does not decode: {e}"),
    }
    let catalog = Catalog::global();
    match frame {
        Frame::Call {
            message_id,
            action,
            payload,
        }
        | Frame::Send {
            message_id,
            action,
            payload,
        } => {
            let result = catalog.validate_request(version, action, payload);
            if catalog.get(version, action).is_none() {
                assert!(
                    result.is_err(),
                    "OCPP {version}: unknown action {action:?} validated"
                );
            }
            if let Err(v) = result {
                let answer = Frame::call_error(version, message_id.as_str(), v.kind, v.description);
                assert_valid_call_error(&answer, version);
            }
        }
        Frame::CallResult {
            message_id,
            payload,
        } => {
            if catalog.get(version, message_id).is_some() {
                // Ok or a Violation are both fine; only a panic is a bug.
                let _ = catalog.validate_response(version, message_id, payload);
            }
        }
        Frame::CallError { .. } | Frame::CallResultError { .. } => {}
    }
}

/// A CALLERROR we send must decode, on the same version, to itself.
fn assert_valid_call_error(answer: &Frame, version: OcppVersion) {
    assert!(
        matches!(answer, Frame::CallError { .. }),
        "OCPP {version}: answer {answer:?} is not a CALLERROR"
    );
    let text = answer.to_text();
    match decode(&text, version) {
        Ok(back) => assert_eq!(
            &back, answer,
            "OCPP {version}: CALLERROR {text} decodes to a different frame"
        ),
        Err(e) => panic!("OCPP {version}: CALLERROR {text} is not valid OCPP-J: {e}"),
    }
}

/// Writes valid frames built from every schema of every version into `dir`;
/// returns how many.
fn write_seeds(dir: &Path) -> usize {
    std::fs::create_dir_all(dir).expect("create the seed directory");
    let catalog = Catalog::global();
    let mut n = 0;
    let mut write = |name: String, frame: Frame| {
        std::fs::write(dir.join(name), frame.to_text()).expect("write a seed");
        n += 1;
    };
    for version in OcppVersion::ALL {
        let v = version.as_str();
        for spec in catalog.actions(version) {
            let action = spec.action.as_str();
            for (kind, payload) in [
                ("min", minimal_instance(spec.request_schema())),
                ("full", full_instance(spec.request_schema())),
            ] {
                let frame = Frame::Call {
                    message_id: format!("{kind}-1"),
                    action: action.to_string(),
                    payload,
                };
                write(format!("gen-{v}-{action}-call-{kind}"), frame);
            }
            if let Some(schema) = spec.response_schema() {
                let frame = Frame::CallResult {
                    message_id: action.to_string(),
                    payload: full_instance(schema),
                };
                write(format!("gen-{v}-{action}-result"), frame);
            }
        }
    }
    n
}
