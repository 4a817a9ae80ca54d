//! The `weir` agent and CLI as a library, so the integration tests drive the same code.
//!
//! One module per concern, no cycles (a module only uses those listed before it, except
//! `cli` and `agent`, the two entry points):
//! - [`sys`]: every libc/bpf syscall outside aya and std.
//! - [`config`]: the TOML file, its validation, and the rules the CLI shares.
//! - [`audit`]: the audit log: its records, its files and their rotation, its writer thread.
//! - [`overlay`]: the CLI's changes kept in the state file.
//! - [`announce`]: the VIPs' BGP announcements, as routes BIRD imports from the kernel.
//! - [`api`]: the management protocol's types, its server sides (the Unix socket, and the
//!   remote HTTPS listener with its bearer tokens) and its clients.
//! - [`datapath`]: the eBPF object, loading, pinning and adoption, the map layer.
//! - [`reconcile`]: the datapath-level desired state and the diff that writes it.
//! - [`health`]: active health checks.
//! - [`metrics`]: Prometheus metrics and their HTTP endpoint.
//! - [`agent`]: the start sequence, the desired-state function and the owner task.
//! - [`decap`]: `weir decap` on the backends.
//! - [`cli`]: the command line.
//! - [`fuzzing`]: the properties the fuzz targets check (config, API requests, packets).
pub mod agent;
pub mod announce;
pub mod api;
pub mod audit;
pub mod cli;
pub mod config;
pub mod datapath;
pub mod decap;
pub mod fuzzing;
pub mod health;
pub mod metrics;
pub mod overlay;
pub mod reconcile;
pub mod sys;
