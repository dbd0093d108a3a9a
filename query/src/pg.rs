//! The PostgreSQL wire protocol (`CSMS_PG_ADDR`), so analysts use psql,
//! DBeaver, psycopg or JDBC against the same [`QueryEngine`] as `POST
//! /api/sql`: every statement goes through its read-only checks, timeout,
//! memory pool and row limit, over its catalog (`bronze.*`, `silver.*`,
//! `gold.*`, `live.*`).
//!
//! pgwire speaks the protocol (SCRAM-SHA-256 authentication, simple and
//! extended query); `datafusion-pg-catalog` adds `pg_catalog` and the
//! PostgreSQL functions that client catalog queries (`\dt`, DBeaver's
//! navigator) use, and rewrites their PostgreSQL-only syntax; `arrow-pg`
//! encodes Arrow rows. Session commands a client sends on its own (`SET
//! application_name`, `BEGIN`, `SHOW transaction_isolation`) are answered
//! here without touching any data; `SET` of a DataFusion option still goes
//! to the engine, which refuses it.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Arc;

use arrow_pg::datatypes::df::deserialize_parameters_with_server_types;
use arrow_pg::datatypes::{arrow_schema_to_pg_fields, encode_recordbatch, into_pg_type};
use async_trait::async_trait;
use datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use datafusion_pg_catalog::pg_catalog::setup_pg_catalog;
use datafusion_pg_catalog::sql::PostgresCompatibilityParser;
use deltalake::arrow::array::{RecordBatch, StringArray};
use deltalake::arrow::datatypes::{DataType, Field, Schema};
use deltalake::datafusion::common::config::Dialect;
use deltalake::datafusion::sql::sqlparser::ast::Statement;
use futures_util::Sink;
use pgwire::api::auth::sasl::SASLAuthStartupHandler;
use pgwire::api::auth::sasl::scram::{ScramAuth, gen_salted_password};
use pgwire::api::auth::{
    AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler,
};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{DescribePortalResponse, DescribeStatementResponse, FieldInfo};
use pgwire::api::results::{QueryResponse, Response, Tag};
use pgwire::api::stmt::{QueryParser, StoredStatement};
use pgwire::api::store::PortalStore;
use pgwire::api::{ClientInfo, ClientPortalStore, PgWireServerHandlers, Type};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::PgWireBackendMessage;
use pgwire::types::format::FormatOptions;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::engine::{CATALOG, Described, Extras, SessionSetup};
use crate::{QueryEngine, QueryError, QueryResult};

/// The login whose password is the admin token.
pub const ANALYST_USER: &str = "analyst";
/// PBKDF2 rounds of SCRAM-SHA-256 (PostgreSQL's default).
const SCRAM_ITERATIONS: usize = 4096;

/// Who may log in: `analyst` with the admin token, plus configured users.
/// Passwords are kept only as salted SCRAM keys, computed once at start
/// rather than per connection.
#[derive(Clone)]
pub struct PgAuth {
    users: Arc<HashMap<String, Password>>,
}

impl Debug for PgAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&String> = self.users.keys().collect();
        names.sort();
        f.debug_struct("PgAuth").field("users", &names).finish()
    }
}

impl PgAuth {
    /// `analyst` logs in with `admin_token` (no admin token: no analyst
    /// login); `users` maps further user names to passwords (`[query]
    /// pg_users`). Empty passwords are ignored.
    pub fn new(admin_token: Option<&str>, users: &HashMap<String, String>) -> Self {
        let mut salted = HashMap::new();
        let entries = users
            .iter()
            .map(|(u, p)| (u.as_str(), p.as_str()))
            .chain(admin_token.map(|t| (ANALYST_USER, t)));
        for (user, password) in entries {
            if password.is_empty() {
                warn!(user, "PostgreSQL user without a password ignored");
                continue;
            }
            let salt: [u8; 16] = rand::random();
            let key = gen_salted_password(password, &salt, SCRAM_ITERATIONS);
            salted.insert(user.to_string(), Password::new(Some(salt.to_vec()), key));
        }
        Self {
            users: Arc::new(salted),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

fn user_error(code: &str, message: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "FATAL".into(),
        code.into(),
        message.into(),
    )))
}

