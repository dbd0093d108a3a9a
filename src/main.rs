//! `csms`: the one command line of the CSMS. Thin wiring: every capability
//! lives in a library crate; this file parses arguments, loads the
//! configuration and reports errors in words that say what to fix.

mod log_writer;
mod runtime_profile;
mod workflows_cli;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use ingest::{
    config::Config,
    registry::{DefaultPolicy, IdTokenRecord, IdTokenRegistry, IdTokenStatus, StationRegistry},
};

#[derive(Parser)]
#[command(
    name = "csms",
    version,
    about = "Analytics-first OCPP charging station management system"
)]
struct Cli {
    /// Configuration file (default: ./csms.toml when present). Environment variables override it.
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Data directory (overrides CSMS_DATA_DIR).
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything: OCPP ingest, lake writer, HTTP API.
    Serve {
        /// Run N worker processes sharing the ports (SO_REUSEPORT), each a node
        /// with its own WAL; needs REDIS_URL so they share status and commands.
        #[arg(long, value_name = "N")]
        workers: Option<u32>,
    },
    /// Run only the OCPP ingest node (WAL, lake writer, HTTP API without SQL).
    Ingest,
    /// Run one SQL query over the lake (and live status with REDIS_URL) and print the result.
    Query {
        /// The SQL text, e.g. "SELECT * FROM gold.fault_ranking".
        sql: String,
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
    },
    /// Register stations and their Basic-auth passwords.
    #[command(subcommand)]
    Stations(StationsCmd),
    /// Manage the id tokens used for authorization decisions.
    #[command(subcommand)]
    Tokens(TokensCmd),
    /// Maintain the lake.
    #[command(subcommand)]
    Lake(LakeCmd),
    /// Refine bronze into silver and gold tables.
    #[command(subcommand)]
    Pipeline(PipelineCmd),
    /// Render (and mail) reports.
    #[command(subcommand)]
    Report(ReportCmd),
    /// Scheduled workflows (workflows/*.toml): list them, run one now, see their history.
    #[command(subcommand)]
    Workflows(workflows_cli::WorkflowsCmd),
    /// Simulate charging stations against a CSMS and print throughput, latency and server RSS.
    Loadgen(loadgen::LoadgenArgs),
    /// Write a simulated bronze history (1.6 and 2.0.1 stations, sessions, faults) into the lake.
    Simulate(SimulateArgs),
    /// Benchmarks that print their figures.
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Subcommand)]
enum ReportCmd {
    /// Stations that faulted at least the threshold times in one day, for a month.
    FaultRanking {
        /// Month, YYYY-MM.
        #[arg(long)]
        month: String,
        /// Mail it through SMTP_URL instead of writing files.
        #[arg(long)]
        send: bool,
        /// Recipient (repeatable).
        #[arg(long = "to", value_name = "ADDRESS")]
        to: Vec<String>,
        /// Folder for the files when not sending (default ./report-YYYY-MM).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PipelineCmd {
    /// Process new bronze into silver and gold (incremental; a rerun changes nothing).
    Run {
        #[arg(long, value_enum, default_value = "all")]
        stage: StageArg,
        /// Reprocess from this date (YYYY-MM-DD), whatever was processed before.
        #[arg(long)]
        from: Option<chrono::NaiveDate>,
        /// Reprocess up to this date (inclusive).
        #[arg(long)]
        to: Option<chrono::NaiveDate>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OutputFormat {
    Table,
    Csv,
    Json,
}

#[derive(clap::Args)]
struct SimulateArgs {
    #[arg(long, default_value_t = 100)]
    stations: usize,
    #[arg(long, default_value_t = 7)]
    days: u32,
    /// First simulated day, YYYY-MM-DD (default: DAYS days before today).
    #[arg(long)]
    start: Option<chrono::NaiveDate>,
    /// Same seed and options, same history.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Share of stations speaking OCPP 2.0.1 (the others 1.6).
    #[arg(long, default_value_t = 0.4)]
    ratio_201: f64,
    /// Share of timestamped messages received one to three days late.
    #[arg(long, default_value_t = 0.002)]
    late_fraction: f64,
    /// Share of messages retransmitted with the same message id.
    #[arg(long, default_value_t = 0.002)]
    duplicate_fraction: f64,
    #[arg(long, default_value_t = 3600)]
    heartbeat_secs: u32,
    #[arg(long, default_value_t = 300)]
    meter_interval_secs: u32,
    /// Node id the rows are attributed to (bronze node_id, app transaction).
    #[arg(long, default_value = "simulator")]
    node_id: String,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum StageArg {
    Silver,
    Gold,
    All,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Durable (fsynced) frames per second with group commit, next to the raw fsync rate.
    Wal {
        /// Directory on the disk to measure (default: the data directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Concurrent appenders, each like a station waiting for its answer.
        #[arg(long, default_value_t = 1000)]
        concurrency: usize,
        #[arg(long, default_value_t = 300)]
        frame_bytes: usize,
    },
}

#[derive(Subcommand)]
enum StationsCmd {
    /// Add a station, or replace its password.
    Add {
        id: String,
        /// Basic-auth password (stored as an argon2id hash only). Omit for certificate-only stations.
        #[arg(long)]
        password: Option<String>,
    },
    /// Register many stations from a CSV file of `id,password` lines (an
    /// empty password: certificate only; `#` comments and an `id,password`
    /// header are skipped). Hashes on every core and writes the registry
    /// once.
    Import {
        file: PathBuf,
    },
    List,
    Remove {
        id: String,
    },
}

#[derive(Subcommand)]
enum TokensCmd {
    /// Add or update an id token.
    Add {
        id_token: String,
        #[arg(long, default_value = "Accepted", value_parser = ["Accepted", "Blocked", "Expired", "Invalid"])]
        status: String,
        /// Expiry as RFC 3339, e.g. 2027-01-01T00:00:00Z.
        #[arg(long)]
        expiry: Option<String>,
        #[arg(long)]
        group: Option<String>,
    },
    List,
    Remove {
        id_token: String,
    },
}

#[derive(Subcommand)]
enum LakeCmd {
    /// Compact small files of the bronze table.
    Optimize,
    /// Remove files no longer referenced by the table, older than the retention.
    Vacuum {
        #[arg(long)]
        retention_hours: Option<u64>,
    },
    /// Delete bronze rows older than N days.
    Retention {
        #[arg(long)]
        days: u32,
    },
}

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line a person can act on; the cause chain follows the colons.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    // Both rustls providers are compiled in through dependencies; pick one.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        "warn,csms=info,ingest=info,pipeline=info,query=info,workflows=info,loadgen=info".into()
    });
    // The Delta kernel logs an ERROR for every failed snapshot load, which
    // includes probing a table that does not exist yet (every fresh lake,
    // every worker's start). The error itself reaches our code, which logs it
    // with context where it matters; RUST_LOG=buoyant_kernel=... opts back in.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("buoyant_kernel")) {
        filter = filter.add_directive("buoyant_kernel=off".parse().expect("static directive"));
    }
    let (log, _flush_log) =
        log_writer::spawn(std::io::stderr()).context("starting the log writer")?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        // Colour codes only for a person at a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(log)
        .init();
    let cli = Cli::parse();
    // One layered table (file ← environment); each crate takes its section.
    let mut table = ingest::config::layered_table(cli.config.as_deref(), std::env::vars())
        .context("loading configuration")?;
    let pipeline_cfg: pipeline::PipelineConfig = match table.remove("pipeline") {
        Some(section) => section
            .try_into()
            .context("invalid [pipeline] configuration")?,
        None => Default::default(),
    };
    let query_cfg: query::QueryConfig = match table.remove("query") {
        Some(s) => s.try_into().context("invalid [query] configuration")?,
        None => Default::default(),
    };
    let mut smtp_cfg: workflows::SmtpConfig = match table.remove("smtp") {
        Some(s) => s.try_into().context("invalid [smtp] configuration")?,
        None => Default::default(),
    };
    let workflows_cfg: workflows::WorkflowsConfig = match table.remove("workflows") {
        Some(s) => s.try_into().context("invalid [workflows] configuration")?,
        None => Default::default(),
    };
    let alerts_cfg: workflows::alerts::AlertsConfig = match table.remove("alerts") {
        Some(s) => s.try_into().context("invalid [alerts] configuration")?,
        None => Default::default(),
    };
    let mut config = Config::from_table(table).context("loading configuration")?;
    if let Some(dir) = cli.data_dir {
        config.data_dir = dir;
    }
    if let Some(u) = &config.smtp_url {
        smtp_cfg.url = Some(u.clone());
    }
    let threads = match &cli.command {
        Command::Loadgen(a) if a.worker_index.is_some() => {
            Some(threads_per_process(&config, a.processes))
        }
        _ => config.runtime_threads,
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        runtime.worker_threads(n);
    }
    let node = matches!(cli.command, Command::Serve { .. } | Command::Ingest);
    if node {
        // See ONE_THREAD_GLOBAL_QUEUE_INTERVAL: what a node's answers wait
        // for on a single runtime thread; with more, tokio's default measured
        // no worse (bench/README.md, "Where a CALL's server time goes").
        let one_thread =
            (threads == Some(1)).then_some(ingest::config::ONE_THREAD_GLOBAL_QUEUE_INTERVAL);
        if let Some(n) = config.runtime_global_queue_interval.or(one_thread) {
            runtime.global_queue_interval(n);
        }
        runtime_profile::instrument(&mut runtime);
    }
    let runtime = runtime.enable_all().build()?;
    if node {
        runtime_profile::start(runtime.handle());
    }
    let settings = workflows_cli::Settings {
        workflows: workflows_cfg,
        alerts: alerts_cfg,
        pipeline: pipeline_cfg,
        smtp: smtp_cfg,
    };
    runtime.block_on(run(cli.command, config, settings, query_cfg))
}

