//! Mail delivery over SMTP (lettre, rustls).
//!
//! # `SMTP_URL`
//! lettre's connection URL rules:
//! - `smtp://host:port`: plain SMTP, no TLS (a local relay or a test sink);
//! - `smtp://host:587?tls=required`: STARTTLS, refused if the server does not
//!   offer it; `?tls=opportunistic`: STARTTLS when offered (not safe against
//!   a man in the middle);
//! - `smtps://host:465`: implicit TLS.
//!
//! `user:pass@` in the URL (percent-encoded) enables authentication (PLAIN
//! or LOGIN, as the server offers); a path (`smtp://host/ehlo-name`) sets the
//! EHLO name. TLS certificates are checked against the operating system's
//! trust store.

use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::message::{Attachment, Mailbox, MultiPart};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::ReportError;
use crate::report::RenderedReport;

/// SMTP settings (`[smtp]` of `csms.toml`; `SMTP_URL` sets `url`).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(default)]
pub struct SmtpConfig {
    /// Connection URL (see the module documentation); `None`: mail cannot
    /// be sent, reports can only be written to a folder.
    pub url: Option<String>,
    /// Sender address.
    pub from: String,
    /// Limit for each SMTP command and the connection, per attempt.
    pub timeout_secs: u64,
    /// Delivery attempts before giving up on a transient failure.
    pub attempts: u32,
    /// Wait before the second attempt; doubled before each further one.
    pub retry_backoff_ms: u64,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            url: None,
            from: "csms@localhost".into(),
            timeout_secs: 30,
            attempts: 3,
            retry_backoff_ms: 1000,
        }
    }
}

fn mailbox(addr: &str) -> Result<Mailbox, ReportError> {
    addr.parse()
        .map_err(|e| ReportError::Message(format!("invalid address {addr:?}: {e}")))
}

/// The full MIME message: multipart/mixed of a multipart/alternative (text,
/// HTML) and, when a station is listed, the CSV and PNG attachments.
pub fn build_message(
    r: &RenderedReport,
    from: &str,
    to: &[String],
) -> Result<Message, ReportError> {
    if to.is_empty() {
        return Err(ReportError::NoRecipients);
    }
    let mut builder = Message::builder()
        .from(mailbox(from)?)
        .subject(r.subject.clone());
    for addr in to {
        builder = builder.to(mailbox(addr)?);
    }
    let mut body = MultiPart::mixed().multipart(MultiPart::alternative_plain_html(
        r.text.clone(),
        r.html.clone(),
    ));
    if r.has_rows {
        let csv_type = ContentType::parse("text/csv; charset=utf-8")
            .map_err(|e| ReportError::Message(e.to_string()))?;
        body = body.singlepart(Attachment::new(r.csv_name()).body(r.csv.clone(), csv_type));
    }
    if let Some(png) = &r.png {
        let png_type =
            ContentType::parse("image/png").map_err(|e| ReportError::Message(e.to_string()))?;
        body = body.singlepart(Attachment::new(r.png_name()).body(png.clone(), png_type));
    }
    builder
        .multipart(body)
        .map_err(|e| ReportError::Message(e.to_string()))
}

/// `host:port` of an SMTP URL, for messages (never the credentials).
fn server_name(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => {
            let port = u.port().map(|p| format!(":{p}")).unwrap_or_default();
            format!(
                "{}://{}{port}",
                u.scheme(),
                u.host_str().unwrap_or("<no host>")
            )
        }
        Err(_) => "<unparsable SMTP_URL>".into(),
    }
}

/// What went wrong, in words, and whether another attempt may succeed.
fn describe(e: &lettre::transport::smtp::Error) -> (String, bool) {
    let kind = if e.is_permanent() {
        "rejected (permanent)"
    } else if e.is_transient() {
        "refused for now (transient)"
    } else if e.is_timeout() {
        "timed out"
    } else if e.is_tls() {
        "TLS failed"
    } else if e.is_client() {
        "client error"
    } else {
        "connection failed"
    };
    let retry = !(e.is_permanent() || e.is_client() || e.is_tls());
    // lettre's Display is terse; its source chain carries the I/O cause.
    let mut what = format!("{kind}: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        what.push_str(&format!(": {s}"));
        source = s.source();
    }
    (what, retry)
}

/// Sends the report to `recipients` through `smtp.url`, retrying transient
/// failures (connection refused or reset, timeouts, 4xx answers) with
/// exponential backoff; permanent rejections (5xx) fail at once. Every
/// attempt is logged and counted (`csms_report_email_attempts_total`).
pub async fn send(
    r: &RenderedReport,
    smtp: &SmtpConfig,
    recipients: &[String],
) -> Result<(), ReportError> {
    smtp.url.as_deref().ok_or(ReportError::NoSmtp)?;
    let message = build_message(r, &smtp.from, recipients)?;
    deliver(message, smtp, &r.subject, recipients.len()).await
}

/// A plain mail without attachments: multipart/alternative of `text` and
/// `html` (alerts, the daily digest).
pub fn build_simple_message(
    from: &str,
    to: &[String],
    subject: &str,
    text: &str,
    html: &str,
) -> Result<Message, ReportError> {
    if to.is_empty() {
        return Err(ReportError::NoRecipients);
    }
    let mut builder = Message::builder().from(mailbox(from)?).subject(subject);
    for addr in to {
        builder = builder.to(mailbox(addr)?);
    }
    builder
        .multipart(MultiPart::alternative_plain_html(
            text.to_string(),
            html.to_string(),
        ))
        .map_err(|e| ReportError::Message(e.to_string()))
}

