//! Scheduled workflows and emailed reports (issue 7). Not built yet.
//!
//! # Layout
//! (none yet)
