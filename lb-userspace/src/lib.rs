//! The `weir` agent and CLI as a library, so the integration tests drive the same code.
pub mod agent;
pub mod api;
pub mod cli;
pub mod config;
pub mod datapath;
pub mod decap;
pub mod health;
pub mod metrics;
pub mod overlay;
pub mod runtime;
