//! The back-office HTTP API: health, metrics, stations and id tokens, and
//! remote commands to stations connected to this node. Handlers are plain
//! async functions; every error is one [`ApiError`] rendered as JSON.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, Request, State},
    http::{HeaderMap, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    registry::{IdTokenRecord, IdTokenStatus},
    server::Node,
    session::{CallAnswer, CallFailure},
};

#[derive(Clone)]
pub struct ApiState {
    pub node: Arc<Node>,
    pub admin_token: Arc<str>,
    pub metrics: PrometheusHandle,
    pub router: crate::router::CommandRouter,
}

/// An API failure: the status and a message saying what is wrong.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn err(status: StatusCode, msg: impl Into<String>) -> ApiError {
    ApiError(status, msg.into())
}

pub fn router(state: ApiState) -> Router {
    router_with(state, Router::new())
}

/// The API plus `extra_api`: routes other crates serve under `/api` (SQL),
/// already given their own state, behind the same admin-token check.
pub fn router_with(state: ApiState, extra_api: Router) -> Router {
    let api = Router::new()
        .route("/stations", get(list_stations).post(add_station))
        .route("/stations/{id}", get(get_station).delete(remove_station))
        .route("/stations/{id}/commands/{action}", post(command))
        .route("/id-tokens", get(list_tokens).post(add_token))
        .route("/id-tokens/{token}", axum::routing::delete(remove_token))
        .route(
            "/openapi.json",
            get(|| async { Json(crate::openapi::document()) }),
        )
        .with_state(state.clone())
        .merge(extra_api)
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(state)
        .nest("/api", api)
}

async fn require_admin(
    State(state): State<ApiState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        None => Err(err(
            StatusCode::UNAUTHORIZED,
            "missing Authorization: Bearer <admin token>",
        )),
        Some(t) if constant_time_eq(t.trim().as_bytes(), state.admin_token.as_bytes()) => {
            Ok(next.run(req).await)
        }
        Some(_) => Err(err(StatusCode::UNAUTHORIZED, "wrong admin token")),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn readyz(State(state): State<ApiState>) -> Result<&'static str, ApiError> {
    if state.node.wal.over_budget() {
        return Err(err(
            StatusCode::SERVICE_UNAVAILABLE,
            "WAL over its disk budget: the lake is not keeping up",
        ));
    }
    Ok("ready\n")
}

async fn render_metrics(State(state): State<ApiState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

async fn station_json(node: &Node, id: &str) -> Value {
    let presence = node.status.station(id).await.ok().flatten();
    let connected =
        node.sessions.contains_key(id) || presence.as_ref().is_some_and(|p| p.connected);
    let connectors: Vec<Value> = node
        .status
        .connectors(Some(id))
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|c| {
            json!({
                "evse_id": c.evse_id,
                "connector_id": c.connector_id,
                "status": c.status,
                "error_code": c.error_code,
                "info": c.info,
                "event_time": c.event_time,
            })
        })
        .collect();
    json!({
        "id": id,
        "registered": node.stations.get(id).is_some(),
        "connected": connected,
        "node": presence.as_ref().and_then(|p| p.node.clone()),
        "last_seen": presence.as_ref().and_then(|p| p.last_seen),
        "ocpp_version": presence.as_ref().and_then(|p| p.ocpp_version.clone()),
        "boot": presence.as_ref().and_then(|p| p.boot.clone()),
        "connectors": connectors,
    })
}

async fn list_stations(State(state): State<ApiState>) -> Json<Value> {
    let node = &state.node;
    let mut ids: Vec<String> = node.stations.list().into_iter().map(|s| s.id).collect();
    ids.extend(
        node.status
            .stations()
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|p| p.station_id),
    );
    ids.sort();
    ids.dedup();
    let mut out = Vec::new();
    for id in &ids {
        out.push(station_json(node, id).await);
    }
    Json(Value::Array(out))
}

