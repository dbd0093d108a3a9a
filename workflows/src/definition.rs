//! Workflow definitions: one TOML file per workflow in `workflows/`.
//!
//! ```toml
//! [workflow]
//! name = "nightly-pipeline"        # letters, digits, '-' and '_'
//! schedule = "15 0 * * *"          # cron, UTC (see crate::cron)
//! description = "..."              # optional
//! enabled = true                   # default true
//! catch_up = "latest"              # latest | all | none (default latest)
//!
//! [workflow.retry]                 # optional
//! attempts = 3                     # tries in all (default 3)
//! backoff_secs = 60                # wait before the 2nd try, doubled after
//! max_backoff_secs = 3600          # cap of that wait (default 1 hour)
//! timeout_secs = 7200              # per try (default: none)
//!
//! [job]
//! kind = "pipeline"                # see JobSpec
//! stage = "all"
//! ```
//!
//! Other TOML files in the folder (such as `tariffs.toml`) have no
//! `[workflow]` table and are skipped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::commands::{CommandJob, CommandTarget};
use crate::cron::Schedule;
use crate::digest::DigestJob;

/// A definition that cannot be used; names the file and what to fix.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    #[error("reading workflow definitions in {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("workflow file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("workflow name {name:?} is used by both {first} and {second}: names must be unique")]
    Duplicate {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
}

/// What to do with occurrences missed while no node was running.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CatchUp {
    /// Run only the most recent missed occurrence (it supersedes the older
    /// ones, as a pipeline run or a report does).
    #[default]
    Latest,
    /// Run every missed occurrence, oldest first (at most
    /// [`crate::scheduler::MAX_CATCH_UP`]).
    All,
    /// Run none; wait for the next occurrence.
    #[serde(rename = "none")]
    Skip,
}

impl CatchUp {
    pub fn as_str(self) -> &'static str {
        match self {
            CatchUp::Latest => "latest",
            CatchUp::All => "all",
            CatchUp::Skip => "none",
        }
    }
}

/// Retries of a failed run.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Tries in all, at least 1.
    pub attempts: u32,
    /// Wait before the second try; doubled before each further one.
    pub backoff_secs: u64,
    /// Cap of the doubled wait.
    pub max_backoff_secs: u64,
    /// Limit of one try; `None`: unlimited.
    pub timeout_secs: Option<u64>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 3,
            backoff_secs: 60,
            max_backoff_secs: 3600,
            timeout_secs: None,
        }
    }
}

impl RetryPolicy {
    /// The wait after failed try `attempt` (1-based) before the next one.
    pub fn backoff(&self, attempt: u32) -> std::time::Duration {
        let factor = 1u64 << attempt.saturating_sub(1).min(32);
        let secs = self
            .backoff_secs
            .saturating_mul(factor)
            .min(self.max_backoff_secs.max(self.backoff_secs));
        std::time::Duration::from_secs(secs)
    }
}

/// Which pipeline tables a `pipeline` job builds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PipelineStage {
    Silver,
    Gold,
    #[default]
    All,
}

impl From<PipelineStage> for pipeline::Stage {
    fn from(s: PipelineStage) -> Self {
        match s {
            PipelineStage::Silver => pipeline::Stage::Silver,
            PipelineStage::Gold => pipeline::Stage::Gold,
            PipelineStage::All => pipeline::Stage::All,
        }
    }
}

/// The reports a `report` job can produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReportKind {
    /// Stations that faulted at least the threshold within a day.
    FaultRanking,
}

/// Which month a report covers, relative to the scheduled time (UTC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReportMonth {
    /// The month the run is scheduled in (for a run on its last day).
    Current,
    /// The month before (for a run early in the next month).
    Previous,
}

/// `[job] kind = "report"` parameters.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportJob {
    pub report: ReportKind,
    pub month: ReportMonth,
    /// Addresses mailed the report; none (or no `SMTP_URL`): the report is
    /// written to the report folder instead.
    #[serde(default)]
    pub recipients: Vec<String>,
    /// Run the pipeline (incrementally, all stages) first, so the report
    /// includes today's messages.
    #[serde(default)]
    pub refresh: bool,
}

/// The `[job]` table: what a workflow runs, tagged by `kind`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum JobSpec {
    /// bronze → silver → gold, incrementally.
    Pipeline {
        #[serde(default)]
        stage: PipelineStage,
    },
    Report(ReportJob),
    /// Stations gone Faulted or offline over a day.
    Digest(DigestJob),
    /// Compacts bronze's small files.
    LakeOptimize {},
    /// Deletes bronze files no longer referenced.
    LakeVacuum {
        /// Keep unreferenced files this long (default 168, delta's minimum).
        retention_hours: Option<u64>,
    },
    /// Deletes bronze rows older than `days`.
    LakeRetention {
        days: u32,
    },
    /// A remote command to stations chosen from the live status.
    Command(CommandJob),
}

