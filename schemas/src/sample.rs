//! Valid instances of an OCA JSON schema, for tests, fuzz seeds and the load
//! generator.
//!
//! Handles the keywords the OCA schemas use (`type`, `properties`,
//! `required`, `items`, `minItems`/`maxItems`, `enum`, `const`,
//! `minLength`/`maxLength`, `minimum`/`maximum`, `multipleOf`, `format`,
//! local `#/definitions/...` `$ref`s) and the first branch of
//! `anyOf`/`oneOf`/`allOf` should a schema use them.

use serde_json::{Map, Number, Value};

/// A timestamp every OCPP version accepts.
const SAMPLE_TIME: &str = "2025-01-01T00:00:00Z";
/// Optional properties are filled only this deep: keeps instances small and
/// stops any recursive definition.
const MAX_OPTIONAL_DEPTH: usize = 12;
/// Past this depth even required properties are not expanded (only a
/// schema whose required properties recurse forever reaches it).
const MAX_DEPTH: usize = 64;

/// A minimal instance that validates against `schema` (an OCA JSON schema,
/// with local `#/definitions/...` $refs): all required properties, the first
/// enum value, short strings within the length bounds (an RFC 3339 timestamp
/// for `date-time`), numbers within their bounds, arrays of `minItems`
/// elements.
pub fn minimal_instance(schema: &Value) -> Value {
    Gen {
        root: schema,
        full: false,
    }
    .value(schema, "", 0)
}

/// Like [`minimal_instance`] but also fills every optional property and puts
/// at least one element in every array: useful for fuzz seeds and load
/// generation, where the optional paths are the interesting ones.
pub fn full_instance(schema: &Value) -> Value {
    Gen {
        root: schema,
        full: true,
    }
    .value(schema, "", 0)
}

struct Gen<'a> {
    root: &'a Value,
    full: bool,
}