async fn run(
    command: Command,
    config: Config,
    settings: workflows_cli::Settings,
    query_cfg: query::QueryConfig,
) -> Result<()> {
    let pipeline_cfg = settings.pipeline.clone();
    let smtp_cfg = settings.smtp.clone();
    match command {
        Command::Serve { workers: Some(n) } if n > 1 => run_workers(n, &config).await,
        Command::Serve { .. } | Command::Ingest => {
            let with_sql = matches!(command, Command::Serve { .. });
            if with_sql {
                workflows_cli::validate_for_serve(&settings)?;
            }
            let lake_url = config.lake_url()?;
            let lake_opts = config.lake.storage_options.clone();
            let wf_config = config.clone();
            let pg_addr = config.pg_addr;
            let reuse_port = config.worker_index.is_some();
            // The same token guards HTTP and the PostgreSQL wire.
            let admin_token = ingest::runtime::admin_token(&config)?;
            let pg_users = query_cfg.pg_users.clone();
            let pg_engine: std::sync::Arc<std::sync::Mutex<Option<query::QueryEngine>>> =
                Default::default();
            let slot = pg_engine.clone();
            let running = ingest::runtime::start_with(config, move |node| {
                if !with_sql {
                    return Default::default();
                }
                let engine = query::QueryEngine::new(
                    &lake_url,
                    lake_opts,
                    Some(node.status.clone()),
                    query_cfg,
                );
                *slot.lock().expect("not poisoned") = Some(engine.clone());
                query::api_router(engine)
            })
            .await?;
            let engine = pg_engine.lock().expect("not poisoned").take();
            if let Some(engine) = engine {
                let listener = ingest::runtime::bind_listener(pg_addr, reuse_port)
                    .with_context(|| format!("cannot listen on CSMS_PG_ADDR {pg_addr}"))?;
                let auth = query::PgAuth::new(Some(&admin_token), &pg_users);
                tracing::info!(%pg_addr, "PostgreSQL wire listening (database csms, user analyst)");
                tokio::spawn(query::serve_pg(
                    engine,
                    listener,
                    auth,
                    running.shutdown.clone(),
                ));
            }
            if with_sql {
                workflows_cli::start_in_serve(
                    &wf_config,
                    &settings,
                    running.node.status.clone(),
                    running.router.clone(),
                    running.shutdown.clone(),
                )
                .await?;
            }
            let shutdown = running.shutdown.clone();
            tokio::spawn(async move {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("SIGTERM handler");
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                tracing::info!("shutting down: flushing the lake writer");
                shutdown.cancel();
            });
            running.wait().await;
            Ok(())
        }
        Command::Stations(cmd) => stations(cmd, &config),
        Command::Tokens(cmd) => tokens(cmd, &config),
        Command::Lake(cmd) => lake(cmd, &config).await,
        Command::Pipeline(PipelineCmd::Run { stage, from, to }) => {
            run_pipeline(&config, pipeline_cfg, stage, from, to).await
        }
        Command::Query { sql, format } => {
            let status = match &config.redis_url {
                Some(url) => Some(
                    ingest::status::StatusStore::redis(url, config.status.clone())
                        .await
                        .context("connecting to REDIS_URL for the live tables")?,
                ),
                // The embedded store lives inside `csms serve`: use POST /api/sql there.
                None => None,
            };
            let engine = query::QueryEngine::new(
                &config.lake_url()?,
                config.lake.storage_options.clone(),
                status,
                query_cfg,
            );
            let result = engine.sql(&sql).await?;
            match format {
                OutputFormat::Table => println!("{}", query::render_table(&result)?),
                OutputFormat::Csv => {
                    std::io::Write::write_all(&mut std::io::stdout(), &query::render_csv(&result)?)?
                }
                OutputFormat::Json => {
                    println!("{}", String::from_utf8_lossy(&query::render_json(&result)?))
                }
            }
            Ok(())
        }
        Command::Report(ReportCmd::FaultRanking {
            month,
            send,
            to,
            out,
        }) => {
            let storage = if pipeline_cfg.storage_options.is_empty() {
                config.lake.storage_options.clone()
            } else {
                pipeline_cfg.storage_options.clone()
            };
            let url = config.lake_url()?;
            let report =
                workflows::load_fault_ranking(&url, &storage, &month, pipeline_cfg.fault_threshold)
                    .await?;
            let rendered = workflows::render_fault_ranking(&report)?;
            if send {
                if to.is_empty() {
                    bail!("--send needs at least one --to ADDRESS");
                }
                workflows::send(&rendered, &smtp_cfg, &to).await?;
                println!("sent \"{}\" to {}", rendered.subject, to.join(", "));
            } else {
                let dir = out.unwrap_or_else(|| PathBuf::from(format!("report-{month}")));
                for p in workflows::write_to_dir(&rendered, &dir, &smtp_cfg, &to)? {
                    println!("{}", p.display());
                }
            }
            Ok(())
        }
        Command::Workflows(cmd) => workflows_cli::command(cmd, &config, &settings).await,
        Command::Simulate(args) => simulate(&config, args).await,
        Command::Loadgen(args) => {
            if let Some(path) = &args.credentials_out {
                let n = loadgen::write_credentials(&args, path)?;
                println!(
                    "{n} stations' credentials written to {} (register them with `csms stations import`)",
                    path.display()
                );
                return Ok(());
            }
            print!("{}", loadgen::run(args).await?);
            Ok(())
        }
        Command::Bench(BenchCmd::Wal {
            dir,
            seconds,
            concurrency,
            frame_bytes,
        }) => {
            if seconds == 0 || concurrency == 0 {
                bail!("--seconds and --concurrency must be at least 1");
            }
            let dir = dir.unwrap_or_else(|| config.data_dir.clone());
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let bar = indicatif::ProgressBar::new(1000);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {elapsed}")
                    .expect("static template"),
            );
            bar.set_message(format!("WAL benchmark, {concurrency} appenders"));
            let pb = bar.clone();
            let opts = ingest::bench::WalBenchOptions {
                dir,
                seconds,
                concurrency,
                frame_bytes,
                wal: config.wal.clone(),
            };
            let report =
                ingest::bench::run_wal_bench(opts, move |f| pb.set_position((f * 1000.0) as u64))
                    .await?;
            bar.finish_and_clear();
            println!("{report}");
            Ok(())
        }
    }
}

