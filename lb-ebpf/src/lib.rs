//! Exists so `lb-userspace` can name this crate as a build dependency: cargo then rebuilds
//! the agent when the datapath's dependencies change. The programs are the binary
//! target: `main.rs` and its modules.
#![no_std]
