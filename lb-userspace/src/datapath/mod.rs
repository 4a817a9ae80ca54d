//! The datapath as the agent sees it: the eBPF object, its loading and attachment
//! ([`pin`]: pinning, adoption, the single-agent lock, teardown), the map layer behind a
//! trait ([`maps`], with the [`recorder`] for tests) and what `bpf_fib_lookup` needs from the
//! kernel ([`nexthop`]).

pub mod maps;
pub mod nexthop;
pub mod pin;
pub mod ports;
pub mod recorder;

pub use maps::{KernelMaps, MapWriter, StatsReader};
pub use pin::{LINK_PIN, PINNED_MAPS, link_pin, link_pins, teardown};

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader, include_bytes_aligned,
    maps::MapError,
    programs::{ProgramError, Xdp, XdpMode, xdp::XdpLinkId},
};
use lb_common::{map_name, prog_name};

use crate::config::XdpMode as ConfigXdpMode;

/// The eBPF object built by `build.rs` (aya-build) from `lb-ebpf`.
pub static EBPF_OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Errors of the datapath layer.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("devmap {name}: {source}")]
    DevMap {
        name: &'static str,
        #[source]
        source: aya::maps::xdp::XdpMapError,
    },
    #[error("interface {0:?} does not exist in this network namespace")]
    NoSuchInterface(String),
    #[error("attaching XDP to {interface} in {mode} mode failed: {source}{}", attach_hint(.source))]
    Attach {
        interface: String,
        mode: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF map {name} has no room for slot {slot} of service {service_id}")]
    SlotOutOfRange {
        name: &'static str,
        service_id: u32,
        slot: u32,
    },
}

/// What to do about a failed attach, told by the kernel's answer rather than guessed.
fn attach_hint(source: &ProgramError) -> &'static str {
    let errno = match source {
        ProgramError::SyscallError(e) => e.io_error.raw_os_error(),
        _ => None,
    };
    match errno {
        Some(libc::EBUSY | libc::EEXIST) => {
            " (another XDP program is attached to the interface: another weir agent with \
             another bpffs, or another tool; find it with `ip link show` and detach it, e.g. \
             `weir teardown --bpffs DIR` or `ip link set dev IF xdp off`)"
        }
        Some(libc::EOPNOTSUPP | libc::EINVAL) => {
            " (try xdp_mode = \"generic\" if the driver lacks native XDP)"
        }
        _ => "",
    }
}

pub(crate) fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// The ifindex of an interface in the calling thread's network namespace.
pub fn ifindex(interface: &str) -> Result<u32, DatapathError> {
    crate::sys::ifindex(interface).ok_or_else(|| DatapathError::NoSuchInterface(interface.into()))
}

/// Loads the object with the balancer's maps pinned in `bpffs`: maps already pinned there
/// (by an earlier agent) are reused with their contents, missing ones are created and
/// pinned. `nat_connections` sizes `NAT_CT` (two entries per connection). A reused
/// connection table or NAT table keeps its size until `weir teardown`.
pub fn load_object_pinned(
    conntrack_entries: u32,
    half_open_entries: u32,
    nat_connections: u32,
    bpffs: &Path,
) -> Result<Ebpf, DatapathError> {
    let mut loader = EbpfLoader::new();
    loader.map_max_entries(map_name::CONNTRACK, conntrack_entries.max(1));
    loader.map_max_entries(map_name::HALF_OPEN, half_open_entries.max(1));
    loader.map_max_entries(map_name::NAT_CT, nat_table_entries(nat_connections));
    let paths: Vec<(&'static str, PathBuf)> = PINNED_MAPS
        .iter()
        .map(|name| (*name, bpffs.join(name)))
        .collect();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    Ok(loader.load(EBPF_OBJECT)?)
}

/// `NAT_CT`'s `max_entries` for a number of NAT connections: both keys of every pair.
#[must_use]
pub fn nat_table_entries(nat_connections: u32) -> u32 {
    nat_connections.max(1).saturating_mul(2)
}

/// Loads the object. `conntrack_entries` sizes the connection table, and the half-open
/// table by default (`NAT_CT` keeps the
/// object's size, `lb_common::nat::DEFAULT_NAT_CONNECTIONS` pairs); `small` shrinks the
/// balancer-only maps to one entry for processes that only run the decap or pass program
/// (the ring alone preallocates 16 MiB).
pub fn load_object(conntrack_entries: u32, small: bool) -> Result<Ebpf, DatapathError> {
    let mut loader = EbpfLoader::new();
    loader.map_max_entries(map_name::CONNTRACK, conntrack_entries.max(1));
    loader.map_max_entries(
        map_name::HALF_OPEN,
        lb_common::default_half_open_entries(conntrack_entries),
    );
    if small {
        loader.map_max_entries(map_name::RING, 1);
        loader.map_max_entries(map_name::CONNTRACK, 1);
        loader.map_max_entries(map_name::HALF_OPEN, 1);
    }
    Ok(loader.load(EBPF_OBJECT)?)
}

/// Loads (verifies) one XDP program of the object and returns it.
pub fn load_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut Xdp, DatapathError> {
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })?;
    program
        .load()
        .map_err(|source| DatapathError::Program { name, source })?;
    Ok(program)
}