fn stations(cmd: StationsCmd, config: &Config) -> Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    let reg = StationRegistry::open(&config.data_dir)?;
    match cmd {
        StationsCmd::Add { id, password } => {
            reg.add(&id, password.as_deref())?;
            println!(
                "station {id} registered{}",
                if password.is_some() {
                    " with a password"
                } else {
                    " (certificate only)"
                }
            );
        }
        StationsCmd::Import { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let batch =
                parse_station_csv(&text).with_context(|| format!("in {}", file.display()))?;
            let started = std::time::Instant::now();
            let bar = indicatif::ProgressBar::new(batch.len() as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "hashing passwords [{bar:40}] {human_pos}/{human_len}, {per_sec}, eta {eta}",
                )
                .expect("static template"),
            );
            let added = reg.add_many(&batch, |n| bar.set_position(n as u64))?;
            bar.finish_and_clear();
            let secs = started.elapsed().as_secs_f64();
            println!(
                "{} stations imported ({added} new, {} updated, {} with a password) in {secs:.1} s",
                batch.len(),
                batch.len() - added,
                batch.iter().filter(|(_, pw)| pw.is_some()).count(),
            );
        }
        StationsCmd::List => {
            println!("{:<40} {:<10} created", "id", "password");
            for s in reg.list() {
                println!(
                    "{:<40} {:<10} {}",
                    s.id,
                    if s.password_hash.is_some() {
                        "yes"
                    } else {
                        "no"
                    },
                    s.created_at.to_rfc3339()
                );
            }
        }
        StationsCmd::Remove { id } => {
            if !reg.remove(&id)? {
                bail!("no station {id:?} is registered");
            }
            println!("station {id} removed");
        }
    }
    Ok(())
}