#[async_trait]
impl AuthSource for PgAuth {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        let user = login.user().unwrap_or_default();
        // psql defaults the database to the user name; only `csms` exists.
        let database = login.database().unwrap_or(user);
        if database != CATALOG {
            metrics::counter!("csms_pg_logins_total", "outcome" => "unknown_database").increment(1);
            return Err(user_error(
                "3D000",
                format!("database \"{database}\" does not exist (use \"{CATALOG}\")"),
            ));
        }
        match self.users.get(user) {
            Some(p) => Ok(p.clone()),
            None => {
                metrics::counter!("csms_pg_logins_total", "outcome" => "unknown_user").increment(1);
                Err(user_error(
                    "28P01",
                    format!("password authentication failed for user \"{user}\""),
                ))
            }
        }
    }
}

/// Serves the PostgreSQL protocol on `listener` until `shutdown`; each
/// connection is a task on the caller's runtime (queries themselves run on
/// the engine's runtime).
pub async fn serve(
    engine: QueryEngine,
    listener: TcpListener,
    auth: PgAuth,
    shutdown: CancellationToken,
) {
    if auth.is_empty() {
        warn!("no PostgreSQL users (set CSMS_ADMIN_TOKEN or [query] pg_users): every login fails");
    }
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "PostgreSQL wire protocol listening");
    }
    let handlers = Arc::new(Handlers::new(engine, auth));
    loop {
        let (socket, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "PostgreSQL accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = socket.set_nodelay(true);
        let handlers = handlers.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            metrics::gauge!("csms_pg_connections").increment(1.0);
            tokio::select! {
                r = pgwire::tokio::process_socket(socket, None, handlers) => {
                    if let Err(e) = r {
                        debug!(%peer, error = %e, "PostgreSQL connection ended with an error");
                    }
                }
                _ = shutdown.cancelled() => {}
            }
            metrics::gauge!("csms_pg_connections").decrement(1.0);
        });
    }
}

struct Handlers {
    auth: PgAuth,
    query: Arc<PgQuery>,
}

impl Handlers {
    fn new(engine: QueryEngine, auth: PgAuth) -> Self {
        let setup = pg_session_setup();
        Self {
            auth,
            query: Arc::new(PgQuery {
                engine: engine.clone(),
                parser: Arc::new(PgParser {
                    engine,
                    parser: PostgresCompatibilityParser::new(),
                    setup: setup.clone(),
                }),
                setup,
            }),
        }
    }
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.query.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.query.clone()
    }

    /// A new handler per connection: it holds that connection's SASL state.
    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        let mut scram = ScramAuth::new(Arc::new(self.auth.clone()));
        scram.set_iterations(SCRAM_ITERATIONS);
        let mut params = DefaultServerParameterProvider::default();
        params.server_version = "16.6-csms".into();
        params.is_superuser = false;
        params.default_transaction_read_only = true;
        params.time_zone = "UTC".into();
        Arc::new(SASLAuthStartupHandler::new(Arc::new(params)).with_scram(scram))
    }
}

/// `pg_catalog`, the PostgreSQL functions clients call, and PostgreSQL SQL
/// syntax, in each query's session.
fn pg_session_setup() -> SessionSetup {
    Arc::new(|ctx| {
        setup_pg_catalog(ctx, CATALOG, EmptyContextProvider)
            .map_err(|e| QueryError::Internal(format!("pg_catalog: {e}")))?;
        ctx.state_ref()
            .write()
            .config_mut()
            .options_mut()
            .sql_parser
            .dialect = Dialect::PostgreSQL;
        Ok(())
    })
}

/// The SQLSTATE and message a client gets for an engine error.
pub(crate) fn error_info(e: &QueryError, sql: &str) -> ErrorInfo {
    let code = match e {
        // read_only_sql_transaction
        QueryError::ReadOnly(_) => "25006",
        // query_canceled, as PostgreSQL's statement_timeout
        QueryError::Timeout(_) => "57014",
        // out_of_memory
        QueryError::Memory(_) => "53200",
        // program_limit_exceeded
        QueryError::TooManyRows(_) => "54000",
        QueryError::Sql { message, .. } => sql_error_code(message),
        // system_error: the lake or the status store is unreachable
        QueryError::Lake(_) | QueryError::Status(_) => "58000",
        QueryError::Internal(_) => "XX000",
    };
    let message = match e {
        QueryError::Timeout(d) => {
            format!(
                "canceling statement due to statement timeout ({}s)",
                d.as_secs()
            )
        }
        other => other.to_string(),
    };
    let mut info = ErrorInfo::new("ERROR".into(), code.into(), message);
    if let Some(p) = e.position() {
        info.position = char_offset(sql, p.line, p.column).map(|o| o.to_string());
    }
    info
}

