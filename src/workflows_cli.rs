//! Wiring of the `workflows` crate: `csms workflows list|run|history`, and
//! the scheduler and alert engine inside `csms serve`.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use ingest::{config::Config, router::CommandRouter, status::StatusStore};
use workflows::{
    JobContext, SmtpConfig, WorkflowsConfig,
    alerts::{AlertEngine, AlertState, AlertsConfig},
    clock::SystemClock,
    history::RunHistory,
    lease::LeaseStore,
    scheduler::{Outcome, Scheduler},
};

#[derive(Subcommand)]
pub enum WorkflowsCmd {
    /// The workflow definitions, their next run and last run.
    List,
    /// Run one workflow now (enabled or not), with its retries; recorded in ops.workflow_runs.
    Run {
        /// Its name, as `csms workflows list` shows.
        name: String,
    },
    /// Recent attempts from ops.workflow_runs, newest first.
    History {
        /// Only this workflow.
        name: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}

/// The sections of `csms.toml` the workflows use, beside ingest's.
pub struct Settings {
    pub workflows: WorkflowsConfig,
    pub alerts: AlertsConfig,
    pub pipeline: pipeline::PipelineConfig,
    pub smtp: SmtpConfig,
}

fn job_context(
    config: &Config,
    s: &Settings,
    status: Option<StatusStore>,
    commands: Option<CommandRouter>,
) -> Result<JobContext> {
    let mut pipeline = s.pipeline.clone();
    if pipeline.storage_options.is_empty() {
        pipeline.storage_options = config.lake.storage_options.clone();
    }
    Ok(JobContext {
        node_id: config.node_id()?,
        lake_url: config.lake_url()?,
        storage_options: pipeline.storage_options.clone(),
        pipeline,
        smtp: s.smtp.clone(),
        status,
        commands,
        report_dir: s
            .workflows
            .report_dir
            .clone()
            .unwrap_or_else(|| config.data_dir.join("reports")),
        clock: Arc::new(SystemClock),
    })
}

async fn lease_store(config: &Config) -> Result<LeaseStore> {
    Ok(match &config.redis_url {
        Some(url) => LeaseStore::redis(url, &config.status.key_prefix)
            .await
            .context("connecting to REDIS_URL for workflow leases")?,
        None => LeaseStore::local(),
    })
}

/// The definitions of `[workflows] dir`; a missing folder is no workflows
/// (with a warning), a broken file an error naming it.
fn definitions(s: &Settings) -> Result<Vec<workflows::definition::WorkflowDef>> {
    let dir = &s.workflows.dir;
    if !dir.is_dir() {
        tracing::warn!(
            dir = %dir.display(),
            "no workflow folder: nothing scheduled (set [workflows] dir or CSMS_WORKFLOWS__DIR)"
        );
        return Ok(Vec::new());
    }
    workflows::definition::load_dir(dir)
        .with_context(|| format!("loading workflow definitions from {}", dir.display()))
}

async fn scheduler(
    config: &Config,
    s: &Settings,
    status: Option<StatusStore>,
    commands: Option<CommandRouter>,
) -> Result<Scheduler> {
    let ctx = job_context(config, s, status, commands)?;
    let history = RunHistory::open(&ctx.lake_url, &ctx.storage_options)?;
    Ok(Scheduler::new(
        definitions(s)?,
        ctx,
        lease_store(config).await?,
        history,
    ))
}

/// Checks what `csms serve` would otherwise find wrong only when the first
/// alert is due: alerts that could go nowhere, unreadable definitions.
pub fn validate_for_serve(s: &Settings) -> Result<()> {
    if s.alerts.is_enabled() {
        s.alerts
            .validate(&s.smtp)
            .map_err(|e| anyhow::anyhow!("invalid [alerts] configuration: {e}"))?;
    }
    if s.workflows.scheduler {
        definitions(s)?;
    }
    Ok(())
}

/// Inside `csms serve`: starts the scheduler (unless `[workflows] scheduler
/// = false`) and the alert engine (when it has somewhere to send alerts),
/// both stopping with `shutdown`.
pub async fn start_in_serve(
    config: &Config,
    s: &Settings,
    status: StatusStore,
    commands: CommandRouter,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<()> {
    if s.workflows.scheduler {
        let sched = scheduler(config, s, Some(status.clone()), Some(commands.clone())).await?;
        tracing::info!(
            workflows = sched.definitions().len(),
            enabled = sched.definitions().iter().filter(|d| d.enabled).count(),
            "workflow scheduler started"
        );
        tokio::spawn(sched.run(shutdown.clone()));
    }
    if s.alerts.is_enabled() {
        let ctx = job_context(config, s, Some(status), Some(commands))?;
        let state = match &config.redis_url {
            Some(url) => AlertState::redis(url, &config.status.key_prefix)
                .await
                .context("connecting to REDIS_URL for alert state")?,
            None => AlertState::file(config.data_dir.join("alerts.json")),
        };
        let engine = AlertEngine::new(s.alerts.clone(), ctx, lease_store(config).await?, state);
        tracing::info!(
            recipients = s.alerts.recipients.len(),
            webhooks = s.alerts.webhooks.len(),
            "alert engine started"
        );
        tokio::spawn(engine.run(shutdown));
    }
    Ok(())
}

/// `csms workflows ...` from the command line.
pub async fn command(cmd: WorkflowsCmd, config: &Config, s: &Settings) -> Result<()> {
    match cmd {
        WorkflowsCmd::List => {
            let sched = scheduler(config, s, None, None).await?;
            let now = chrono::Utc::now();
            println!(
                "{:<24} {:<14} {:<8} {:<15} {:<21} last run",
                "workflow", "schedule", "enabled", "job", "next run (UTC)"
            );
            for w in sched.list(now).await {
                let next = w
                    .next_run
                    .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
                    .unwrap_or_else(|| "-".into());
                let last = w
                    .last_run
                    .map(|(t, st)| format!("{} {st}", t.format("%Y-%m-%d %H:%M")))
                    .unwrap_or_else(|| "-".into());
                println!(
                    "{:<24} {:<14} {:<8} {:<15} {:<21} {last}",
                    w.name,
                    w.schedule,
                    if w.enabled { "yes" } else { "no" },
                    w.job_kind,
                    next
                );
            }
            Ok(())
        }
        WorkflowsCmd::Run { name } => {
            // From the command line the live status and the stations'
            // nodes are reachable only through Redis.
            let (status, commands) = match &config.redis_url {
                Some(url) => {
                    let status = StatusStore::redis(url, config.status.clone())
                        .await
                        .context("connecting to REDIS_URL for the live status")?;
                    let node = format!("{}-cli-{}", config.node_id()?, std::process::id());
                    // This process holds no station: every command goes to
                    // the node that does.
                    let execute = ingest::router::execute_fn(|station, _, _| async move {
                        Err(ingest::session::CallFailure::NotConnected(station))
                    });
                    let router = CommandRouter::redis(url, node, execute)
                        .await
                        .context("connecting to REDIS_URL for command routing")?;
                    (Some(status), Some(router))
                }
                None => (None, None),
            };
            let sched = scheduler(config, s, status, commands).await?;
            let out = sched.run_now(&name).await?;
            println!(
                "{} {} after {} attempt(s): {}",
                out.workflow,
                out.outcome.as_str(),
                out.attempts,
                out.message
            );
            match out.outcome {
                Outcome::Succeeded => Ok(()),
                Outcome::Failed => bail!("workflow {name} failed"),
                Outcome::Skipped => bail!("workflow {name} was not run: {}", out.message),
            }
        }
        WorkflowsCmd::History { name, limit } => {
            let history = RunHistory::open(&config.lake_url()?, &config.lake.storage_options)?;
            let rows = history.recent(name.as_deref(), limit).await?;
            if rows.is_empty() {
                println!("no runs recorded");
            }
            for r in rows {
                println!(
                    "{} {:<24} {:<9} {:<9} attempt {} on {}: {}",
                    r.scheduled_for.format("%Y-%m-%d %H:%M"),
                    r.workflow,
                    r.trigger.as_str(),
                    r.status.as_str(),
                    r.attempt,
                    r.node_id,
                    r.message.unwrap_or_default()
                );
            }
            Ok(())
        }
    }
}