/// `id,password` lines; see [`StationsCmd::Import`].
fn parse_station_csv(text: &str) -> Result<Vec<(String, Option<String>)>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') || (n == 0 && line == "id,password") {
            continue;
        }
        let Some((id, password)) = line.split_once(',') else {
            bail!("line {}: expected `id,password`, got {line:?}", n + 1);
        };
        if id.is_empty() {
            bail!("line {}: the station id is empty", n + 1);
        }
        out.push((
            id.to_string(),
            (!password.is_empty()).then(|| password.to_string()),
        ));
    }
    if out.is_empty() {
        bail!("no stations: expected `id,password` lines");
    }
    Ok(out)
}

fn tokens(cmd: TokensCmd, config: &Config) -> Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    let policy = if config.ocpp.default_token_policy == "reject" {
        DefaultPolicy::RejectUnknown
    } else {
        DefaultPolicy::AcceptAll
    };
    let reg = IdTokenRegistry::open(&config.data_dir, policy)?;
    match cmd {
        TokensCmd::Add {
            id_token,
            status,
            expiry,
            group,
        } => {
            let status = match status.as_str() {
                "Blocked" => IdTokenStatus::Blocked,
                "Expired" => IdTokenStatus::Expired,
                "Invalid" => IdTokenStatus::Invalid,
                _ => IdTokenStatus::Accepted,
            };
            let expiry = expiry
                .map(|e| chrono::DateTime::parse_from_rfc3339(&e).map(|d| d.to_utc()))
                .transpose()
                .context("--expiry must be RFC 3339, e.g. 2027-01-01T00:00:00Z")?;
            reg.add(IdTokenRecord {
                id_token: id_token.clone(),
                status,
                expiry,
                group_id: group,
            })?;
            println!("id token {id_token} saved");
        }
        TokensCmd::List => {
            for t in reg.list() {
                println!("{}", serde_json::to_string(&t)?);
            }
        }
        TokensCmd::Remove { id_token } => {
            if !reg.remove(&id_token)? {
                bail!("no id token {id_token:?}");
            }
            println!("id token {id_token} removed");
        }
    }
    Ok(())
}

