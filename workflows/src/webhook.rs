//! Webhook delivery: one JSON POST, retried with backoff while the failure
//! may pass (connection refused or reset, timeouts, 5xx, 429); other 4xx
//! answers fail at once, since repeating the same body cannot fix them.
//!
//! The reqwest build of this workspace has rustls with the operating
//! system's roots enabled (through object_store), so `https://` URLs work.
//! Webhook URLs often carry a secret in their path or query (chat
//! integrations), so logs and errors name only scheme, host and port.

use std::time::Duration;

use serde_json::Value;

use crate::JobError;

/// Limit for connecting to the receiver, per attempt.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Limit for a whole request (connect, send, answer), per attempt.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A client with bounded timeouts ([`CONNECT_TIMEOUT`], [`REQUEST_TIMEOUT`]).
/// Build one and reuse it: it pools connections.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .user_agent(concat!("csms-workflows/", env!("CARGO_PKG_VERSION")))
        .build()
        // Only a TLS backend failing to initialise makes this fail; the
        // default client has the same configuration less the timeouts, and
        // each request still gets REQUEST_TIMEOUT below.
        .unwrap_or_default()
}

/// `scheme://host:port` of `url`, for logs and errors.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => {
            let port = u.port().map(|p| format!(":{p}")).unwrap_or_default();
            format!(
                "{}://{}{port}",
                u.scheme(),
                u.host_str().unwrap_or("<no host>")
            )
        }
        Err(_) => "<unparsable webhook URL>".into(),
    }
}

