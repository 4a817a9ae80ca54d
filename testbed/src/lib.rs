//! Weir's test bed: what the privileged tests and the benches share beyond the `weir`
//! library itself.
//!
//! * [`config`]: agent config text with `[agent]` and `[[service]]` tables
//!   ([`ConfigBuilder`], [`ServiceBuilder`]).

pub mod config;

pub use config::{Backend, ConfigBuilder, HealthCheck, ServiceBuilder};