async fn get_station(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let node = &state.node;
    if node.stations.get(&id).is_none() && node.status.station(&id).await.ok().flatten().is_none() {
        return Err(err(StatusCode::NOT_FOUND, format!("no station {id:?}")));
    }
    Ok(Json(station_json(node, &id).await))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewStation {
    id: String,
    password: Option<String>,
}

async fn add_station(
    State(state): State<ApiState>,
    body: Result<Json<NewStation>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Json(s) = body.map_err(|e| {
        err(
            StatusCode::BAD_REQUEST,
            format!("expected {{\"id\": \"...\", \"password\": \"...\"}}: {e}"),
        )
    })?;
    if let Some(p) = &s.password
        && !(8..=64).contains(&p.chars().count())
    {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "password must be 8 to 64 characters (OCPP security profile passwords are 16 to 40 recommended)",
        ));
    }
    let registry = state.node.stations.clone();
    let (id, password) = (s.id.clone(), s.password.clone());
    tokio::task::spawn_blocking(move || registry.add(&id, password.as_deref()))
        .await
        .map_err(|_| err(StatusCode::INTERNAL_SERVER_ERROR, "registry task failed"))?
        .map_err(|e| err(StatusCode::BAD_REQUEST, e.to_string()))?;
    Ok((
        StatusCode::CREATED,
        Json(station_json(&state.node, &s.id).await),
    ))
}

async fn remove_station(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let removed = state
        .node
        .stations
        .remove(&id)
        .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let _ = state.node.status.remove_station(&id).await;
    if removed {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(err(StatusCode::NOT_FOUND, format!("no station {id:?}")))
    }
}

async fn command(
    State(state): State<ApiState>,
    Path((id, action)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let payload: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| err(StatusCode::BAD_REQUEST, format!("body is not JSON: {e}")))?
    };
    let holder = holder_of(&state.node, &id).await;
    let timeout = std::time::Duration::from_secs(state.node.config.ocpp.call_timeout_secs + 2);
    match state
        .router
        .call(holder, &id, &action, payload, timeout)
        .await
    {
        Ok(CallAnswer::Result(p)) => Ok(Json(json!({ "status": "result", "payload": p }))),
        Ok(CallAnswer::Error {
            code,
            description,
            details,
        }) => Ok(Json(
            json!({ "status": "error", "error_code": code, "error_description": description, "error_details": details }),
        )),
        Err(e @ CallFailure::NotConnected(_)) => Err(err(StatusCode::CONFLICT, e.to_string())),
        Err(e @ (CallFailure::UnknownAction { .. } | CallFailure::InvalidPayload { .. })) => {
            Err(err(StatusCode::BAD_REQUEST, e.to_string()))
        }
        Err(e @ CallFailure::Timeout(_)) => Err(err(StatusCode::GATEWAY_TIMEOUT, e.to_string())),
        Err(e @ CallFailure::Busy) => Err(err(StatusCode::TOO_MANY_REQUESTS, e.to_string())),
        Err(e) => Err(err(StatusCode::BAD_GATEWAY, e.to_string())),
    }
}

/// The node holding `id`'s socket: this one when the session is here (fresher
/// than any store), else the presence record; `None` runs it locally, which
/// answers "not connected".
async fn holder_of(node: &Node, id: &str) -> Option<String> {
    if node.sessions.contains_key(id) {
        return Some(node.node_id.clone());
    }
    node.status
        .station(id)
        .await
        .ok()
        .flatten()
        .filter(|p| p.connected)
        .and_then(|p| p.node)
}

async fn list_tokens(State(state): State<ApiState>) -> Json<Value> {
    Json(serde_json::to_value(state.node.handlers.tokens.list()).unwrap_or_default())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    id_token: String,
    status: Option<IdTokenStatus>,
    expiry: Option<chrono::DateTime<chrono::Utc>>,
    group_id: Option<String>,
}

async fn add_token(
    State(state): State<ApiState>,
    body: Result<Json<NewToken>, axum::extract::rejection::JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let Json(t) = body.map_err(|e| {
        err(
            StatusCode::BAD_REQUEST,
            format!("expected {{\"id_token\": \"...\", \"status\": \"Accepted\"}}: {e}"),
        )
    })?;
    let rec = IdTokenRecord {
        id_token: t.id_token,
        status: t.status.unwrap_or(IdTokenStatus::Accepted),
        expiry: t.expiry,
        group_id: t.group_id,
    };
    state
        .node
        .handlers
        .tokens
        .add(rec)
        .map_err(|e| err(StatusCode::BAD_REQUEST, e.to_string()))?;
    Ok(StatusCode::CREATED)
}

