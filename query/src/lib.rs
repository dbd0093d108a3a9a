//! SQL over the lake and the live status store (issue 6). Not built yet.
//!
//! # Layout
//! (none yet)