impl JobSpec {
    /// Addresses told about this job's results (and its final failure).
    pub fn recipients(&self) -> &[String] {
        match self {
            JobSpec::Report(r) => &r.recipients,
            JobSpec::Digest(d) => &d.recipients,
            _ => &[],
        }
    }
}

/// One workflow, as loaded.
#[derive(Clone, Debug)]
pub struct WorkflowDef {
    pub name: String,
    pub schedule: Schedule,
    pub description: Option<String>,
    pub enabled: bool,
    pub catch_up: CatchUp,
    pub retry: RetryPolicy,
    pub job: JobSpec,
    /// The file it came from (for messages).
    pub path: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileToml {
    workflow: WorkflowToml,
    job: JobSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkflowToml {
    name: String,
    schedule: Schedule,
    description: Option<String>,
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    catch_up: CatchUp,
    #[serde(default)]
    retry: RetryPolicy,
}

fn yes() -> bool {
    true
}

const VERSIONS: [&str; 3] = ["1.6", "2.0.1", "2.1"];

/// Checks what serde cannot: names, addresses, retry bounds, command targets.
fn validate(def: &WorkflowDef) -> Result<(), String> {
    if def.name.is_empty()
        || !def
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "workflow.name {:?}: use letters, digits, '-' and '_' only",
            def.name
        ));
    }
    if def.retry.attempts == 0 {
        return Err("workflow.retry.attempts must be at least 1".into());
    }
    for addr in def.job.recipients() {
        addr.parse::<lettre::message::Mailbox>()
            .map_err(|e| format!("job.recipients: {addr:?} is not an email address ({e})"))?;
    }
    if let JobSpec::Command(c) = &def.job {
        if c.action.trim().is_empty() {
            return Err("job.action: name the OCPP action, e.g. \"Reset\"".into());
        }
        if let Some(v) = c.payload.keys().find(|v| !VERSIONS.contains(&v.as_str())) {
            return Err(format!(
                "job.payload.{v:?}: payloads are keyed by OCPP version: \"1.6\", \"2.0.1\", \"2.1\""
            ));
        }
        if c.payload.is_empty() {
            return Err("job.payload: give the payload for at least one OCPP version".into());
        }
        if c.target == CommandTarget::Listed && c.stations.is_empty() {
            return Err("job.stations: target = \"listed\" needs the station ids".into());
        }
    }
    if let JobSpec::LakeRetention { days: 0 } = &def.job {
        return Err("job.days must be at least 1 (0 would delete today's messages)".into());
    }
    Ok(())
}

/// Parses one workflow file's text; `Ok(None)` if it has no `[workflow]`
/// table (another kind of TOML file).
pub fn parse(path: &Path, text: &str) -> Result<Option<WorkflowDef>, DefinitionError> {
    let invalid = |message: String| DefinitionError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let table: toml::Table = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
    if !table.contains_key("workflow") {
        return Ok(None);
    }
    let file: FileToml = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
    let def = WorkflowDef {
        name: file.workflow.name,
        schedule: file.workflow.schedule,
        description: file.workflow.description,
        enabled: file.workflow.enabled,
        catch_up: file.workflow.catch_up,
        retry: file.workflow.retry,
        job: file.job,
        path: path.to_path_buf(),
    };
    validate(&def).map_err(invalid)?;
    Ok(Some(def))
}