/// POSTs `body` as `application/json` to `url`, up to `attempts` times,
/// waiting `backoff` before the second attempt and doubling it before each
/// further one. A 2xx answer is success. Counts the outcome in
/// `csms_webhook_deliveries_total{outcome="delivered"|"failed"}` and each
/// failed attempt in `csms_webhook_attempts_failed_total`.
pub async fn post_json(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
    attempts: u32,
    backoff: Duration,
) -> Result<(), JobError> {
    let target = redact(url);
    let fail = |reason: String| {
        metrics::counter!("csms_webhook_deliveries_total", "outcome" => "failed").increment(1);
        tracing::error!(webhook = %target, error = %reason, "webhook not delivered");
        JobError::Webhook {
            url: target.clone(),
            reason,
        }
    };
    let parsed = match url::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => u,
        Ok(u) => return Err(fail(format!("unsupported scheme {:?}", u.scheme()))),
        Err(e) => return Err(fail(format!("invalid URL: {e}"))),
    };
    // Serialising a `Value` cannot fail.
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let attempts = attempts.max(1);
    let mut wait = backoff;
    for attempt in 1..=attempts {
        let sent = client
            .post(parsed.clone())
            .timeout(REQUEST_TIMEOUT)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(bytes.clone())
            .send()
            .await;
        let (what, retry) = match sent {
            Ok(answer) if answer.status().is_success() => {
                metrics::counter!("csms_webhook_deliveries_total", "outcome" => "delivered")
                    .increment(1);
                tracing::debug!(webhook = %target, attempt, status = %answer.status(), "webhook delivered");
                return Ok(());
            }
            Ok(answer) => {
                let status = answer.status();
                let retry = status.is_server_error()
                    || status == reqwest::StatusCode::TOO_MANY_REQUESTS
                    || status == reqwest::StatusCode::REQUEST_TIMEOUT;
                (format!("answered {status}"), retry)
            }
            Err(e) => {
                let kind = if e.is_timeout() {
                    "timed out"
                } else if e.is_connect() {
                    "could not connect"
                } else {
                    "request failed"
                };
                // reqwest's Display names the URL; its sources carry the
                // cause without it.
                let mut what = kind.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    what.push_str(&format!(": {s}"));
                    source = s.source();
                }
                (what, true)
            }
        };
        metrics::counter!("csms_webhook_attempts_failed_total").increment(1);
        if !retry || attempt == attempts {
            return Err(fail(format!("{what} (attempt {attempt} of {attempts})")));
        }
        tracing::warn!(webhook = %target, attempt, error = %what, retry_in = ?wait, "webhook delivery failed, retrying");
        tokio::time::sleep(wait).await;
        wait *= 2;
    }
    unreachable!("the last attempt returns")
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use axum::Router;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;
    use parking_lot::Mutex;

    use super::*;

    /// A real HTTP receiver on 127.0.0.1 recording JSON bodies. It answers
    /// `fail_first` requests with 503 before accepting.
    #[derive(Clone)]
    pub(crate) struct Receiver {
        pub addr: SocketAddr,
        pub bodies: Arc<Mutex<Vec<Value>>>,
        pub requests: Arc<AtomicU32>,
        fail_first: Arc<AtomicU32>,
        status: Arc<Mutex<StatusCode>>,
        shutdown: tokio_util::sync::CancellationToken,
        task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
    }

    impl Receiver {
        pub(crate) async fn start() -> Receiver {
            Self::start_on("127.0.0.1:0".parse().unwrap()).await
        }

        /// Listens on `addr` (to come back on the same port after [`stop`]).
        pub(crate) async fn start_on(addr: SocketAddr) -> Receiver {
            let bodies: Arc<Mutex<Vec<Value>>> = Default::default();
            let requests = Arc::new(AtomicU32::new(0));
            let fail_first = Arc::new(AtomicU32::new(0));
            let status = Arc::new(Mutex::new(StatusCode::NO_CONTENT));
            let (b, r, f, s) = (
                bodies.clone(),
                requests.clone(),
                fail_first.clone(),
                status.clone(),
            );
            let app = Router::new().route(
                "/hook/{secret}",
                post(move |headers: HeaderMap, body: String| {
                    let (b, r, f, s) = (b.clone(), r.clone(), f.clone(), s.clone());
                    async move {
                        r.fetch_add(1, Ordering::SeqCst);
                        if f.load(Ordering::SeqCst) > 0 {
                            f.fetch_sub(1, Ordering::SeqCst);
                            return StatusCode::SERVICE_UNAVAILABLE;
                        }
                        let json = headers
                            .get("content-type")
                            .is_some_and(|v| v == "application/json");
                        match serde_json::from_str::<Value>(&body) {
                            Ok(v) if json => {
                                b.lock().push(v);
                                *s.lock()
                            }
                            _ => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        }
                    }
                }),
            );
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let shutdown = tokio_util::sync::CancellationToken::new();
            let stop = shutdown.clone();
            let task = tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await
                    .unwrap();
            });
            Receiver {
                addr,
                bodies,
                requests,
                fail_first,
                status,
                shutdown,
                task: Arc::new(Mutex::new(Some(task))),
            }
        }

        pub(crate) fn url(&self) -> String {
            format!("http://{}/hook/s3cret", self.addr)
        }

        pub(crate) fn fail_first(&self, n: u32) {
            self.fail_first.store(n, Ordering::SeqCst);
        }

        pub(crate) fn answer(&self, status: StatusCode) {
            *self.status.lock() = status;
        }

        /// Stops listening and closes idle kept-alive connections, so
        /// connections are refused until a receiver starts on the port again.
        pub(crate) async fn stop(&self) {
            self.shutdown.cancel();
            let task = self.task.lock().take();
            if let Some(task) = task {
                task.await.unwrap();
            }
        }

        pub(crate) fn bodies(&self) -> Vec<Value> {
            self.bodies.lock().clone()
        }
    }

    fn free_port_url() -> String {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        format!("http://127.0.0.1:{port}/hook/x")
    }

    #[tokio::test]
    async fn delivers_json_and_retries_5xx() {
        let rx = Receiver::start().await;
        let c = client();
        let body = serde_json::json!({"event": "raised", "alert_id": "offline:CP1"});
        post_json(&c, &rx.url(), &body, 3, Duration::from_millis(10))
            .await
            .unwrap();
        assert_eq!(rx.bodies(), vec![body.clone()]);

        rx.fail_first(2);
        post_json(&c, &rx.url(), &body, 3, Duration::from_millis(10))
            .await
            .unwrap();
        assert_eq!(rx.bodies().len(), 2);
        assert_eq!(rx.requests.load(Ordering::SeqCst), 4);

        rx.fail_first(3);
        let err = post_json(&c, &rx.url(), &body, 3, Duration::from_millis(10))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("503") && text.contains("attempt 3 of 3"),
            "{text}"
        );
        assert!(
            !text.contains("s3cret"),
            "the secret path is not shown: {text}"
        );
        assert_eq!(rx.bodies().len(), 2);
    }

    #[tokio::test]
    async fn client_errors_are_not_retried() {
        let rx = Receiver::start().await;
        rx.answer(StatusCode::BAD_REQUEST);
        let err = post_json(
            &client(),
            &rx.url(),
            &serde_json::json!({}),
            5,
            Duration::from_millis(10),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("attempt 1 of 5"), "{err}");
        assert_eq!(rx.requests.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn unreachable_receiver_and_bad_urls_fail_clearly() {
        let url = free_port_url();
        let err = post_json(
            &client(),
            &url,
            &serde_json::json!({}),
            2,
            Duration::from_millis(10),
        )
        .await
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("could not connect") && text.contains("attempt 2 of 2"),
            "{text}"
        );
        for bad in ["ftp://example.com/x", "not a url"] {
            assert!(
                post_json(&client(), bad, &serde_json::json!({}), 1, Duration::ZERO)
                    .await
                    .is_err()
            );
        }
        assert_eq!(
            redact("https://hooks.example.com/services/T0/B0/XYZ?token=1"),
            "https://hooks.example.com"
        );
    }
}