async fn lake(cmd: LakeCmd, config: &Config) -> Result<()> {
    let url = config.lake_url()?;
    let opts = config.lake.storage_options.clone();
    match cmd {
        LakeCmd::Optimize => {
            let s = ingest::lake::optimize(&url, &opts).await?;
            println!("{s:?}");
        }
        LakeCmd::Vacuum { retention_hours } => {
            let s = ingest::lake::vacuum(
                &url,
                retention_hours.unwrap_or(config.lake.vacuum_retention_hours),
                &opts,
            )
            .await?;
            println!("{s:?}");
        }
        LakeCmd::Retention { days } => {
            let n = ingest::lake::apply_retention(&url, days, &opts).await?;
            println!("deleted {n} bronze rows older than {days} days");
        }
    }
    Ok(())
}

async fn run_pipeline(
    config: &Config,
    mut pipeline: pipeline::PipelineConfig,
    stage: StageArg,
    from: Option<chrono::NaiveDate>,
    to: Option<chrono::NaiveDate>,
) -> Result<()> {
    if let (Some(f), Some(t)) = (from, to)
        && f > t
    {
        bail!("--from {f} is after --to {t}");
    }
    if pipeline.storage_options.is_empty() {
        pipeline.storage_options = config.lake.storage_options.clone();
    }
    let url = config.lake_url()?;
    let stage = match stage {
        StageArg::Silver => pipeline::Stage::Silver,
        StageArg::Gold => pipeline::Stage::Gold,
        StageArg::All => pipeline::Stage::All,
    };
    let opts = pipeline::RunOptions { stage, from, to };
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    let pb = bar.clone();
    let progress = move |e: pipeline::ProgressEvent| match e {
        pipeline::ProgressEvent::StageStarted(s) => pb.set_message(format!("{s}")),
        pipeline::ProgressEvent::TableStarted(t) => pb.set_message(format!("building {t}")),
        pipeline::ProgressEvent::TableDone(t) => pb.println(format!(
            "{:<28} {:>10} rows in {:>10} rows out  {:.1} s",
            t.name, t.rows_in, t.rows_out, t.seconds
        )),
    };
    let summary = pipeline::run(&url, &pipeline, &opts, &progress).await?;
    bar.finish_and_clear();
    println!("{summary}");
    Ok(())
}

