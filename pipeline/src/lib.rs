//! Bronze → silver → gold DataFusion jobs (issue 5). Not built yet: this
//! crate holds nothing so far; the bronze table it will read is written by
//! `ingest::lake`.
//!
//! # Layout
//! (none yet)
