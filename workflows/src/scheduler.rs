//! The scheduler: runs each enabled workflow at its cron occurrences, on
//! exactly one node, with retries, catch-up and a persisted history.
//!
//! # Due runs
//! Every tick looks, per workflow, at the occurrences in (cursor, now]; the
//! cursor then moves to now. An occurrence found within [`ON_TIME`] of its
//! time runs with trigger `schedule`; older ones were missed and follow the
//! workflow's `catch_up`: `latest` runs the most recent one only, `all`
//! each (at most [`MAX_CATCH_UP`], the newest), `none` none.
//!
//! At start-up the cursor is the `scheduled_for` of the workflow's last
//! final scheduled (non-manual) run in `ops.workflow_runs`, but no further
//! back than [`LOOK_BACK`]. A workflow without history is new: it starts
//! from now and does not catch up occurrences from before it existed (a
//! fresh install must not mail last month's report at once). If the
//! history cannot be read, the workflow also starts from now, with an
//! error logged: better on schedule without catch-up than not at all.
//!
//! # One node, one run, no overlap
//! A run takes two leases (see [`crate::lease`]): `wf:{name}:running`, held
//! by this scheduler instance while any run of the workflow is in progress
//! (so a workflow never overlaps itself, also across nodes), and
//! `wf:{name}:{scheduled_for}` held by the node id, which when the run ends
//! becomes a done marker kept [`DONE_KEPT`] (longer than [`LOOK_BACK`]) so
//! no other node runs that occurrence again. Both are renewed while the job
//! runs. A lease taken elsewhere means "skip": the other node runs it, and
//! occurrences that pass while it is busy are its catch-up to decide.
//! Within a node a busy workflow is not looked at until it is done.
//!
//! # Retries and failure
//! A failed attempt is retried after [`RetryPolicy::backoff`] up to
//! `attempts` tries; each attempt is a history row. A final failure is
//! reported: an error log, `csms_workflow_runs_total{status="failed"}`, and,
//! when SMTP is configured and the job has recipients, a short mail to them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::future::join_all;
use parking_lot::Mutex;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::context::{JobContext, JobError};
use crate::definition::{CatchUp, WorkflowDef};
use crate::history::{RunHistory, RunRecord, RunStatus, Trigger};
use crate::jobs::{job_kind, run_job};
use crate::lease::LeaseStore;

/// How late an occurrence may be found and still count as on time.
pub const ON_TIME: chrono::Duration = chrono::Duration::minutes(5);
/// How far back start-up catch-up looks at most.
pub const LOOK_BACK: chrono::Duration = chrono::Duration::days(35);
/// Most missed occurrences run by `catch_up = "all"` (the newest ones).
pub const MAX_CATCH_UP: usize = 50;
/// How long a finished run's done marker blocks other nodes.
pub const DONE_KEPT: Duration = Duration::from_secs(40 * 24 * 3600);
/// Lease time to live; renewed every third of it while the job runs.
pub const LEASE_TTL: Duration = Duration::from_secs(120);
/// Longest sleep of [`Scheduler::run`] between ticks, so a jump of the
/// system clock is noticed within a minute.
pub const MAX_SLEEP: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("no workflow named {name:?} (known: {known})")]
    Unknown { name: String, known: String },
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    /// All attempts failed.
    Failed,
    /// Not run here: another node has (or had) it, or the lease store
    /// could not be reached. Nothing is recorded.
    Skipped,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::Skipped => "skipped",
        }
    }
}

/// What one run (all its attempts) did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunOutcome {
    pub workflow: String,
    pub scheduled_for: DateTime<Utc>,
    pub trigger: Trigger,
    pub outcome: Outcome,
    /// Attempts made (0 when skipped).
    pub attempts: u32,
    /// The job's summary, the last error, or why it was skipped.
    pub message: String,
}

/// One workflow's line of `csms workflows list`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkflowStatus {
    pub name: String,
    pub schedule: String,
    pub enabled: bool,
    pub job_kind: &'static str,
    pub description: Option<String>,
    /// The next occurrence after `now` (also shown for disabled ones).
    pub next_run: Option<DateTime<Utc>>,
    /// The latest final run (any trigger): when it was scheduled for, and
    /// how it ended.
    pub last_run: Option<(DateTime<Utc>, RunStatus)>,
}

#[derive(Default)]
struct WorkflowState {
    /// Occurrences up to here are handled; `None` until the first tick.
    cursor: Option<DateTime<Utc>>,
    /// A run of it is in progress in this scheduler.
    busy: bool,
}

struct Inner {
    defs: Vec<WorkflowDef>,
    ctx: JobContext,
    lease: LeaseStore,
    history: RunHistory,
    /// Holder of the `running` leases: unique per scheduler instance, so a
    /// `csms workflows run` beside `csms serve` with the same node id does
    /// not share them.
    instance: String,
    state: Mutex<HashMap<String, WorkflowState>>,
}

/// Runs workflows; see the module documentation. Cheap to clone (shared).
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

