//! The OpenAPI 3.1 description of the back-office API, served at
//! `/api/openapi.json`. [`ROUTES`] is the one list of operations: the
//! document is generated from it and a test checks the router serves each.

use serde_json::{Map, Value, json};

/// (method, path, summary, request body schema or null, success status)
pub const ROUTES: &[(&str, &str, &str)] = &[
    (
        "get",
        "/api/stations",
        "List stations: registered or seen, with live status",
    ),
    (
        "post",
        "/api/stations",
        "Register a station (or replace its password)",
    ),
    (
        "get",
        "/api/stations/{id}",
        "One station: connected, node, last seen, boot info, connector statuses",
    ),
    (
        "delete",
        "/api/stations/{id}",
        "Remove a station and its live status",
    ),
    (
        "post",
        "/api/stations/{id}/commands/{action}",
        "Send a CSMS-initiated CALL and return the station's answer",
    ),
    ("get", "/api/id-tokens", "List id tokens"),
    ("post", "/api/id-tokens", "Add or update an id token"),
    ("delete", "/api/id-tokens/{token}", "Remove an id token"),
    ("get", "/api/openapi.json", "This document"),
];

fn error_schema() -> Value {
    json!({ "type": "object", "required": ["error"], "properties": { "error": { "type": "string" } } })
}

fn station_schema() -> Value {
    json!({
        "type": "object",
        "required": ["id", "connected", "node", "last_seen", "ocpp_version", "boot", "connectors"],
        "properties": {
            "id": { "type": "string" },
            "registered": { "type": "boolean" },
            "connected": { "type": "boolean" },
            "node": { "type": ["string", "null"] },
            "last_seen": { "type": ["string", "null"], "format": "date-time", "description": "last connect, disconnect or answered CALL; CALLs move it at most once a second" },
            "ocpp_version": { "type": ["string", "null"], "enum": ["1.6", "2.0.1", "2.1", null] },
            "boot": { "type": ["object", "null"] },
            "connectors": { "type": "array", "items": {
                "type": "object",
                "properties": {
                    "evse_id": { "type": "integer" },
                    "connector_id": { "type": "integer" },
                    "status": { "type": "string" },
                    "error_code": { "type": ["string", "null"] },
                    "info": { "type": ["string", "null"] },
                    "event_time": { "type": "string", "format": "date-time" }
                }
            } }
        }
    })
}

fn body_for(method: &str, path: &str) -> Option<Value> {
    let schema = match (method, path) {
        ("post", "/api/stations") => json!({
            "type": "object", "required": ["id"], "additionalProperties": false,
            "properties": { "id": { "type": "string", "maxLength": 48 }, "password": { "type": "string", "minLength": 8, "maxLength": 64 } }
        }),
        ("post", "/api/id-tokens") => json!({
            "type": "object", "required": ["id_token"], "additionalProperties": false,
            "properties": {
                "id_token": { "type": "string", "maxLength": 36 },
                "status": { "type": "string", "enum": ["Accepted", "Blocked", "Expired", "Invalid"] },
                "expiry": { "type": "string", "format": "date-time" },
                "group_id": { "type": "string" }
            }
        }),
        ("post", "/api/stations/{id}/commands/{action}") => json!({
            "type": "object",
            "description": "The OCPP payload of the action for the station's version; validated against the OCA schema before sending"
        }),
        _ => return None,
    };
    Some(json!({ "required": true, "content": { "application/json": { "schema": schema } } }))
}

fn responses_for(method: &str, path: &str) -> Value {
    let err = json!({ "description": "error", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } });
    let mut r = Map::new();
    let ok = match (method, path) {
        ("get", "/api/stations") => {
            json!({ "description": "stations", "content": { "application/json": { "schema": { "type": "array", "items": { "$ref": "#/components/schemas/Station" } } } } })
        }
        ("get", "/api/stations/{id}") => {
            json!({ "description": "the station", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Station" } } } })
        }
        ("post", "/api/stations") => {
            json!({ "description": "registered", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Station" } } } })
        }
        ("post", "/api/stations/{id}/commands/{action}") => json!({
            "description": "the station's answer: status \"result\" with its payload, or \"error\" with its CALLERROR",
            "content": { "application/json": { "schema": { "type": "object", "required": ["status"], "properties": {
                "status": { "type": "string", "enum": ["result", "error"] },
                "payload": { "type": "object" },
                "error_code": { "type": "string" },
                "error_description": { "type": "string" }
            } } } }
        }),
        ("delete", _) => json!({ "description": "removed" }),
        ("post", _) => json!({ "description": "saved" }),
        _ => {
            json!({ "description": "ok", "content": { "application/json": { "schema": { "type": ["object", "array"] } } } })
        }
    };
    let code = match (method, path) {
        ("delete", _) => "204",
        ("post", "/api/stations") | ("post", "/api/id-tokens") => "201",
        _ => "200",
    };
    r.insert(code.into(), ok);
    r.insert("401".into(), err.clone());
    if method != "get" || path.contains('{') {
        r.insert("400".into(), err.clone());
        r.insert("404".into(), err.clone());
    }
    if path.ends_with("{action}") {
        r.insert("409".into(), json!({ "description": "the station is not connected", "content": err["content"].clone() }));
        r.insert("504".into(), json!({ "description": "the station did not answer in time", "content": err["content"].clone() }));
    }
    Value::Object(r)
}

/// The OpenAPI document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for (method, path, summary) in ROUTES {
        let params: Vec<Value> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } }))
            .collect();
        let mut op = json!({ "summary": summary, "parameters": params, "responses": responses_for(method, path) });
        if let Some(body) = body_for(method, path) {
            op["requestBody"] = body;
        }
        let entry = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        entry[*method] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": { "title": "csms back-office API", "version": env!("CARGO_PKG_VERSION") },
        "security": [{ "bearer": [] }],
        "paths": paths,
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer", "description": "CSMS_ADMIN_TOKEN" } },
            "schemas": { "Error": error_schema(), "Station": station_schema() }
        }
    })
}
