#![warn(missing_docs)]
//! # melora-cli
//!
//! The `melora` command (`src/main.rs`) and what it shares with the other
//! binaries: the backend chosen by cargo features ([`backend`]), a study's
//! plan and tables ([`study`]), two evaluations compared ([`compare`]) and
//! standard output that a closed pipe ends quietly ([`stdout`]).
//! The library crates (`melora-core`, `melora-llama`) choose no backend and
//! parse no command line.

pub mod backend;
pub mod compare;
pub mod stdout;
pub mod study;