/// The runs a tick decided on for one workflow, in order.
struct Plan {
    def: usize,
    runs: Vec<(DateTime<Utc>, Trigger)>,
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Which of the occurrences `due` (oldest first) to run at `now`.
fn choose(
    catch_up: CatchUp,
    due: &[DateTime<Utc>],
    now: DateTime<Utc>,
) -> Vec<(DateTime<Utc>, Trigger)> {
    let trigger = |t: &DateTime<Utc>| {
        if now - *t <= ON_TIME {
            Trigger::Schedule
        } else {
            Trigger::CatchUp
        }
    };
    match catch_up {
        CatchUp::Latest => due.last().map(|t| (*t, trigger(t))).into_iter().collect(),
        CatchUp::All => due.iter().map(|t| (*t, trigger(t))).collect(),
        CatchUp::Skip => due
            .last()
            .map(|t| (*t, trigger(t)))
            .filter(|(_, tr)| *tr == Trigger::Schedule)
            .into_iter()
            .collect(),
    }
}

impl Scheduler {
    pub fn new(
        defs: Vec<WorkflowDef>,
        ctx: JobContext,
        lease: LeaseStore,
        history: RunHistory,
    ) -> Scheduler {
        static INSTANCES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let instance = format!(
            "{}/{}-{}-{}",
            ctx.node_id,
            std::process::id(),
            Utc::now().timestamp_micros(),
            INSTANCES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        Scheduler {
            inner: Arc::new(Inner {
                defs,
                ctx,
                lease,
                history,
                instance,
                state: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The workflows it was given.
    pub fn definitions(&self) -> &[WorkflowDef] {
        &self.inner.defs
    }

    /// Decides the due runs at `now` and marks their workflows busy.
    async fn plan(&self, now: DateTime<Utc>) -> Vec<Plan> {
        let inner = &self.inner;
        let mut plans = Vec::new();
        for (i, def) in inner.defs.iter().enumerate() {
            if !def.enabled {
                continue;
            }
            let (busy, cursor) = {
                let state = inner.state.lock();
                state
                    .get(&def.name)
                    .map_or((false, None), |s| (s.busy, s.cursor))
            };
            if busy {
                continue;
            }
            let cursor = match cursor {
                Some(c) => c,
                None => inner.start_cursor(def, now).await,
            };
            let limit = match def.catch_up {
                CatchUp::All => MAX_CATCH_UP,
                CatchUp::Latest | CatchUp::Skip => 1,
            };
            let due = def.schedule.latest_occurrences(cursor, now, limit);
            let runs = choose(def.catch_up, &due, now);
            let skipped = due.len() - runs.len();
            if skipped > 0 {
                tracing::info!(
                    workflow = %def.name,
                    skipped,
                    catch_up = def.catch_up.as_str(),
                    "missed occurrences not run"
                );
            }
            let mut state = inner.state.lock();
            let s = state.entry(def.name.clone()).or_default();
            s.cursor = Some(now.max(cursor));
            if !runs.is_empty() {
                s.busy = true;
                plans.push(Plan { def: i, runs });
            }
        }
        plans
    }

    /// Runs what is due at `now` and returns when those runs are done (all
    /// attempts, backoff included). The loop of [`Scheduler::run`] does the
    /// same without waiting; tests call this with a manual clock.
    pub async fn tick(&self, now: DateTime<Utc>) -> Vec<RunOutcome> {
        let plans = self.plan(now).await;
        join_all(plans.into_iter().map(|p| self.inner.clone().execute(p)))
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// When the earliest enabled, idle workflow is next due after `now`.
    fn next_due(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let state = self.inner.state.lock();
        self.inner
            .defs
            .iter()
            .filter(|d| d.enabled && !state.get(&d.name).is_some_and(|s| s.busy))
            .filter_map(|d| {
                let from = state.get(&d.name).and_then(|s| s.cursor).unwrap_or(now);
                d.schedule.next_after(from.max(now))
            })
            .min()
    }

    /// The scheduler loop of `csms serve`: tick, run what is due in the
    /// background (workflows in parallel, each never overlapping itself),
    /// sleep until the next occurrence or at most [`MAX_SLEEP`]. On
    /// `shutdown` runs in progress are abandoned: their leases expire within
    /// [`LEASE_TTL`] and, having no final history row, they are caught up
    /// after the restart.
    pub async fn run(self, shutdown: CancellationToken) {
        let enabled = self.inner.defs.iter().filter(|d| d.enabled).count();
        tracing::info!(
            workflows = self.inner.defs.len(),
            enabled,
            node = %self.inner.ctx.node_id,
            "scheduler started"
        );
        let mut running: JoinSet<Vec<RunOutcome>> = JoinSet::new();
        loop {
            let now = self.inner.ctx.clock.now();
            for plan in self.plan(now).await {
                running.spawn(self.inner.clone().execute(plan));
            }
            let wait = self
                .next_due(now)
                .and_then(|t| (t - now).to_std().ok())
                .unwrap_or(MAX_SLEEP)
                .clamp(Duration::from_millis(100), MAX_SLEEP);
            let sleep = tokio::time::sleep(wait);
            tokio::pin!(sleep);
            // Wake early when a run ends: its workflow is idle again.
            tokio::select! {
                _ = shutdown.cancelled() => {
                    if !running.is_empty() {
                        tracing::warn!(runs = running.len(), "scheduler stopping: abandoning runs in progress");
                    }
                    running.abort_all();
                    tracing::info!("scheduler stopped");
                    return;
                }
                _ = &mut sleep => {}
                Some(done) = running.join_next(), if !running.is_empty() => {
                    if let Err(e) = done
                        && e.is_panic()
                    {
                        tracing::error!(error = %e, "workflow run panicked");
                    }
                }
            }
        }
    }

    /// Runs `name` now (`csms workflows run NAME`), enabled or not: trigger
    /// `manual`, `scheduled_for` = now (whole seconds), leased and recorded
    /// like any run. Waits for it, retries included.
    pub async fn run_now(&self, name: &str) -> Result<RunOutcome, SchedulerError> {
        let inner = &self.inner;
        let Some(i) = inner.defs.iter().position(|d| d.name == name) else {
            return Err(SchedulerError::Unknown {
                name: name.to_string(),
                known: inner
                    .defs
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        let now = inner.ctx.clock.now();
        let at = DateTime::from_timestamp(now.timestamp(), 0).unwrap_or(now);
        {
            let mut state = inner.state.lock();
            let s = state.entry(name.to_string()).or_default();
            if s.busy {
                return Ok(RunOutcome {
                    workflow: name.to_string(),
                    scheduled_for: at,
                    trigger: Trigger::Manual,
                    outcome: Outcome::Skipped,
                    attempts: 0,
                    message: "a run of it is in progress on this node".into(),
                });
            }
            s.busy = true;
        }
        let plan = Plan {
            def: i,
            runs: vec![(at, Trigger::Manual)],
        };
        let mut outcomes = inner.clone().execute(plan).await;
        Ok(outcomes.remove(0))
    }

    /// Each workflow with its next run after `now` and its last final run
    /// (`csms workflows list`). A history that cannot be read shows no
    /// last run, with a warning logged.
    pub async fn list(&self, now: DateTime<Utc>) -> Vec<WorkflowStatus> {
        let mut out = Vec::new();
        for d in &self.inner.defs {
            let last_run = match self.inner.history.last_final(&d.name).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(workflow = %d.name, error = %e, "reading run history");
                    None
                }
            };
            out.push(WorkflowStatus {
                name: d.name.clone(),
                schedule: d.schedule.source().to_string(),
                enabled: d.enabled,
                job_kind: job_kind(&d.job),
                description: d.description.clone(),
                next_run: d.schedule.next_after(now),
                last_run,
            });
        }
        out
    }
}

impl Inner {
    /// Where a workflow's catch-up starts (see the module docs).
    async fn start_cursor(&self, def: &WorkflowDef, now: DateTime<Utc>) -> DateTime<Utc> {
        match self.history.last_scheduled_final(&def.name).await {
            Ok(Some((last, _))) => {
                let since = last.max(now - LOOK_BACK);
                tracing::debug!(workflow = %def.name, %last, %since, "catching up from history");
                since
            }
            Ok(None) => now,
            Err(e) => {
                tracing::error!(
                    workflow = %def.name,
                    error = %e,
                    "cannot read the run history: missed runs are not caught up"
                );
                now
            }
        }
    }

    /// Runs a plan's runs in order, then marks the workflow idle.
    async fn execute(self: Arc<Self>, plan: Plan) -> Vec<RunOutcome> {
        let def = &self.defs[plan.def];
        let mut out = Vec::new();
        for (at, trigger) in plan.runs {
            out.push(self.run_once(def, at, trigger).await);
        }
        if let Some(s) = self.state.lock().get_mut(&def.name) {
            s.busy = false;
        }
        out
    }

    fn skipped(def: &WorkflowDef, at: DateTime<Utc>, trigger: Trigger, why: String) -> RunOutcome {
        tracing::debug!(workflow = %def.name, scheduled_for = %at, %why, "run skipped");
        metrics::counter!("csms_workflow_runs_total", "workflow" => def.name.clone(), "status" => "skipped")
            .increment(1);
        RunOutcome {
            workflow: def.name.clone(),
            scheduled_for: at,
            trigger,
            outcome: Outcome::Skipped,
            attempts: 0,
            message: why,
        }
    }

    /// One run: leases, attempts with backoff, history, reporting.
    async fn run_once(&self, def: &WorkflowDef, at: DateTime<Utc>, trigger: Trigger) -> RunOutcome {
        let ctx = &self.ctx;
        let running_key = format!("wf:{}:running", def.name);
        let run_key = format!("wf:{}:{}", def.name, rfc3339(at));
        match self
            .lease
            .acquire(&running_key, &self.instance, LEASE_TTL, ctx.clock.now())
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                return Self::skipped(
                    def,
                    at,
                    trigger,
                    "a run of it is in progress on another node".into(),
                );
            }
            Err(e) => {
                tracing::error!(workflow = %def.name, error = %e, "lease store unreachable: run skipped");
                return Self::skipped(def, at, trigger, format!("lease store: {e}"));
            }
        }
        let taken = self
            .lease
            .acquire(&run_key, &ctx.node_id, LEASE_TTL, ctx.clock.now())
            .await;
        if !matches!(taken, Ok(true)) {
            self.release(&running_key, &self.instance, None).await;
            let why = match taken {
                Err(e) => format!("lease store: {e}"),
                _ => "already run (or running) on another node".into(),
            };
            return Self::skipped(def, at, trigger, why);
        }
        let renewal = self.renew(vec![
            (running_key.clone(), self.instance.clone()),
            (run_key.clone(), ctx.node_id.clone()),
        ]);
        let kind = job_kind(&def.job);
        tracing::info!(workflow = %def.name, scheduled_for = %at, %trigger, kind, "run started");
        let attempts = def.retry.attempts.max(1);
        let mut last: Result<String, JobError> = Err(JobError::Failed("not run".into()));
        let mut made = 0;
        for attempt in 1..=attempts {
            made = attempt;
            let started_at = ctx.clock.now();
            let clock = std::time::Instant::now();
            let job = run_job(ctx, &def.job, at);
            last = match def.retry.timeout_secs {
                Some(secs) => tokio::time::timeout(Duration::from_secs(secs), job)
                    .await
                    .unwrap_or_else(|_| Err(JobError::Failed(format!("timed out after {secs} s")))),
                None => job.await,
            };
            metrics::histogram!("csms_workflow_attempt_seconds", "workflow" => def.name.clone())
                .record(clock.elapsed().as_secs_f64());
            let is_final = last.is_ok() || attempt == attempts;
            let record = RunRecord {
                workflow: def.name.clone(),
                job_kind: kind.to_string(),
                scheduled_for: at,
                trigger,
                attempt,
                node_id: ctx.node_id.clone(),
                started_at,
                finished_at: ctx.clock.now(),
                status: if last.is_ok() {
                    RunStatus::Succeeded
                } else {
                    RunStatus::Failed
                },
                is_final,
                message: Some(match &last {
                    Ok(summary) => summary.clone(),
                    Err(e) => e.to_string(),
                }),
            };
            if let Err(e) = self.history.record(&record).await {
                metrics::counter!("csms_workflow_history_errors_total").increment(1);
                tracing::error!(workflow = %def.name, attempt, error = %e, "recording the run in ops.workflow_runs failed");
            }
            match &last {
                Ok(summary) => {
                    tracing::info!(workflow = %def.name, scheduled_for = %at, attempt, %summary, "run succeeded");
                    break;
                }
                Err(e) if !is_final => {
                    let wait = def.retry.backoff(attempt);
                    tracing::warn!(workflow = %def.name, scheduled_for = %at, attempt, attempts, error = %e, retry_in = ?wait, "run failed, retrying");
                    tokio::time::sleep(wait).await;
                }
                Err(_) => {}
            }
        }
        renewal.cancel();
        self.release(&run_key, &ctx.node_id, Some(DONE_KEPT)).await;
        self.release(&running_key, &self.instance, None).await;
        let (outcome, message) = match last {
            Ok(summary) => (Outcome::Succeeded, summary),
            Err(e) => {
                let message = e.to_string();
                self.report_failure(def, at, made, &message).await;
                (Outcome::Failed, message)
            }
        };
        metrics::counter!("csms_workflow_runs_total", "workflow" => def.name.clone(), "status" => outcome.as_str())
            .increment(1);
        RunOutcome {
            workflow: def.name.clone(),
            scheduled_for: at,
            trigger,
            outcome,
            attempts: made,
            message,
        }
    }

    /// Keeps `leases` (key, holder) alive until the returned token is
    /// cancelled.
    fn renew(&self, leases: Vec<(String, String)>) -> CancellationToken {
        let stop = CancellationToken::new();
        let (store, clock, token) = (self.lease.clone(), self.ctx.clock.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(LEASE_TTL / 3) => {}
                }
                for (key, holder) in &leases {
                    match store.acquire(key, holder, LEASE_TTL, clock.now()).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!(key, "lease lost to another node while running")
                        }
                        Err(e) => tracing::warn!(key, error = %e, "renewing lease failed"),
                    }
                }
            }
        });
        stop
    }

