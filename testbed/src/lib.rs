//! Weir's test bed: the network namespaces, veth pairs and bridge that the privileged tests,
//! the benches and `cargo xtask demo` run real traffic through, and the agent config files
//! they write.
//!
//! * [`cmd`]: running `ip`, `sysctl` and friends, inside a namespace or not;
//! * [`netns`]: namespaces that delete themselves ([`Netns`]), threads inside a namespace
//!   ([`in_netns`], [`spawn_in_netns`]) and stopping what was left running in one;
//! * [`topology`]: the client / switch / balancer / three backends topology ([`Topology`]),
//!   for direct server return or the NAT modes ([`Layout`]), torn down on drop;
//! * [`scaleout`]: a client behind a router doing ECMP over several balancers
//!   ([`ScaleOut`]), the balancers and backends on one segment;
//! * [`config`]: agent config text with `[agent]` and `[[service]]` tables
//!   ([`ConfigBuilder`], [`ServiceBuilder`]);
//! * [`webapp`]: the Flask backend of the paper bench and the dashboard test;
//! * [`qos`]: the paper bench's measurements from tshark's and httperf's output.
//!
//! Network safety: addresses are only ever added inside namespaces created here, to veth
//! ends created inside them, and only from 198.51.100.0/24, 203.0.113.0/24 and
//! 2001:db8::/32. Nothing here touches the root namespace's links, addresses or routes.
//!
//! This crate does not link the `weir` library (whose build needs the eBPF toolchain):
//! whatever needs the balancer itself (an XDP pass program on the switch port, the agent)
//! is the caller's, which also keeps the demo's `weir` processes and the tests' in-process
//! programs apart.

pub mod cmd;
pub mod config;
pub mod netns;
pub mod qos;
pub mod scaleout;
pub mod topology;
pub mod webapp;

pub use cmd::{ip, ns_exec, run, sysctl, xdp_attached};
pub use config::{Backend, ConfigBuilder, HealthCheck, ServiceBuilder};
pub use netns::{
    Netns, enter_netns, in_netns, remove_namespace, remove_on_signal, spawn_in_netns,
    stop_processes, try_in_netns,
};
pub use scaleout::{
    ROUTER_CLIENT_SIDE_V4, ROUTER_SEGMENT_IF, ROUTER_V4, SCALEOUT_CLIENT_V4, ScaleOut,
    balancer_port, balancer_v4,
};
pub use topology::{
    BACKENDS, CLIENT_ARM_IF, CLIENT_V4, CLIENT_V6, LB_CLIENT_SIDE_V4, LB_CLIENT_SIDE_V6, LB_V4,
    LB_V6, Layout, NAT_CLIENT_V4, NAT_CLIENT_V6, NODE_IF, SWITCH_LB_PORT, Stack, Topology, VIP_V4,
    VIP_V6, backend_v4, backend_v6, namespace_names,
};
