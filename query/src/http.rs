//! `POST /sql` (served as `/api/sql` behind ingest's admin-token check): the
//! body is the SQL text (or `{"sql": "..."}`), the `Accept` header picks the
//! output format, errors are JSON `{"error": ..., "position": {line, column}}`.

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use serde_json::json;

use crate::render::{render_arrow_ipc, render_csv, render_json, render_parquet};
use crate::{QueryEngine, QueryError, QueryResult};

pub const JSON: &str = "application/json";
pub const CSV: &str = "text/csv";
pub const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";
pub const PARQUET: &str = "application/vnd.apache.parquet";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Json,
    Csv,
    Arrow,
    Parquet,
}

/// The first type in `Accept` that we can produce (JSON when absent or a
/// wildcard); `None` when none of the listed types is one of ours.
fn negotiate(headers: &HeaderMap) -> Option<Format> {
    let Some(accept) = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.trim().is_empty())
    else {
        return Some(Format::Json);
    };
    let mut ranked: Vec<(f32, usize, &str)> = accept
        .split(',')
        .enumerate()
        .filter_map(|(i, item)| {
            let mut parts = item.split(';');
            let media = parts.next()?.trim();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            (q > 0.0).then_some((q, i, media))
        })
        .collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    ranked
        .into_iter()
        .find_map(|(_, _, media)| match media.to_ascii_lowercase().as_str() {
            JSON | "*/*" | "application/*" => Some(Format::Json),
            CSV | "text/*" => Some(Format::Csv),
            ARROW_STREAM => Some(Format::Arrow),
            PARQUET | "application/x-parquet" => Some(Format::Parquet),
            _ => None,
        })
}

/// Routes to nest under `/api`: `POST /sql`.
pub fn api_router(engine: QueryEngine) -> Router {
    Router::new()
        .route("/sql", post(sql_handler))
        .with_state(engine)
}