/// Sends a [`build_simple_message`] mail, with the retries of [`send`].
pub async fn send_simple(
    smtp: &SmtpConfig,
    recipients: &[String],
    subject: &str,
    text: &str,
    html: &str,
) -> Result<(), ReportError> {
    smtp.url.as_deref().ok_or(ReportError::NoSmtp)?;
    let message = build_simple_message(&smtp.from, recipients, subject, text, html)?;
    deliver(message, smtp, subject, recipients.len()).await
}

/// Delivers `message` through `smtp.url` with the retry policy of [`send`].
async fn deliver(
    message: Message,
    smtp: &SmtpConfig,
    subject: &str,
    recipients: usize,
) -> Result<(), ReportError> {
    let url = smtp.url.as_deref().ok_or(ReportError::NoSmtp)?;
    let server = server_name(url);
    let transport: AsyncSmtpTransport<Tokio1Executor> =
        AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|e| ReportError::SmtpUrl(format!("{server}: {e}")))?
            .timeout(Some(Duration::from_secs(smtp.timeout_secs.max(1))))
            .build();
    let attempts = smtp.attempts.max(1);
    let mut backoff = Duration::from_millis(smtp.retry_backoff_ms);
    for attempt in 1..=attempts {
        match transport.send(message.clone()).await {
            Ok(response) => {
                metrics::counter!("csms_report_email_attempts_total", "result" => "sent")
                    .increment(1);
                tracing::info!(
                    %server,
                    %subject,
                    recipients,
                    attempt,
                    code = %response.code(),
                    "mail sent"
                );
                return Ok(());
            }
            Err(e) => {
                let (what, retry) = describe(&e);
                metrics::counter!("csms_report_email_attempts_total", "result" => "failed")
                    .increment(1);
                if !retry || attempt == attempts {
                    metrics::counter!("csms_report_email_failures_total").increment(1);
                    tracing::error!(%server, %subject, attempt, error = %what, "mail not delivered");
                    return Err(ReportError::Smtp {
                        server,
                        attempts: attempt,
                        what,
                    });
                }
                tracing::warn!(%server, attempt, error = %what, retry_in = ?backoff, "mail delivery failed, retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        }
    }
    unreachable!("the last attempt returns")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::render_fault_ranking;
    use crate::report::tests::{empty, sample};

    #[test]
    fn config_defaults_and_partial() {
        let c: SmtpConfig = serde_json::from_str(r#"{"url": "smtp://localhost:2525"}"#).unwrap();
        assert_eq!(c.from, "csms@localhost");
        assert_eq!(c.attempts, 3);
        assert_eq!(c.url.as_deref(), Some("smtp://localhost:2525"));
    }

    #[test]
    fn server_name_hides_credentials() {
        assert_eq!(
            server_name("smtp://bob:secret@mail.example.com:587?tls=required"),
            "smtp://mail.example.com:587"
        );
        assert_eq!(
            server_name("smtps://u:p@mail.example.com"),
            "smtps://mail.example.com"
        );
    }

    #[test]
    fn message_structure() {
        let r = render_fault_ranking(&sample()).unwrap();
        let m = build_message(&r, "csms@localhost", &["a@example.com".into()]).unwrap();
        let text = String::from_utf8_lossy(&m.formatted()).into_owned();
        assert!(text.contains("multipart/mixed"));
        assert!(text.contains("multipart/alternative"));
        assert!(text.contains("text/csv"));
        assert!(text.contains("image/png"));
        assert!(text.contains("daily-faults-2025-03.png"));
        let e = render_fault_ranking(&empty()).unwrap();
        let m = build_message(&e, "csms@localhost", &["a@example.com".into()]).unwrap();
        let text = String::from_utf8_lossy(&m.formatted()).into_owned();
        assert!(!text.contains("text/csv") && !text.contains("image/png"));
        assert!(matches!(
            build_message(&e, "csms@localhost", &[]),
            Err(ReportError::NoRecipients)
        ));
        assert!(matches!(
            build_message(&e, "csms@localhost", &["not an address".into()]),
            Err(ReportError::Message(_))
        ));
    }

    #[tokio::test]
    async fn unreachable_server_fails_after_retries_naming_it() {
        // A port nobody listens on: bind, note the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let smtp = SmtpConfig {
            url: Some(format!("smtp://127.0.0.1:{port}")),
            timeout_secs: 2,
            attempts: 3,
            retry_backoff_ms: 10,
            ..SmtpConfig::default()
        };
        let r = render_fault_ranking(&empty()).unwrap();
        let err = send(&r, &smtp, &["ops@example.com".into()])
            .await
            .unwrap_err();
        match &err {
            ReportError::Smtp {
                server, attempts, ..
            } => {
                assert_eq!(server, &format!("smtp://127.0.0.1:{port}"));
                assert_eq!(*attempts, 3);
            }
            other => panic!("unexpected error {other:?}"),
        }
        assert!(err.to_string().contains("connection"), "{err}");
        assert!(matches!(
            send(&r, &SmtpConfig::default(), &["ops@example.com".into()]).await,
            Err(ReportError::NoSmtp)
        ));
    }
}