/// `csms serve --workers N`: N copies of this command, each a node with its own
/// WAL and node id, sharing the ports, the data directory, Redis and the
/// secret under which they share password verifications. A worker
/// that dies is restarted; SIGINT/SIGTERM stop them all gracefully.
/// Each worker's runtime gets its share of the cores
/// (`threads_per_process`).
async fn run_workers(n: u32, config: &Config) -> Result<()> {
    if config.redis_url.is_none() {
        bail!(
            "--workers needs REDIS_URL: workers share live status, command routing and 1.6 transaction ids through Redis"
        );
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    let base = config.node_id()?;
    let exe = std::env::current_exe().context("locating the csms executable")?;
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    let mut skip = false;
    for a in std::env::args_os().skip(1) {
        if skip {
            skip = false;
            continue;
        }
        match a.to_str() {
            Some("--workers") => skip = true,
            Some(s) if s.starts_with("--workers=") => {}
            _ => args.push(a),
        }
    }
    // Workers share password verifications under a secret of the fleet's,
    // or, without one, a secret made up for this run.
    let secret = config
        .verification_secret
        .clone()
        .unwrap_or_else(ingest::shared_auth::random_secret);
    let threads = threads_per_process(config, n as usize);
    let spawn = |i: u32| {
        tokio::process::Command::new(&exe)
            .args(&args)
            .env("CSMS_WORKER_INDEX", i.to_string())
            .env("CSMS_RUNTIME_THREADS", threads.to_string())
            .env("CSMS_NODE_ID", format!("{base}-w{i}"))
            .env("CSMS_VERIFICATION_SECRET", &secret)
            .spawn()
            .with_context(|| format!("starting worker {i}"))
    };
    let mut children = Vec::new();
    for i in 0..n {
        children.push(spawn(i)?);
    }
    tracing::info!(workers = n, node = %base, "workers started");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let exited = {
            let waits = children.iter_mut().map(|c| Box::pin(c.wait()));
            tokio::select! {
                _ = tokio::signal::ctrl_c() => None,
                _ = term.recv() => None,
                (status, i, _) = futures_util::future::select_all(waits) => Some((status, i)),
            }
        };
        let Some((status, i)) = exited else { break };
        tracing::warn!(worker = i, ?status, "worker exited; restarting it in 1 s");
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        children[i] = spawn(i as u32)?;
    }
    // Ask each worker to flush and stop; SIGKILL only after a grace period.
    for c in &children {
        if let Some(pid) = c.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
    for c in &mut children {
        if tokio::time::timeout(std::time::Duration::from_secs(30), c.wait())
            .await
            .is_err()
        {
            let _ = c.kill().await;
        }
    }
    Ok(())
}

/// Runtime threads for one of `processes` processes that share this box
/// (workers of `csms serve --workers`, `csms loadgen --processes`):
/// `runtime_threads` when set, else its share of the cores, at least one.
/// More threads than cores only add context switches and cross-thread
/// wake-ups: in the 100,000-station storm, 6 workers of one thread each
/// used 72-86 s of CPU where 6 of two used 89-92 s.
fn threads_per_process(config: &Config, processes: usize) -> usize {
    config.runtime_threads.unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / processes.max(1)).max(1)
    })
}