fn error_response(e: &QueryError) -> Response {
    let status = match e {
        QueryError::Sql { .. } => StatusCode::BAD_REQUEST,
        QueryError::ReadOnly(_) => StatusCode::FORBIDDEN,
        QueryError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        QueryError::Memory(_) => StatusCode::UNPROCESSABLE_ENTITY,
        QueryError::TooManyRows(_) => StatusCode::PAYLOAD_TOO_LARGE,
        QueryError::Status(_) => StatusCode::SERVICE_UNAVAILABLE,
        QueryError::Lake(_) | QueryError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let mut body = json!({ "error": e.to_string() });
    if let Some(p) = e.position() {
        body["position"] = json!(p);
    }
    (status, axum::Json(body)).into_response()
}

fn render(result: &QueryResult, format: Format) -> Result<(Vec<u8>, &'static str), QueryError> {
    Ok(match format {
        Format::Json => (render_json(result)?, JSON),
        Format::Csv => (render_csv(result)?, "text/csv; charset=utf-8"),
        Format::Arrow => (render_arrow_ipc(result)?, ARROW_STREAM),
        Format::Parquet => (render_parquet(result)?, PARQUET),
    })
}

async fn sql_handler(
    State(engine): State<QueryEngine>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let Some(format) = negotiate(&headers) else {
        return (
            StatusCode::NOT_ACCEPTABLE,
            axum::Json(json!({
                "error": format!("cannot produce the Accept type; use one of {JSON}, {CSV}, {ARROW_STREAM}, {PARQUET}")
            })),
        )
            .into_response();
    };
    // The body is the SQL text, or a JSON object with an `sql` field (SQL
    // never starts with `{`).
    let wrapped: Option<String> = body
        .trim_start()
        .starts_with('{')
        .then(|| serde_json::from_str::<serde_json::Value>(&body).ok())
        .flatten()
        .and_then(|v| v.get("sql").and_then(|s| s.as_str()).map(str::to_string));
    let sql = wrapped.as_deref().unwrap_or_else(|| body.trim());
    if sql.is_empty() {
        return error_response(&QueryError::Sql {
            message: "the request body must be the SQL text".into(),
            position: None,
        });
    }
    match engine.sql(sql).await.and_then(|r| render(&r, format)) {
        Ok((bytes, content_type)) => {
            ([(header::CONTENT_TYPE, content_type)], bytes).into_response()
        }
        Err(e) => {
            tracing::debug!(error = %e, "SQL request failed");
            error_response(&e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn accept(v: &str) -> Option<Format> {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, HeaderValue::from_str(v).unwrap());
        negotiate(&h)
    }

    async fn post(
        engine: &QueryEngine,
        accept: Option<&str>,
        sql: &str,
    ) -> (StatusCode, String, Vec<u8>) {
        use tower::ServiceExt;
        let mut req = axum::http::Request::post("/sql");
        if let Some(a) = accept {
            req = req.header(header::ACCEPT, a);
        }
        let resp = api_router(engine.clone())
            .oneshot(req.body(axum::body::Body::from(sql.to_string())).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let ct = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, ct, body.to_vec())
    }

    #[tokio::test]
    async fn sql_endpoint_answers_in_each_format_and_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let engine = QueryEngine::new(
            dir.path().to_str().unwrap(),
            Default::default(),
            None,
            crate::QueryConfig::default(),
        );
        let sql = "SELECT * FROM (VALUES (1, 'CP1'), (2, 'CP,2')) AS t(n, station_id) ORDER BY n";

        let (status, ct, body) = post(&engine, None, sql).await;
        assert_eq!((status, ct.as_str()), (StatusCode::OK, JSON));
        let rows: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            rows,
            json!([{"n": 1, "station_id": "CP1"}, {"n": 2, "station_id": "CP,2"}])
        );
        // The JSON-wrapped form too.
        let (status, _, body) = post(&engine, None, &json!({"sql": sql}).to_string()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
            rows
        );

        let (status, ct, body) = post(&engine, Some("text/csv"), sql).await;
        assert_eq!(status, StatusCode::OK);
        assert!(ct.starts_with(CSV), "{ct}");
        assert_eq!(
            String::from_utf8(body).unwrap(),
            "n,station_id\n1,CP1\n2,\"CP,2\"\n"
        );

        let (status, ct, body) = post(&engine, Some(ARROW_STREAM), sql).await;
        assert_eq!((status, ct.as_str()), (StatusCode::OK, ARROW_STREAM));
        let reader =
            deltalake::arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(body), None)
                .unwrap();
        assert_eq!(reader.schema().field(1).name(), "station_id");
        let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
        assert_eq!(rows, 2);

        let (status, ct, body) = post(&engine, Some(PARQUET), sql).await;
        assert_eq!((status, ct.as_str()), (StatusCode::OK, PARQUET));
        assert!(body.starts_with(b"PAR1") && body.ends_with(b"PAR1"));

        let (status, _, body) = post(&engine, None, "DROP TABLE bronze.ocpp_messages").await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let err: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(
            err["error"].as_str().unwrap().contains("DROP TABLE"),
            "{err}"
        );

        let (status, _, body) = post(&engine, None, "SELECT 1,\nFROM WHERE").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let err: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(err["position"]["line"], 2, "{err}");
        assert!(err["error"].as_str().is_some_and(|e| !e.is_empty()));

        let (status, _, _) = post(&engine, Some("image/png"), sql).await;
        assert_eq!(status, StatusCode::NOT_ACCEPTABLE);
        let (status, _, _) = post(&engine, None, "  ").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn accept_picks_the_preferred_known_type() {
        assert_eq!(negotiate(&HeaderMap::new()), Some(Format::Json));
        assert_eq!(accept("*/*"), Some(Format::Json));
        assert_eq!(accept("text/csv"), Some(Format::Csv));
        assert_eq!(accept("image/png, text/csv;q=0.5"), Some(Format::Csv));
        assert_eq!(
            accept("application/json;q=0.1, application/vnd.apache.arrow.stream"),
            Some(Format::Arrow)
        );
        assert_eq!(
            accept("application/vnd.apache.parquet"),
            Some(Format::Parquet)
        );
        assert_eq!(accept("image/png"), None);
        assert_eq!(accept("text/csv;q=0"), None);
    }
}
