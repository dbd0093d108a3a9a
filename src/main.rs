//! `csms`: the one command line of the CSMS. Thin wiring: every capability
//! lives in a library crate; this file parses arguments, loads the
//! configuration and reports errors in words that say what to fix.

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
    /// Run everything in one process: OCPP ingest, lake writer, HTTP API.
    Serve,
    /// Run only the OCPP ingest node (WAL, lake writer, HTTP API).
    Ingest,
    /// Register stations and their Basic-auth passwords.
    #[command(subcommand)]
    Stations(StationsCmd),
    /// Manage the id tokens used for authorization decisions.
    #[command(subcommand)]
    Tokens(TokensCmd),
    /// Maintain the lake.
    #[command(subcommand)]
    Lake(LakeCmd),
    /// Benchmarks that print their figures.
    #[command(subcommand)]
    Bench(BenchCmd),
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

fn main() -> Result<()> {
    // Both rustls providers are compiled in through dependencies; pick one.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                "info,deltalake_core=warn,deltalake=warn,delta_kernel=warn,datafusion=warn".into()
            }),
        )
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let mut config = Config::load(cli.config.as_deref()).context("loading configuration")?;
    if let Some(dir) = cli.data_dir {
        config.data_dir = dir;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(cli.command, config))
}

async fn run(command: Command, config: Config) -> Result<()> {
    match command {
        Command::Serve | Command::Ingest => {
            let running = ingest::runtime::start(config).await?;
            let shutdown = running.shutdown.clone();
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                tracing::info!("shutting down: flushing the lake writer");
                shutdown.cancel();
            });
            running.wait().await;
            Ok(())
        }
        Command::Stations(cmd) => stations(cmd, &config),
        Command::Tokens(cmd) => tokens(cmd, &config),
        Command::Lake(cmd) => lake(cmd, &config).await,
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