    async fn release(&self, key: &str, holder: &str, keep: Option<Duration>) {
        if let Err(e) = self
            .lease
            .finish(key, holder, keep, self.ctx.clock.now())
            .await
        {
            tracing::warn!(key, error = %e, "releasing lease failed (it expires by itself)");
        }
    }

    /// A final failure: error log, and a mail to the job's recipients when
    /// SMTP is configured (the metric is counted by the caller).
    async fn report_failure(
        &self,
        def: &WorkflowDef,
        at: DateTime<Utc>,
        attempts: u32,
        error: &str,
    ) {
        tracing::error!(
            workflow = %def.name,
            scheduled_for = %at,
            attempts,
            %error,
            "workflow run failed"
        );
        let recipients = def.job.recipients();
        if recipients.is_empty() || self.ctx.smtp.url.is_none() {
            return;
        }
        let mail = failure_mail(def, at, attempts, error, &self.ctx.node_id);
        match crate::send(&mail, &self.ctx.smtp, recipients).await {
            Ok(()) => tracing::info!(workflow = %def.name, "failure mailed"),
            Err(e) => {
                metrics::counter!("csms_workflow_failure_mail_errors_total").increment(1);
                tracing::error!(workflow = %def.name, error = %e, "mailing the failure failed");
            }
        }
    }
}

/// The short mail telling a job's recipients that it failed, as a
/// [`crate::RenderedReport`] without attachments (so it goes through the
/// same delivery, with its retries).
fn failure_mail(
    def: &WorkflowDef,
    at: DateTime<Utc>,
    attempts: u32,
    error: &str,
    node: &str,
) -> crate::RenderedReport {
    let subject = format!("[csms] workflow {} failed ({})", def.name, rfc3339(at));
    let text = format!(
        "The workflow {name} ({kind}) scheduled for {at} failed after {attempts} attempt(s) on node {node}.\n\n\
         Last error: {error}\n\n\
         History: SELECT * FROM ops.workflow_runs WHERE workflow = '{name}' ORDER BY started_at DESC\n\
         Run it again: csms workflows run {name}\n",
        name = def.name,
        kind = job_kind(&def.job),
        at = rfc3339(at),
    );
    let esc = crate::report::html_escape;
    let html = format!(
        "<html><body><p>The workflow <b>{name}</b> ({kind}) scheduled for {at} failed after \
         {attempts} attempt(s) on node {node}.</p><p>Last error: <code>{error}</code></p>\
         <p>Run it again: <code>csms workflows run {name}</code></p></body></html>",
        name = esc(&def.name),
        kind = job_kind(&def.job),
        at = rfc3339(at),
        node = esc(node),
        error = esc(error),
    );
    crate::RenderedReport {
        month: String::new(),
        subject,
        text,
        html,
        csv: Vec::new(),
        png: None,
        has_rows: false,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::clock::ManualClock;
    use crate::definition::{JobSpec, ReportJob, ReportKind, ReportMonth, RetryPolicy};
    use ingest::test_redis::RedisServer;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn def(name: &str, schedule: &str, catch_up: CatchUp, job: JobSpec) -> WorkflowDef {
        WorkflowDef {
            name: name.into(),
            schedule: crate::cron::Schedule::parse(schedule).unwrap(),
            description: None,
            enabled: true,
            catch_up,
            retry: RetryPolicy::default(),
            job,
            path: "test.toml".into(),
        }
    }

    struct Node {
        scheduler: Scheduler,
        clock: ManualClock,
        history: RunHistory,
    }

    fn node(
        id: &str,
        lake: &Path,
        defs: Vec<WorkflowDef>,
        lease: LeaseStore,
        start: DateTime<Utc>,
    ) -> Node {
        let clock = ManualClock::new(start);
        let mut ctx = crate::jobs::tests::ctx(lake, &lake.join("reports"));
        ctx.node_id = id.into();
        ctx.clock = Arc::new(clock.clone());
        let history = RunHistory::open(lake.to_str().unwrap(), &HashMap::new()).unwrap();
        Node {
            scheduler: Scheduler::new(defs, ctx, lease, history.clone()),
            clock,
            history,
        }
    }

    impl Node {
        async fn tick(&self, at: DateTime<Utc>) -> Vec<RunOutcome> {
            self.clock.set(at);
            self.scheduler.tick(at).await
        }
    }

    fn record(workflow: &str, at: DateTime<Utc>) -> RunRecord {
        RunRecord {
            workflow: workflow.into(),
            job_kind: "lake-optimize".into(),
            scheduled_for: at,
            trigger: Trigger::Schedule,
            attempt: 1,
            node_id: "old".into(),
            started_at: at,
            finished_at: at,
            status: RunStatus::Succeeded,
            is_final: true,
            message: None,
        }
    }

    #[test]
    fn choosing_among_due_occurrences() {
        let now = t("2027-03-10T06:02:00Z");
        let due = [
            t("2027-03-08T06:00:00Z"),
            t("2027-03-09T06:00:00Z"),
            t("2027-03-10T06:00:00Z"),
        ];
        assert_eq!(
            choose(CatchUp::Latest, &due, now),
            vec![(due[2], Trigger::Schedule)]
        );
        assert_eq!(
            choose(CatchUp::All, &due, now),
            vec![
                (due[0], Trigger::CatchUp),
                (due[1], Trigger::CatchUp),
                (due[2], Trigger::Schedule)
            ]
        );
        assert_eq!(
            choose(CatchUp::Skip, &due, now),
            vec![(due[2], Trigger::Schedule)]
        );
        assert!(choose(CatchUp::Skip, &due[..2], now).is_empty());
        assert_eq!(
            choose(CatchUp::Latest, &due[..2], now),
            vec![(due[1], Trigger::CatchUp)]
        );
        assert!(choose(CatchUp::Latest, &[], now).is_empty());
    }

    /// Ticks every 10 minutes over February and March of a common and of a
    /// leap year: the month-end workflow fires exactly on each last day.
    #[tokio::test]
    async fn last_day_of_february_and_of_a_31_day_month_fire_exactly_once() {
        let wf = def(
            "month-end",
            "0 20 L * *",
            CatchUp::Latest,
            JobSpec::LakeOptimize {},
        );
        for (year, feb_last) in [(2027, 28), (2028, 29)] {
            // A lake per year: in one lake, 2028 would catch up January.
            let lake = tempfile::tempdir().unwrap();
            let start = t(&format!("{year}-02-20T00:00:00Z"));
            let n = node(
                "n1",
                lake.path(),
                vec![wf.clone()],
                LeaseStore::local(),
                start,
            );
            let mut fired = Vec::new();
            let mut at = start;
            while at <= t(&format!("{year}-04-01T00:00:00Z")) {
                for o in n.tick(at).await {
                    assert_eq!(o.outcome, Outcome::Succeeded, "{o:?}");
                    assert_eq!(o.trigger, Trigger::Schedule);
                    fired.push(o.scheduled_for);
                }
                at += chrono::Duration::minutes(10);
            }
            assert_eq!(
                fired,
                vec![
                    t(&format!("{year}-02-{feb_last}T20:00:00Z")),
                    t(&format!("{year}-03-31T20:00:00Z"))
                ]
            );
            let rows = n.history.recent(Some("month-end"), 10).await.unwrap();
            assert_eq!(rows.len(), 2);
            assert!(
                rows.iter()
                    .all(|r| r.is_final && r.status == RunStatus::Succeeded)
            );
        }
    }

    #[tokio::test]
    async fn catch_up_after_downtime_follows_the_policy() {
        let now = t("2027-03-10T12:00:00Z");
        let last = t("2027-03-07T06:00:00Z");
        for (policy, want) in [
            (CatchUp::Latest, vec!["2027-03-10T06:00:00Z"]),
            (
                CatchUp::All,
                vec![
                    "2027-03-08T06:00:00Z",
                    "2027-03-09T06:00:00Z",
                    "2027-03-10T06:00:00Z",
                ],
            ),
            (CatchUp::Skip, vec![]),
        ] {
            let lake = tempfile::tempdir().unwrap();
            let wf = def("daily", "0 6 * * *", policy, JobSpec::LakeOptimize {});
            let n = node(
                "n1",
                lake.path(),
                vec![wf.clone()],
                LeaseStore::local(),
                now,
            );
            n.history.record(&record("daily", last)).await.unwrap();
            // A manual run since does not count as an occurrence.
            let mut manual = record("daily", t("2027-03-09T09:00:00Z"));
            manual.trigger = Trigger::Manual;
            n.history.record(&manual).await.unwrap();

            let ran = n.tick(now).await;
            let at: Vec<DateTime<Utc>> = ran.iter().map(|o| o.scheduled_for).collect();
            assert_eq!(
                at,
                want.iter().map(|s| t(s)).collect::<Vec<_>>(),
                "{policy:?}"
            );
            assert!(
                ran.iter()
                    .all(|o| o.trigger == Trigger::CatchUp && o.outcome == Outcome::Succeeded)
            );
            // Nothing twice, in this scheduler or in a restarted one.
            assert!(n.tick(now + chrono::Duration::minutes(1)).await.is_empty());
            let restarted = node("n1", lake.path(), vec![wf], LeaseStore::local(), now);
            let again = restarted.tick(now + chrono::Duration::minutes(2)).await;
            // "none" never caught up (the history still ends on 7 March):
            // a restart does not change that.
            assert!(again.is_empty(), "{again:?}");
            let rows = n.history.recent(Some("daily"), 100).await.unwrap();
            assert_eq!(rows.len(), 2 + want.len());
            // On time after the downtime: the next occurrence is a schedule run.
            let next = n.tick(t("2027-03-11T06:00:10Z")).await;
            assert_eq!(next.len(), 1);
            assert_eq!(next[0].trigger, Trigger::Schedule);
        }
    }

    #[tokio::test]
    async fn a_new_workflow_does_not_catch_up() {
        let lake = tempfile::tempdir().unwrap();
        let wf = def(
            "fresh",
            "0 20 L * *",
            CatchUp::All,
            JobSpec::LakeOptimize {},
        );
        let n = node(
            "n1",
            lake.path(),
            vec![wf],
            LeaseStore::local(),
            t("2027-03-02T00:00:00Z"),
        );
        assert!(n.tick(t("2027-03-02T00:00:00Z")).await.is_empty());
    }

    /// Two nodes sharing Redis and the lake tick at the same instant (and
    /// again after a restart): the job runs once.
    #[tokio::test]
    async fn two_nodes_run_a_scheduled_job_once() {
        let redis = RedisServer::start();
        let lake = tempfile::tempdir().unwrap();
        let wf = def(
            "nightly",
            "15 0 * * *",
            CatchUp::Latest,
            JobSpec::Pipeline {
                stage: crate::definition::PipelineStage::All,
            },
        );
        let start = t("2027-03-01T00:00:00Z");
        let mut nodes = Vec::new();
        for id in ["n1", "n2"] {
            let lease = LeaseStore::redis(&redis.url(), "csms:").await.unwrap();
            nodes.push(node(id, lake.path(), vec![wf.clone()], lease, start));
        }
        for n in &nodes {
            assert!(n.tick(start).await.is_empty());
        }
        let at = t("2027-03-01T00:15:00Z");
        let (a, b) = tokio::join!(nodes[0].tick(at), nodes[1].tick(at));
        let all: Vec<RunOutcome> = a.into_iter().chain(b).collect();
        assert_eq!(all.len(), 2, "{all:?}");
        let ran: Vec<_> = all
            .iter()
            .filter(|o| o.outcome == Outcome::Succeeded)
            .collect();
        assert_eq!(ran.len(), 1, "{all:?}");
        assert_eq!(
            all.iter().filter(|o| o.outcome == Outcome::Skipped).count(),
            1
        );
        let rows = nodes[0].history.recent(Some("nightly"), 10).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].scheduled_for, at);
        assert!(
            redis
                .keys()
                .contains(&"csms:lease:wf:nightly:2027-03-01T00:15:00Z".to_string())
        );

        // Both restart a little later; neither runs it again.
        let later = t("2027-03-01T00:17:00Z");
        let mut restarted = Vec::new();
        for id in ["n1", "n2"] {
            let lease = LeaseStore::redis(&redis.url(), "csms:").await.unwrap();
            restarted.push(node(id, lake.path(), vec![wf.clone()], lease, later));
        }
        let (a, b) = tokio::join!(restarted[0].tick(later), restarted[1].tick(later));
        assert!(a.is_empty() && b.is_empty(), "{a:?} {b:?}");
        assert_eq!(nodes[0].history.recent(None, 10).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_run_in_progress_elsewhere_is_not_overlapped() {
        let lake = tempfile::tempdir().unwrap();
        let lease = LeaseStore::local();
        let wf = def("w", "* * * * *", CatchUp::Latest, JobSpec::LakeOptimize {});
        let now = t("2027-03-01T00:00:30Z");
        let n = node("n1", lake.path(), vec![wf], lease.clone(), now);
        assert!(n.tick(now).await.is_empty());
        assert!(
            lease
                .acquire("wf:w:running", "n2/other", LEASE_TTL, now)
                .await
                .unwrap()
        );
        let o = n.tick(t("2027-03-01T00:01:00Z")).await;
        assert_eq!(o.len(), 1);
        assert_eq!(o[0].outcome, Outcome::Skipped);
        assert!(o[0].message.contains("another node"), "{}", o[0].message);
        lease
            .finish("wf:w:running", "n2/other", None, now)
            .await
            .unwrap();
        let o = n.tick(t("2027-03-01T00:02:00Z")).await;
        assert_eq!(o[0].outcome, Outcome::Succeeded);
        assert!(n.history.recent(None, 10).await.unwrap().len() == 1);
    }

    /// A failing job is tried `attempts` times, waiting 1 s then 2 s, each
    /// attempt recorded, the last as final.
    #[tokio::test]
    async fn failing_job_is_retried_with_backoff_and_recorded() {
        let lake = tempfile::tempdir().unwrap();
        let mut wf = def(
            "retention",
            "0 2 * * *",
            CatchUp::Latest,
            JobSpec::LakeRetention { days: 30 },
        );
        wf.retry = RetryPolicy {
            attempts: 3,
            backoff_secs: 1,
            max_backoff_secs: 3600,
            timeout_secs: Some(600),
        };
        let now = t("2027-03-01T01:00:00Z");
        let mut n = node("n1", lake.path(), vec![wf], LeaseStore::local(), now);
        // Jobs see a lake URL that cannot work; history is in the good lake.
        let mut ctx = n.scheduler.inner.ctx.clone();
        ctx.lake_url = "file://elsewhere/lake".into();
        n.scheduler = Scheduler::new(
            n.scheduler.inner.defs.clone(),
            ctx,
            LeaseStore::local(),
            n.history.clone(),
        );
        assert!(n.tick(now).await.is_empty());
        let started = tokio::time::Instant::now();
        let o = n.tick(t("2027-03-01T02:00:00Z")).await;
        let waited = started.elapsed();
        assert_eq!(o.len(), 1);
        assert_eq!(o[0].outcome, Outcome::Failed);
        assert_eq!(o[0].attempts, 3);
        assert!(o[0].message.contains("elsewhere"), "{}", o[0].message);
        assert!(
            waited >= Duration::from_secs(3) && waited < Duration::from_secs(10),
            "{waited:?}"
        );
        let mut rows = n.history.recent(Some("retention"), 10).await.unwrap();
        rows.reverse();
        let attempts: Vec<(u32, RunStatus, bool)> = rows
            .iter()
            .map(|r| (r.attempt, r.status, r.is_final))
            .collect();
        assert_eq!(
            attempts,
            vec![
                (1, RunStatus::Failed, false),
                (2, RunStatus::Failed, false),
                (3, RunStatus::Failed, true)
            ]
        );
        assert_eq!(
            n.history.last_final("retention").await.unwrap(),
            Some((t("2027-03-01T02:00:00Z"), RunStatus::Failed))
        );
    }

    /// A final failure of a job with recipients is mailed to them, through
    /// a real SMTP server (aiosmtpd, `tests/python/smtp_sink.py`).
    #[tokio::test]
    async fn final_failure_is_mailed_to_the_recipients() {
        use tokio::io::AsyncBufReadExt;
        let sink_dir = tempfile::tempdir().unwrap();
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let mut sink = tokio::process::Command::new(python)
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/smtp_sink.py"))
            .arg("--dir")
            .arg(sink_dir.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 with aiosmtpd (scripts/install-test-deps.sh)");
        let mut lines = tokio::io::BufReader::new(sink.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let port = serde_json::from_str::<serde_json::Value>(&line).unwrap()["port"]
            .as_u64()
            .unwrap();

        let lake = tempfile::tempdir().unwrap();
        let mut wf = def(
            "report",
            "0 20 L * *",
            CatchUp::Latest,
            JobSpec::Report(ReportJob {
                report: ReportKind::FaultRanking,
                month: ReportMonth::Current,
                recipients: vec!["maintenance@example.com".into()],
                refresh: false,
            }),
        );
        wf.retry.attempts = 2;
        wf.retry.backoff_secs = 0;
        let now = t("2027-02-28T20:00:00Z");
        let n = node(
            "n1",
            lake.path(),
            vec![wf.clone()],
            LeaseStore::local(),
            now,
        );
        let mut ctx = n.scheduler.inner.ctx.clone();
        ctx.lake_url = "file://elsewhere/lake".into();
        ctx.smtp.url = Some(format!("smtp://127.0.0.1:{port}"));
        ctx.smtp.from = "csms@csms.test".into();
        let s = Scheduler::new(vec![wf], ctx, LeaseStore::local(), n.history.clone());
        let o = s.run_now("report").await.unwrap();
        assert_eq!(
            (o.outcome, o.attempts, o.trigger),
            (Outcome::Failed, 2, Trigger::Manual)
        );

        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let eml = loop {
            let p = sink_dir.path().join("0001.eml");
            if p.exists() {
                break std::fs::read_to_string(p).unwrap();
            }
            assert!(std::time::Instant::now() < deadline, "no failure mail");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(
            eml.contains("Subject: [csms] workflow report failed"),
            "{eml}"
        );
        assert!(eml.contains("elsewhere"), "{eml}");
        let envelope: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(sink_dir.path().join("0001.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            envelope["rcpt_tos"],
            serde_json::json!(["maintenance@example.com"])
        );
        assert!(
            !sink_dir.path().join("0002.eml").exists(),
            "one mail per final failure"
        );
    }

    #[tokio::test]
    async fn run_now_and_list() {
        let lake = tempfile::tempdir().unwrap();
        let mut off = def("off", "0 3 * * *", CatchUp::Skip, JobSpec::LakeOptimize {});
        off.enabled = false;
        let on = def(
            "on",
            "15 0 * * *",
            CatchUp::Latest,
            JobSpec::LakeVacuum {
                retention_hours: None,
            },
        );
        let now = t("2027-03-01T10:20:30.5Z");
        let n = node("n1", lake.path(), vec![off, on], LeaseStore::local(), now);
        // Disabled workflows never run on schedule, but can by hand.
        assert!(n.tick(t("2027-03-02T03:00:00Z")).await.is_empty());
        n.clock.set(now);
        let o = n.scheduler.run_now("off").await.unwrap();
        assert_eq!(o.outcome, Outcome::Succeeded, "{o:?}");
        assert_eq!(o.trigger, Trigger::Manual);
        assert_eq!(o.scheduled_for, t("2027-03-01T10:20:30Z"));
        let e = n.scheduler.run_now("nope").await.unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("off, on"), "{e}");

        let list = n.scheduler.list(now).await;
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].name, "off");
        assert!(!list[0].enabled);
        assert_eq!(list[0].job_kind, "lake-optimize");
        assert_eq!(list[0].next_run, Some(t("2027-03-02T03:00:00Z")));
        assert_eq!(
            list[0].last_run,
            Some((t("2027-03-01T10:20:30Z"), RunStatus::Succeeded))
        );
        assert_eq!(list[1].schedule, "15 0 * * *");
        assert_eq!(list[1].last_run, None);
        let rows = n.history.recent(Some("off"), 10).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].trigger, Trigger::Manual);
    }

    /// The background loop: it wakes for the occurrence, runs it, and stops
    /// on shutdown.
    #[tokio::test]
    async fn run_loop_runs_due_jobs_until_shutdown() {
        let lake = tempfile::tempdir().unwrap();
        let wf = def(
            "loop",
            "15 0 * * *",
            CatchUp::Latest,
            JobSpec::LakeOptimize {},
        );
        let start = t("2027-03-01T00:14:59.700Z");
        let n = node("n1", lake.path(), vec![wf], LeaseStore::local(), start);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(n.scheduler.clone().run(shutdown.clone()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        n.clock.set(t("2027-03-01T00:15:00.100Z"));
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let rows = n.history.recent(Some("loop"), 10).await.unwrap();
            if !rows.is_empty() {
                assert_eq!(rows.len(), 1);
                assert_eq!(rows[0].scheduled_for, t("2027-03-01T00:15:00Z"));
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the loop never ran it"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops on shutdown")
            .unwrap();
    }
}