/// How a program ended up attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachedMode {
    Native,
    Generic,
}

impl AttachedMode {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Generic => "generic",
        }
    }
}

/// Attaches `program` to `interface` in the requested mode; `auto` tries native first and
/// falls back to generic (the driver may lack native XDP).
pub fn attach(
    program: &mut Xdp,
    interface: &str,
    mode: ConfigXdpMode,
) -> Result<(XdpLinkId, AttachedMode), DatapathError> {
    let index = ifindex(interface)?;
    let try_mode = |program: &mut Xdp, m: AttachedMode| {
        let flags = match m {
            AttachedMode::Native => XdpMode::Driver,
            AttachedMode::Generic => XdpMode::Skb,
        };
        program
            .attach_to_if_index(index, flags)
            .map_err(|source| DatapathError::Attach {
                interface: interface.to_owned(),
                mode: m.as_str(),
                source,
            })
    };
    match mode {
        ConfigXdpMode::Native => Ok((
            try_mode(program, AttachedMode::Native)?,
            AttachedMode::Native,
        )),
        ConfigXdpMode::Generic => Ok((
            try_mode(program, AttachedMode::Generic)?,
            AttachedMode::Generic,
        )),
        ConfigXdpMode::Auto => match try_mode(program, AttachedMode::Native) {
            Ok(link) => Ok((link, AttachedMode::Native)),
            Err(err) => {
                tracing::warn!(interface, error = %err, "native XDP unavailable, falling back to generic");
                Ok((
                    try_mode(program, AttachedMode::Generic)?,
                    AttachedMode::Generic,
                ))
            }
        },
    }
}

/// An attached `weir_pass` program; dropping it detaches. Veth peers need one so that
/// frames sent with `XDP_TX` are received.
pub struct PassProgram {
    _ebpf: Ebpf,
}

/// Attaches `weir_pass` in native mode to `interface` in the calling thread's namespace.
pub fn attach_pass(interface: &str) -> Result<PassProgram, DatapathError> {
    let mut ebpf = load_object(1, true)?;
    let program = load_program(&mut ebpf, prog_name::PASS)?;
    let _link = attach(program, interface, ConfigXdpMode::Native)?;
    // The link lives as long as the program object in `ebpf`.
    Ok(PassProgram { _ebpf: ebpf })
}

/// The kernel's `struct xdp_md` as `BPF_PROG_TEST_RUN` takes it for `ctx_in`: only
/// `ingress_ifindex` (and `rx_queue_index`) may be set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct XdpMd {
    pub data: u32,
    pub data_end: u32,
    pub data_meta: u32,
    pub ingress_ifindex: u32,
    pub rx_queue_index: u32,
    pub egress_ifindex: u32,
}

impl XdpMd {
    /// The bytes of the struct, for `TestRunOptions::ctx_in`.
    #[must_use]
    pub fn as_bytes(&self) -> [u8; 24] {
        let mut out = [0u8; 24];
        for (i, v) in [
            self.data,
            self.data_end,
            self.data_meta,
            self.ingress_ifindex,
            self.rx_queue_index,
            self.egress_ifindex,
        ]
        .into_iter()
        .enumerate()
        {
            out[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
        }
        out
    }
}