async fn remove_token(
    State(state): State<ApiState>,
    Path(token): Path<String>,
) -> Result<StatusCode, ApiError> {
    match state.node.handlers.tokens.remove(&token) {
        Ok(true) => Ok(StatusCode::NO_CONTENT),
        Ok(false) => Err(err(StatusCode::NOT_FOUND, format!("no id token {token:?}"))),
        Err(e) => Err(err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::Wal;
    use axum::body::Body;
    use tower::ServiceExt;

    fn app(dir: &std::path::Path) -> (Router, Wal) {
        let (node, wal) = crate::server::test_node(dir);
        let exec_node = node.clone();
        let state = ApiState {
            router: crate::router::CommandRouter::local(
                node.node_id.clone(),
                crate::router::execute_fn(move |station, action, payload| {
                    let node = exec_node.clone();
                    async move { crate::session::call(&node, &station, &action, payload).await }
                }),
            ),
            node,
            admin_token: "secret".into(),
            metrics: crate::metrics::install(),
        };
        (router(state), wal)
    }

    async fn send(
        app: &Router,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = app
            .clone()
            .oneshot(req.body(Body::from(body.to_string())).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    #[tokio::test]
    async fn api_needs_the_admin_token() {
        let dir = tempfile::tempdir().unwrap();
        let (app, _wal) = app(dir.path());
        let (s, body) = send(&app, "GET", "/api/stations", None, "").await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert!(body["error"].as_str().unwrap().contains("Bearer"));
        assert_eq!(
            send(&app, "GET", "/api/stations", Some("nope"), "").await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            send(&app, "GET", "/api/openapi.json", None, "").await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            send(&app, "GET", "/api/stations", Some("secret"), "")
                .await
                .0,
            StatusCode::OK
        );
        assert_eq!(
            send(&app, "GET", "/healthz", None, "").await.0,
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn validation_errors_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let (app, _wal) = app(dir.path());
        let (s, b) = send(
            &app,
            "POST",
            "/api/stations",
            Some("secret"),
            "{\"name\": 1}",
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(b["error"].as_str().unwrap().contains("\"id\""), "{b}");
        let (s, b) = send(
            &app,
            "POST",
            "/api/stations",
            Some("secret"),
            "{\"id\": \"bad id\", \"password\": \"long-enough-pw\"}",
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
        let (s, b) = send(
            &app,
            "POST",
            "/api/stations",
            Some("secret"),
            "{\"id\": \"CP1\", \"password\": \"long-enough-pw\"}",
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        assert_eq!(b["id"], "CP1");
        assert_eq!(b["connected"], false);
        let (s, b) = send(
            &app,
            "POST",
            "/api/stations/CP1/commands/Reset",
            Some("secret"),
            "{\"type\": \"Hard\"}",
        )
        .await;
        assert_eq!(s, StatusCode::CONFLICT, "{b}");
        let (s, _) = send(
            &app,
            "POST",
            "/api/stations/CP1/commands/Reset",
            Some("secret"),
            "not json",
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(
            send(&app, "GET", "/api/stations/NOPE", Some("secret"), "")
                .await
                .0,
            StatusCode::NOT_FOUND
        );
    }

    /// The document lists exactly the routes the router serves.
    #[tokio::test]
    async fn openapi_matches_routes() {
        let dir = tempfile::tempdir().unwrap();
        let (app, _wal) = app(dir.path());
        let (s, doc) = send(&app, "GET", "/api/openapi.json", Some("secret"), "").await;
        assert_eq!(s, StatusCode::OK);
        let paths = doc["paths"].as_object().unwrap();
        for (method, path, _) in crate::openapi::ROUTES {
            assert!(
                paths[*path].get(*method).is_some(),
                "{method} {path} missing from the document"
            );
            let concrete = path
                .replace("{id}", "CP1")
                .replace("{action}", "Reset")
                .replace("{token}", "T1");
            let (s, _) = send(
                &app,
                &method.to_uppercase(),
                &concrete,
                Some("secret"),
                "{}",
            )
            .await;
            assert!(
                s != StatusCode::NOT_FOUND || path.contains('{'),
                "{method} {path}: {s}"
            );
            assert_ne!(s, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        }
        let listed: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
        assert_eq!(listed, crate::openapi::ROUTES.len());
    }
}