fn sql_error_code(message: &str) -> &'static str {
    if message.contains("ParserError") || message.contains("SQL error") {
        "42601" // syntax_error
    } else if message.contains("not found") && message.contains("table") {
        "42P01" // undefined_table
    } else if message.contains("No field named") {
        "42703" // undefined_column
    } else if message.contains("not implemented") || message.contains("Unsupported") {
        "0A000" // feature_not_supported
    } else if message.contains("Invalid function") {
        "42883" // undefined_function
    } else {
        "42000" // syntax_error_or_access_rule_violation
    }
}

/// PostgreSQL's error position: 1-based characters into the query text.
fn char_offset(sql: &str, line: u64, column: u64) -> Option<usize> {
    let mut offset = 0usize;
    for (i, text) in sql.split('\n').enumerate() {
        if i as u64 + 1 == line {
            return Some(offset + column as usize);
        }
        offset += text.chars().count() + 1;
    }
    None
}

fn to_pg_error(e: &QueryError, sql: &str) -> PgWireError {
    PgWireError::UserError(Box::new(error_info(e, sql)))
}

/// What one client statement is.
#[derive(Clone, Debug)]
enum Kind {
    /// Runs on the engine.
    Query,
    /// A session command answered with this tag (SET, BEGIN, COMMIT, ...).
    Ack(Tag),
    /// `SHOW name` of a setting clients read, answered with this value.
    Show(String, String),
}

/// A parsed statement of the extended protocol.
#[derive(Clone, Debug)]
pub struct PgStatement {
    /// The statement as the engine gets it (after PostgreSQL rewrites).
    sql: String,
    kind: Kind,
    described: Option<Described>,
}

fn tag(command: &str) -> Tag {
    Tag::new(command)
}

/// Settings clients read with `SHOW` at connect (JDBC, DBeaver, psql).
fn show_value(name: &str) -> Option<&'static str> {
    Some(match name.to_ascii_lowercase().as_str() {
        "transaction_isolation" | "transaction isolation level" => "read committed",
        "transaction_read_only" | "default_transaction_read_only" => "on",
        "server_version" => "16.6",
        "server_version_num" => "160006",
        "server_encoding" | "client_encoding" => "UTF8",
        "standard_conforming_strings" => "on",
        "datestyle" => "ISO, MDY",
        "timezone" => "UTC",
        "search_path" => "public",
        "integer_datetimes" => "on",
        "max_identifier_length" => "63",
        "lc_collate" | "lc_ctype" => "C",
        _ => return None,
    })
}

fn classify(statement: &Statement) -> Kind {
    let text = statement.to_string();
    let upper = text.trim_start().to_ascii_uppercase();
    let first = upper
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    match first.as_str() {
        "BEGIN" | "START" => Kind::Ack(tag("BEGIN")),
        "COMMIT" | "END" => Kind::Ack(tag("COMMIT")),
        "ROLLBACK" | "ABORT" => Kind::Ack(tag("ROLLBACK")),
        "DISCARD" => Kind::Ack(tag("DISCARD ALL")),
        "DEALLOCATE" => Kind::Ack(tag("DEALLOCATE")),
        // Client session settings change nothing on the server; DataFusion
        // options (and SET ROLE/SESSION AUTHORIZATION) go to the engine,
        // which refuses them.
        "SET"
            if !upper.contains("DATAFUSION.")
                && !upper.starts_with("SET ROLE")
                && !upper.starts_with("SET SESSION AUTHORIZATION") =>
        {
            Kind::Ack(tag("SET"))
        }
        "SHOW" => {
            let name = text.trim_start()[4..].trim().trim_end_matches(';').trim();
            let name = name.trim_matches('"');
            match show_value(name) {
                Some(v) => Kind::Show(name.to_string(), v.to_string()),
                None => Kind::Query,
            }
        }
        _ => Kind::Query,
    }
}