impl<'a> Gen<'a> {
    /// Follows local `$ref`s (`#/definitions/X`, `#/$defs/X`, `#`).
    fn resolve(&self, mut s: &'a Value) -> &'a Value {
        for _ in 0..32 {
            let Some(r) = s.get("$ref").and_then(Value::as_str) else {
                break;
            };
            let Some(pointer) = r.strip_prefix('#') else {
                break;
            };
            match self.root.pointer(pointer) {
                Some(target) => s = target,
                None => break,
            }
        }
        s
    }

    fn value(&self, schema: &'a Value, name: &str, depth: usize) -> Value {
        let s = self.resolve(schema);
        if depth > MAX_DEPTH {
            return Value::Null;
        }
        if let Some(c) = s.get("const") {
            return c.clone();
        }
        if let Some(first) = s
            .get("enum")
            .and_then(Value::as_array)
            .and_then(|e| e.first())
        {
            return first.clone();
        }
        for combinator in ["allOf", "anyOf", "oneOf"] {
            if let Some(first) = s
                .get(combinator)
                .and_then(Value::as_array)
                .and_then(|b| b.first())
            {
                return self.value(first, name, depth + 1);
            }
        }
        match type_of(s) {
            Some("object") => self.object(s, depth),
            Some("array") => self.array(s, name, depth),
            Some("string") => Value::String(string_value(s, name)),
            Some("integer") => Value::Number(Number::from(integer_value(s, self.full))),
            Some("number") => number_value(s, self.full),
            Some("boolean") => Value::Bool(self.full),
            _ => Value::Null,
        }
    }

    fn object(&self, s: &'a Value, depth: usize) -> Value {
        let required: Vec<&str> = s
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mut map = Map::new();
        if let Some(props) = s.get("properties").and_then(Value::as_object) {
            for (key, prop) in props {
                let wanted =
                    required.contains(&key.as_str()) || (self.full && depth < MAX_OPTIONAL_DEPTH);
                if wanted {
                    map.insert(key.clone(), self.value(prop, key, depth + 1));
                }
            }
        }
        // A required name with no property schema may hold anything.
        for key in required {
            map.entry(key.to_owned()).or_insert(Value::Null);
        }
        Value::Object(map)
    }

    fn array(&self, s: &'a Value, name: &str, depth: usize) -> Value {
        let min = s.get("minItems").and_then(Value::as_u64).unwrap_or(0);
        let max = s
            .get("maxItems")
            .and_then(Value::as_u64)
            .unwrap_or(u64::MAX);
        let wanted = if self.full && depth < MAX_OPTIONAL_DEPTH {
            min.max(1)
        } else {
            min
        };
        let n = wanted.min(max);
        // `items` as a list (tuple form) is not used by the OCA schemas; an
        // absent or tuple `items` gets nulls, which only such a schema accepts.
        let items = s.get("items").filter(|i| i.is_object());
        (0..n)
            .map(|_| items.map_or(Value::Null, |i| self.value(i, name, depth + 1)))
            .collect()
    }
}

/// The declared type, or the one implied by the keywords present.
fn type_of(s: &Value) -> Option<&str> {
    match s.get("type") {
        Some(Value::String(t)) => Some(t.as_str()),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .or(Some("null")),
        _ if s.get("properties").is_some() || s.get("required").is_some() => Some("object"),
        _ if s.get("items").is_some() => Some("array"),
        _ => None,
    }
}

/// The property name (a recognisable, readable value) fitted into the
/// length bounds; a timestamp or URL where the format asks for one.
fn string_value(s: &Value, name: &str) -> String {
    match s.get("format").and_then(Value::as_str) {
        Some("date-time") => return SAMPLE_TIME.to_owned(),
        Some("uri") => return "https://example.com/".to_owned(),
        _ => {}
    }
    let min = s.get("minLength").and_then(Value::as_u64).unwrap_or(0) as usize;
    let max = s
        .get("maxLength")
        .and_then(Value::as_u64)
        .unwrap_or(u64::MAX) as usize;
    let mut v: String = if name.is_empty() {
        "x".to_owned()
    } else {
        name.to_owned()
    };
    if v.chars().count() > max {
        v = v.chars().take(max).collect();
    }
    while v.chars().count() < min {
        v.push('x');
    }
    v
}

/// 0 (minimal) or 1 (full) when the bounds allow, else the nearest bound.
fn integer_value(s: &Value, full: bool) -> i64 {
    let lo = s
        .get("minimum")
        .and_then(Value::as_f64)
        .map(|m| m.ceil() as i64);
    let hi = s
        .get("maximum")
        .and_then(Value::as_f64)
        .map(|m| m.floor() as i64);
    let mut v = i64::from(full);
    if let Some(lo) = lo {
        v = v.max(lo);
    }
    if let Some(hi) = hi {
        v = v.min(hi);
    }
    v
}

/// Like [`integer_value`] but a fractional bound is used as is. Under a
/// `multipleOf` the preferred value is 0, a multiple of anything.
fn number_value(s: &Value, full: bool) -> Value {
    let lo = s.get("minimum").and_then(Value::as_f64);
    let hi = s.get("maximum").and_then(Value::as_f64);
    let preferred = if full && s.get("multipleOf").is_none() {
        1.0
    } else {
        0.0
    };
    let v = match (lo, hi) {
        (Some(lo), _) if preferred < lo => lo,
        (_, Some(hi)) if preferred > hi => hi,
        _ => preferred,
    };
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        Value::Number(Number::from(v as i64))
    } else {
        Number::from_f64(v)
            .map(Value::Number)
            .unwrap_or(Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Catalog, OcppVersion};
    use serde_json::json;

    #[test]
    fn every_schema_of_every_version_has_valid_instances() {
        let c = Catalog::global();
        let mut checked = 0;
        for v in OcppVersion::ALL {
            for spec in c.actions(v) {
                let a = spec.action.as_str();
                for (kind, inst) in [
                    ("minimal", minimal_instance(spec.request_schema())),
                    ("full", full_instance(spec.request_schema())),
                ] {
                    if let Err(e) = c.validate_request(v, a, &inst) {
                        panic!("{v} {a} {kind} request invalid: {e}\n{inst}");
                    }
                    checked += 1;
                }
                if let Some(schema) = spec.response_schema() {
                    for (kind, inst) in [
                        ("minimal", minimal_instance(schema)),
                        ("full", full_instance(schema)),
                    ] {
                        if let Err(e) = c.validate_response(v, a, &inst) {
                            panic!("{v} {a} {kind} response invalid: {e}\n{inst}");
                        }
                        checked += 1;
                    }
                }
            }
        }
        // Two instances per schema file, ~390 files.
        assert!(checked > 700, "only {checked} instances checked");
    }

    #[test]
    fn minimal_has_only_required_and_full_has_everything() {
        let c = Catalog::global();
        let schema = c
            .get(OcppVersion::V16, "BootNotification")
            .unwrap()
            .request_schema();
        let min = minimal_instance(schema);
        assert_eq!(
            min,
            json!({"chargePointModel": "chargePointModel", "chargePointVendor": "chargePointVendor"})
        );
        let full = full_instance(schema);
        assert_eq!(full.as_object().unwrap().len(), 9);
        assert_eq!(
            full["chargePointSerialNumber"],
            json!("chargePointSerialNumber")
        );

        let schema = c
            .get(OcppVersion::V201, "TransactionEvent")
            .unwrap()
            .request_schema();
        let min = minimal_instance(schema);
        assert_eq!(min["eventType"], json!("Ended"), "first enum value");
        assert_eq!(min["timestamp"], json!(SAMPLE_TIME));
        assert!(min.get("meterValue").is_none());
        let full = full_instance(schema);
        let sv = &full["meterValue"][0]["sampledValue"][0];
        assert!(sv["unitOfMeasure"]["unit"].is_string(), "{full}");
        assert!(full["customData"]["vendorId"].is_string());
    }

    #[test]
    fn bounds_are_respected() {
        let s = json!({"type": "object", "required": ["a", "b", "c", "d", "e"], "properties": {
            "a": {"type": "integer", "minimum": 5, "maximum": 9},
            "b": {"type": "integer", "maximum": -3},
            "c": {"type": "number", "minimum": 0.5},
            "d": {"type": "string", "minLength": 4, "maxLength": 6},
            "e": {"type": "array", "minItems": 2, "items": {"$ref": "#/definitions/T"}},
            "f": {"type": "boolean"},
            "longName": {"type": "string", "maxLength": 3}
        }, "definitions": {"T": {"type": "string", "enum": ["Q", "R"]}}});
        assert_eq!(
            minimal_instance(&s),
            json!({"a": 5, "b": -3, "c": 0.5, "d": "dxxx", "e": ["Q", "Q"]})
        );
        let full = full_instance(&s);
        assert_eq!(
            (&full["f"], &full["longName"]),
            (&json!(true), &json!("lon"))
        );
    }

    #[test]
    fn recursive_definitions_terminate() {
        let s = json!({"$ref": "#/definitions/N", "definitions": {"N": {"type": "object",
            "properties": {"next": {"$ref": "#/definitions/N"}, "v": {"type": "integer"}}}}});
        let full = full_instance(&s);
        let mut depth = 0;
        let mut cur = &full;
        while let Some(n) = cur.get("next") {
            cur = n;
            depth += 1;
        }
        assert!(depth > 0 && depth <= MAX_OPTIONAL_DEPTH, "{depth}");
    }
}