async fn simulate(config: &Config, a: SimulateArgs) -> Result<()> {
    if a.stations == 0 || a.days == 0 {
        bail!("--stations and --days must be at least 1");
    }
    let url = config.lake_url()?;
    let start = a
        .start
        .unwrap_or_else(|| chrono::Utc::now().date_naive() - chrono::Days::new(u64::from(a.days)));
    let opts = pipeline::simulate::SimulateOptions {
        stations: a.stations,
        days: a.days,
        start,
        seed: a.seed,
        ratio_201: a.ratio_201,
        late_fraction: a.late_fraction,
        duplicate_fraction: a.duplicate_fraction,
        node_id: a.node_id,
        heartbeat_secs: a.heartbeat_secs,
        meter_interval_secs: a.meter_interval_secs,
        ..Default::default()
    };
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "simulating [{bar:40}] {human_pos}/~{human_len} rows, {per_sec}, eta {eta}",
        )
        .expect("static template"),
    );
    let pb = bar.clone();
    let progress = move |rows: u64, total: u64| {
        pb.set_length(total);
        pb.set_position(rows);
    };
    let s =
        pipeline::simulate::simulate(&url, &config.lake.storage_options, &opts, &progress).await?;
    bar.finish_and_clear();
    println!(
        "simulated {} stations x {} days from {start}: {} bronze rows in {} files, {:.1} s ({:.0} rows/s)",
        opts.stations,
        opts.days,
        s.rows,
        s.files,
        s.seconds,
        s.rows as f64 / s.seconds.max(1e-9)
    );
    Ok(())
}