/// The one-row answer to a `SHOW` handled here.
fn show_result(name: &str, value: &str) -> QueryResult {
    let schema = Arc::new(Schema::new(vec![Field::new(name, DataType::Utf8, false)]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![Arc::new(StringArray::from(vec![value.to_string()]))],
    )
    .expect("one string column");
    QueryResult {
        schema,
        batches: vec![batch],
    }
}

fn encode(
    result: QueryResult,
    format: &Format,
    options: Arc<FormatOptions>,
) -> PgWireResult<QueryResponse> {
    let fields = Arc::new(arrow_schema_to_pg_fields(
        &result.schema,
        format,
        Some(options),
    )?);
    let rows: Vec<_> = result
        .batches
        .into_iter()
        .flat_map(|b| encode_recordbatch(fields.clone(), b))
        .collect();
    Ok(QueryResponse::new(fields, futures_util::stream::iter(rows)))
}

/// Runs statements (simple protocol, Execute of the extended one).
struct PgQuery {
    engine: QueryEngine,
    parser: Arc<PgParser>,
    setup: SessionSetup,
}

/// Parses and plans statements (Parse and Describe of the extended protocol).
struct PgParser {
    engine: QueryEngine,
    parser: PostgresCompatibilityParser,
    setup: SessionSetup,
}

impl PgParser {
    fn parse(&self, sql: &str) -> PgWireResult<Vec<Statement>> {
        self.parser.parse(sql).map_err(|e| {
            PgWireError::UserError(Box::new(ErrorInfo::new(
                "ERROR".into(),
                "42601".into(),
                format!("SQL error: {e}"),
            )))
        })
    }
}

impl PgQuery {
    async fn run(
        &self,
        sql: &str,
        kind: &Kind,
        extras: Extras,
        format: &Format,
        options: Arc<FormatOptions>,
    ) -> PgWireResult<Response> {
        match kind {
            Kind::Ack(t) => Ok(match t.clone() {
                t if matches!(sql_first_word(sql).as_str(), "BEGIN" | "START") => {
                    Response::TransactionStart(t)
                }
                t if matches!(
                    sql_first_word(sql).as_str(),
                    "COMMIT" | "END" | "ROLLBACK" | "ABORT"
                ) =>
                {
                    Response::TransactionEnd(t)
                }
                t => Response::Execution(t),
            }),
            Kind::Show(name, value) => Ok(Response::Query(encode(
                show_result(name, value),
                format,
                options,
            )?)),
            Kind::Query => {
                debug!(sql, "PostgreSQL query");
                let result = self
                    .engine
                    .sql_with(sql, extras)
                    .await
                    .map_err(|e| to_pg_error(&e, sql))?;
                Ok(Response::Query(encode(result, format, options)?))
            }
        }
    }
}

fn sql_first_word(sql: &str) -> String {
    sql.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_ascii_uppercase()
}

#[async_trait]
impl SimpleQueryHandler for PgQuery {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let statements = self.parser.parse(query)?;
        if statements.is_empty() {
            return Ok(vec![Response::EmptyQuery]);
        }
        let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
        let mut responses = Vec::with_capacity(statements.len());
        for statement in &statements {
            let sql = statement.to_string();
            let extras = Extras {
                setup: Some(self.setup.clone()),
                params: None,
            };
            match self
                .run(
                    &sql,
                    &classify(statement),
                    extras,
                    &Format::UnifiedText,
                    options.clone(),
                )
                .await
            {
                Ok(r) => responses.push(r),
                // Later statements of the string are not run, as in PostgreSQL.
                Err(PgWireError::UserError(info)) => {
                    responses.push(Response::Error(info));
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(responses)
    }
}

#[async_trait]
impl QueryParser for PgParser {
    type Statement = PgStatement;

    async fn parse_sql<C>(
        &self,
        _client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<PgStatement>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let mut statements = self.parse(sql)?;
        if statements.len() > 1 {
            return Err(PgWireError::UserError(Box::new(ErrorInfo::new(
                "ERROR".into(),
                "42601".into(),
                "cannot insert multiple commands into a prepared statement".into(),
            ))));
        }
        let Some(statement) = statements.pop() else {
            return Ok(None);
        };
        let sql = statement.to_string();
        let kind = classify(&statement);
        let described = match kind {
            Kind::Query => Some(
                self.engine
                    .describe(&sql, Some(self.setup.clone()))
                    .await
                    .map_err(|e| to_pg_error(&e, &sql))?,
            ),
            Kind::Show(ref name, ref value) => Some(Described {
                schema: show_result(name, value).schema,
                params: Vec::new(),
            }),
            Kind::Ack(_) => None,
        };
        Ok(Some(PgStatement {
            sql,
            kind,
            described,
        }))
    }

    fn get_parameter_types(&self, stmt: &PgStatement) -> PgWireResult<Vec<Type>> {
        let Some(d) = &stmt.described else {
            return Ok(Vec::new());
        };
        d.params
            .iter()
            .map(|t| match t {
                Some(t) => into_pg_type(t),
                None => Ok(Type::UNKNOWN),
            })
            .collect()
    }

    fn get_result_schema(
        &self,
        stmt: &PgStatement,
        column_format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        match &stmt.described {
            Some(d) => arrow_schema_to_pg_fields(
                &d.schema,
                column_format.unwrap_or(&Format::UnifiedText),
                None,
            ),
            None => Ok(Vec::new()),
        }
    }
}

#[async_trait]
impl ExtendedQueryHandler for PgQuery {
    type Statement = PgStatement;
    type QueryParser = PgParser;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        self.parser.clone()
    }

    async fn do_describe_statement<C>(
        &self,
        _client: &mut C,
        target: &StoredStatement<PgStatement>,
    ) -> PgWireResult<DescribeStatementResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = PgStatement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let server = self.parser.get_parameter_types(&target.statement)?;
        let n = server.len().max(target.parameter_types.len());
        let params = (0..n)
            .map(|i| {
                target
                    .parameter_types
                    .get(i)
                    .cloned()
                    .flatten()
                    .filter(|t| *t != Type::UNKNOWN)
                    .or_else(|| server.get(i).cloned())
                    .unwrap_or(Type::UNKNOWN)
            })
            .collect();
        let fields = self.parser.get_result_schema(&target.statement, None)?;
        Ok(DescribeStatementResponse::new(params, fields))
    }

    async fn do_describe_portal<C>(
        &self,
        _client: &mut C,
        target: &Portal<PgStatement>,
    ) -> PgWireResult<DescribePortalResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = PgStatement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let fields = self.parser.get_result_schema(
            &target.statement.statement,
            Some(&target.result_column_format),
        )?;
        Ok(DescribePortalResponse::new(fields))
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<PgStatement>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = PgStatement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let stmt = &portal.statement.statement;
        let params = match &stmt.described {
            Some(d) if !d.params.is_empty() || portal.parameter_len() > 0 => {
                let server: Vec<Type> = self.parser.get_parameter_types(stmt)?;
                let server: Vec<Option<&Type>> = server.iter().map(Some).collect();
                let inferred: Vec<Option<&DataType>> =
                    d.params.iter().map(Option::as_ref).collect();
                Some(deserialize_parameters_with_server_types(
                    portal, &inferred, &server,
                )?)
            }
            _ => None,
        };
        let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
        let extras = Extras {
            setup: Some(self.setup.clone()),
            params,
        };
        self.run(
            &stmt.sql,
            &stmt.kind,
            extras,
            &portal.result_column_format,
            options,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    use chrono::{TimeZone, Utc};
    use deltalake::arrow::array::Int64Array;
    use deltalake::{DeltaTableBuilder, ensure_table_uri};
    use ingest::status::{ConnectorStatus, StatusStore};

    use crate::QueryConfig;

    const TOKEN: &str = "s3cret-token";

    struct Server {
        port: u16,
        shutdown: CancellationToken,
        _lake: tempfile::TempDir,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.shutdown.cancel();
        }
    }

    async fn start(config: QueryConfig) -> Server {
        let lake = tempfile::tempdir().unwrap();
        let path = lake.path().join("gold/demo");
        std::fs::create_dir_all(&path).unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new("station_id", DataType::Utf8, false),
            Field::new("n", DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec!["CP1", "CP2"])),
                Arc::new(Int64Array::from(vec![3, 4])),
            ],
        )
        .unwrap();
        let url = ensure_table_uri(path.to_str().unwrap()).unwrap();
        DeltaTableBuilder::from_url(url)
            .unwrap()
            .build()
            .unwrap()
            .write(vec![batch])
            .await
            .unwrap();
        let status = StatusStore::embedded();
        let t = Utc.with_ymd_and_hms(2026, 3, 2, 8, 0, 0).unwrap();
        status.put_connector(ConnectorStatus {
            station_id: "CP1".into(),
            evse_id: 1,
            connector_id: 1,
            status: "Faulted".into(),
            error_code: Some("GroundFailure".into()),
            info: None,
            event_time: t,
            updated_at: t,
        });
        let engine = QueryEngine::new(
            lake.path().to_str().unwrap(),
            HashMap::new(),
            Some(status),
            QueryConfig {
                max_staleness_ms: 0,
                threads: 2,
                ..config
            },
        );
        let users = HashMap::from([("bob".to_string(), "b0b".to_string())]);
        let auth = PgAuth::new(Some(TOKEN), &users);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(engine, listener, auth, shutdown.clone()));
        Server {
            port,
            shutdown,
            _lake: lake,
        }
    }

    /// psql's stdout, or its stderr as the error.
    async fn psql(
        port: u16,
        user: &str,
        password: &str,
        db: &str,
        sql: &str,
    ) -> Result<String, String> {
        let url = format!("postgresql://{user}@127.0.0.1:{port}/{db}?sslmode=disable");
        let (password, sql) = (password.to_string(), sql.to_string());
        tokio::task::spawn_blocking(move || {
            let out = Command::new("psql")
                .args([
                    url.as_str(),
                    "-X",
                    "-A",
                    "-t",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-c",
                    &sql,
                ])
                .env("PGPASSWORD", password)
                .env("PGCONNECT_TIMEOUT", "10")
                .output()
                .expect("psql not found: run scripts/install-test-deps.sh");
            if out.status.success() {
                Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).to_string())
            }
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn psql_queries_joins_and_lists_tables() {
        let s = start(QueryConfig::default()).await;
        let q = |sql: &'static str| psql(s.port, ANALYST_USER, TOKEN, "csms", sql);
        assert_eq!(q("SELECT sum(n) FROM gold.demo").await.unwrap(), "7");
        assert_eq!(
            q("SELECT d.station_id, d.n, c.status FROM gold.demo d \
               JOIN live.connector_status c ON c.station_id = d.station_id")
            .await
            .unwrap(),
            "CP1|3|Faulted"
        );
        let tables = q("\\dt").await.unwrap();
        for t in [
            "gold|demo|table",
            "live|connector_status|table",
            "live|stations|table",
        ] {
            assert!(tables.contains(t), "{t} missing from:\n{tables}");
        }
        // Session commands clients send are accepted.
        assert_eq!(
            q("SET application_name = 'x'; SHOW transaction_isolation")
                .await
                .unwrap(),
            "SET\nread committed"
        );
        // Configured users log in too.
        assert_eq!(
            psql(s.port, "bob", "b0b", "csms", "SELECT 1")
                .await
                .unwrap(),
            "1"
        );
    }

    #[tokio::test]
    async fn writes_are_refused_with_sqlstate() {
        let s = start(QueryConfig::default()).await;
        let err = psql_script(s.port, "\\set VERBOSITY verbose\nDROP TABLE gold.demo;\n").await;
        assert!(err.contains("25006") && err.contains("read-only"), "{err}");
        let err = psql_script(
            s.port,
            "\\set VERBOSITY verbose\nSET datafusion.execution.batch_size = 1;\n",
        )
        .await;
        assert!(err.contains("25006"), "{err}");
        // Still there.
        assert_eq!(
            psql(
                s.port,
                ANALYST_USER,
                TOKEN,
                "csms",
                "SELECT count(*) FROM gold.demo"
            )
            .await
            .unwrap(),
            "2"
        );
    }

    /// Runs a psql script from stdin; returns stderr (the script must fail).
    async fn psql_script(port: u16, script: &str) -> String {
        let url = format!("postgresql://{ANALYST_USER}@127.0.0.1:{port}/csms?sslmode=disable");
        let script = script.to_string();
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut child = Command::new("psql")
                .args([url.as_str(), "-X", "-v", "ON_ERROR_STOP=1", "-f", "-"])
                .env("PGPASSWORD", TOKEN)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("psql not found: run scripts/install-test-deps.sh");
            child
                .stdin
                .take()
                .unwrap()
                .write_all(script.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(!out.status.success(), "script succeeded: {script}");
            String::from_utf8_lossy(&out.stderr).to_string()
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn slow_queries_are_canceled_with_57014() {
        let s = start(QueryConfig {
            timeout_secs: 1,
            ..QueryConfig::default()
        })
        .await;
        let err = psql_script(
            s.port,
            "\\set VERBOSITY verbose\nSELECT count(DISTINCT value % 1000003) FROM generate_series(1, 100000000000);\n",
        )
        .await;
        assert!(err.contains("57014"), "{err}");
    }

    #[tokio::test]
    async fn wrong_password_user_or_database_is_refused() {
        let s = start(QueryConfig::default()).await;
        let err = psql(s.port, ANALYST_USER, "wrong", "csms", "SELECT 1")
            .await
            .unwrap_err();
        assert!(
            err.to_lowercase()
                .contains("password authentication failed"),
            "{err}"
        );
        let err = psql(s.port, "mallory", TOKEN, "csms", "SELECT 1")
            .await
            .unwrap_err();
        assert!(
            err.to_lowercase()
                .contains("password authentication failed"),
            "{err}"
        );
        let err = psql(s.port, ANALYST_USER, TOKEN, "postgres", "SELECT 1")
            .await
            .unwrap_err();
        assert!(err.contains("does not exist"), "{err}");
    }

    /// psycopg uses the extended protocol: Parse with `$n`, Bind with values.
    #[tokio::test]
    async fn psycopg_binds_parameters() {
        let s = start(QueryConfig::default()).await;
        let script = r#"
import json, sys, psycopg
with psycopg.connect(sys.argv[1], autocommit=True) as c:
    cur = c.cursor()
    cur.execute("SELECT station_id, n FROM gold.demo WHERE station_id = %s AND n > %s", ("CP2", 1))
    rows = cur.fetchall()
    cur.execute("SELECT %s::text AS t, %s::bigint AS i", ("o'hara", 5))
    echo = cur.fetchone()
    try:
        cur.execute("DROP TABLE gold.demo")
        drop = None
    except psycopg.Error as e:
        drop = e.sqlstate
print(json.dumps({"rows": rows, "echo": echo, "drop": drop}))
"#;
        let dsn = format!(
            "host=127.0.0.1 port={} dbname=csms user={ANALYST_USER} password={TOKEN} sslmode=disable",
            s.port
        );
        let out = tokio::task::spawn_blocking(move || {
            Command::new(std::env::var("PYTHON").unwrap_or_else(|_| "python3".into()))
                .args(["-c", script, &dsn])
                .output()
                .expect("python3")
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "psycopg (scripts/install-test-deps.sh installs it): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"rows": [["CP2", 4]], "echo": ["o'hara", 5], "drop": "25006"})
        );
    }

    #[test]
    fn errors_map_to_sqlstates_and_positions() {
        let e = |q: QueryError| error_info(&q, "SELECT 1,\n  FROM x").code;
        assert_eq!(e(QueryError::ReadOnly("DROP TABLE".into())), "25006");
        assert_eq!(
            e(QueryError::Timeout(std::time::Duration::from_secs(1))),
            "57014"
        );
        assert_eq!(e(QueryError::Memory("x".into())), "53200");
        assert_eq!(e(QueryError::TooManyRows(5)), "54000");
        let info = error_info(
            &QueryError::Sql {
                message: "SQL error: ParserError(\"Expected: an expression\")".into(),
                position: Some(crate::Position { line: 2, column: 3 }),
            },
            "SELECT 1,\n  FROM x",
        );
        assert_eq!(info.code, "42601");
        // "SELECT 1,\n" is 10 characters; column 3 of line 2 is the 13th.
        assert_eq!(info.position.as_deref(), Some("13"));
        assert_eq!(
            sql_error_code("Error during planning: table 'csms.gold.nope' not found"),
            "42P01"
        );
    }

    #[test]
    fn auth_knows_only_configured_users() {
        let auth = PgAuth::new(
            Some(TOKEN),
            &HashMap::from([("bob".into(), "b0b".into()), ("eve".into(), String::new())]),
        );
        assert_eq!(
            format!("{auth:?}"),
            r#"PgAuth { users: ["analyst", "bob"] }"#
        );
        assert!(PgAuth::new(None, &HashMap::new()).is_empty());
    }
}