/// Loads every `*.toml` of `dir` that has a `[workflow]` table, sorted by
/// name. Any invalid definition or a duplicate name fails the whole load,
/// so a typo is found at start-up rather than at 3 in the morning.
pub fn load_dir(dir: &Path) -> Result<Vec<WorkflowDef>, DefinitionError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DefinitionError::Io { path, source }
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(io(dir))?;
    paths.retain(|p| p.extension().is_some_and(|e| e == "toml") && p.is_file());
    paths.sort();
    let mut defs: Vec<WorkflowDef> = Vec::new();
    let mut seen: HashMap<String, PathBuf> = HashMap::new();
    for path in paths {
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let Some(def) = parse(&path, &text)? else {
            tracing::debug!(path = %path.display(), "no [workflow] table: not a workflow file");
            continue;
        };
        if let Some(first) = seen.get(&def.name) {
            return Err(DefinitionError::Duplicate {
                name: def.name,
                first: first.clone(),
                second: path,
            });
        }
        seen.insert(def.name.clone(), path);
        defs.push(def);
    }
    defs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(defs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Option<WorkflowDef>, DefinitionError> {
        parse(Path::new("wf.toml"), text)
    }

    fn err(text: &str) -> String {
        p(text).unwrap_err().to_string()
    }

    #[test]
    fn shipped_definitions_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let defs = load_dir(dir).unwrap();
        let names: Vec<&str> = defs.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "daily-digest",
                "monthly-fault-ranking",
                "nightly-pipeline",
                "reboot-faulted",
                "weekly-optimize",
                "weekly-vacuum"
            ]
        );
        let by = |n: &str| defs.iter().find(|d| d.name == n).unwrap();
        let nightly = by("nightly-pipeline");
        assert_eq!(
            nightly.job,
            JobSpec::Pipeline {
                stage: PipelineStage::All
            }
        );
        assert!(nightly.enabled);
        let report = by("monthly-fault-ranking");
        let JobSpec::Report(r) = &report.job else {
            panic!("{:?}", report.job)
        };
        assert_eq!(r.month, ReportMonth::Current);
        assert!(r.refresh);
        assert_eq!(r.recipients, ["maintenance@example.com"]);
        let feb = "2027-02-10T00:00:00Z".parse().unwrap();
        assert_eq!(
            report.schedule.next_after(feb).unwrap().to_rfc3339(),
            "2027-02-28T20:00:00+00:00"
        );
        let reboot = by("reboot-faulted");
        assert!(!reboot.enabled, "a fresh install reboots nothing");
        let JobSpec::Command(c) = &reboot.job else {
            panic!("{:?}", reboot.job)
        };
        assert_eq!(c.action, "Reset");
        assert_eq!(c.target, CommandTarget::Faulted);
        assert!(c.skip_busy);
        assert_eq!(c.payload["1.6"]["type"].as_str(), Some("Soft"));
        assert_eq!(c.payload["2.0.1"]["type"].as_str(), Some("OnIdle"));
        assert_eq!(c.payload["2.1"]["type"].as_str(), Some("OnIdle"));
        assert!(matches!(
            by("weekly-vacuum").job,
            JobSpec::LakeVacuum { .. }
        ));
        assert!(matches!(
            by("weekly-optimize").job,
            JobSpec::LakeOptimize {}
        ));
        assert!(matches!(by("daily-digest").job, JobSpec::Digest(_)));
    }

    #[test]
    fn defaults_and_every_kind() {
        let d =
            p("[workflow]\nname = \"x\"\nschedule = \"@daily\"\n[job]\nkind = \"lake-optimize\"\n")
                .unwrap()
                .unwrap();
        assert!(d.enabled);
        assert_eq!(d.catch_up, CatchUp::Latest);
        assert_eq!(d.retry, RetryPolicy::default());
        assert_eq!(d.description, None);
        let d = p(r#"
            [workflow]
            name = "v"
            schedule = "0 3 * * SUN"
            catch_up = "none"
            [workflow.retry]
            attempts = 5
            backoff_secs = 10
            timeout_secs = 30
            [job]
            kind = "lake-vacuum"
            "#)
        .unwrap()
        .unwrap();
        assert_eq!(d.catch_up, CatchUp::Skip);
        assert_eq!(d.retry.attempts, 5);
        assert_eq!(d.retry.max_backoff_secs, 3600);
        assert_eq!(d.retry.timeout_secs, Some(30));
        assert_eq!(
            d.job,
            JobSpec::LakeVacuum {
                retention_hours: None
            }
        );
        let kinds = [
            ("kind = \"pipeline\"\nstage = \"silver\"", "pipeline"),
            ("kind = \"lake-retention\"\ndays = 90", "lake-retention"),
            (
                "kind = \"digest\"\nrecipients = [\"a@example.com\"]",
                "digest",
            ),
            (
                "kind = \"report\"\nreport = \"fault-ranking\"\nmonth = \"previous\"",
                "report",
            ),
            (
                "kind = \"command\"\naction = \"Reset\"\ntarget = \"listed\"\nstations = [\"CP1\"]\n\
                 payload = { \"1.6\" = { type = \"Hard\" } }",
                "command",
            ),
        ];
        for (job, kind) in kinds {
            let d = p(&format!(
                "[workflow]\nname = \"k\"\nschedule = \"@daily\"\n[job]\n{job}\n"
            ))
            .unwrap()
            .unwrap();
            assert_eq!(crate::jobs::job_kind(&d.job), kind);
        }
    }

    #[test]
    fn mistakes_are_named() {
        let base = "[workflow]\nname = \"x\"\nschedule = \"@daily\"\n";
        let e = err(&format!("{base}[job]\nkind = \"lake-optimise\"\n"));
        assert!(e.contains("wf.toml") && e.contains("lake-optimise"), "{e}");
        let e = err(&format!(
            "{base}[job]\nkind = \"pipeline\"\nstages = \"all\"\n"
        ));
        assert!(e.contains("stages"), "{e}");
        let e = err(&format!(
            "{base}[job]\nkind = \"lake-optimize\"\nextra = 1\n"
        ));
        assert!(e.contains("extra"), "{e}");
        let e = err(&format!(
            "{base}[job]\nkind = \"report\"\nreport = \"fault-ranking\"\nmonth = \"current\"\nrecipient = []\n"
        ));
        assert!(e.contains("recipient"), "{e}");
        let e = err(&format!(
            "{base}[job]\nkind = \"report\"\nreport = \"fault-ranking\"\nmonth = \"current\"\nrecipients = [\"nobody\"]\n"
        ));
        assert!(e.contains("nobody") && e.contains("email"), "{e}");
        let e = err(
            "[workflow]\nname = \"x\"\nschedule = \"0 24 * * *\"\n[job]\nkind = \"lake-optimize\"\n",
        );
        assert!(e.contains("hour") && e.contains("24"), "{e}");
        let e = err(
            "[workflow]\nname = \"has space\"\nschedule = \"@daily\"\n[job]\nkind = \"lake-optimize\"\n",
        );
        assert!(e.contains("workflow.name"), "{e}");
        let e = err(
            "[workflow]\nname = \"x\"\nschedule = \"@daily\"\ncatchup = \"all\"\n[job]\nkind = \"lake-optimize\"\n",
        );
        assert!(e.contains("catchup"), "{e}");
        let e = err(base);
        assert!(e.contains("job"), "{e}");
        let e = err(&format!(
            "{base}[job]\nkind = \"command\"\naction = \"Reset\"\ntarget = \"faulted\"\npayload = {{ \"2.0\" = {{}} }}\n"
        ));
        assert!(e.contains("\"2.0\""), "{e}");
        let e = err(&format!(
            "{base}[job]\nkind = \"command\"\naction = \"Reset\"\ntarget = \"listed\"\npayload = {{ \"1.6\" = {{}} }}\n"
        ));
        assert!(e.contains("job.stations"), "{e}");
        let e = err(&format!(
            "{base}[workflow.retry]\nattempts = 0\n[job]\nkind = \"lake-optimize\"\n"
        ));
        assert!(e.contains("attempts"), "{e}");
        // Not a workflow file at all.
        assert!(p("[[tariff]]\nid = \"t\"\n").unwrap().is_none());
    }

    #[test]
    fn directory_load_skips_other_files_and_refuses_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let wf = |name: &str| {
            format!(
                "[workflow]\nname = \"{name}\"\nschedule = \"@daily\"\n[job]\nkind = \"lake-optimize\"\n"
            )
        };
        std::fs::write(dir.path().join("a.toml"), wf("one")).unwrap();
        std::fs::write(dir.path().join("tariffs.toml"), "[[tariff]]\nid = \"t\"\n").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not toml").unwrap();
        assert_eq!(load_dir(dir.path()).unwrap().len(), 1);
        std::fs::write(dir.path().join("b.toml"), wf("one")).unwrap();
        let e = load_dir(dir.path()).unwrap_err();
        assert!(
            matches!(&e, DefinitionError::Duplicate { name, .. } if name == "one"),
            "{e}"
        );
        assert!(e.to_string().contains("a.toml") && e.to_string().contains("b.toml"));
        std::fs::write(dir.path().join("b.toml"), "[workflow]\nname = ").unwrap();
        let e = load_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("b.toml"), "{e}");
        assert!(matches!(
            load_dir(&dir.path().join("missing")),
            Err(DefinitionError::Io { .. })
        ));
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let r = RetryPolicy {
            backoff_secs: 60,
            max_backoff_secs: 200,
            ..RetryPolicy::default()
        };
        let secs: Vec<u64> = (1..=5).map(|a| r.backoff(a).as_secs()).collect();
        assert_eq!(secs, [60, 120, 200, 200, 200]);
        assert_eq!(RetryPolicy::default().backoff(40).as_secs(), 3600);
    }
}
