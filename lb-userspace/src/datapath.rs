//! The eBPF object, its loading and attachment, and the map layer.
//!
//! The agent's logic talks to the maps through [`MapWriter`] (Katran's approach), so it can
//! be tested without a kernel; [`KernelMaps`] is the real implementation.

use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader, include_bytes_aligned,
    maps::{Array, DevMapHash, HashMap, MapData, MapError, PerCpuArray},
    programs::{ProgramError, Xdp, XdpMode, xdp::XdpLinkId},
};
use lb_common::{
    BackendInfo, FlowKey, FlowValue, GlobalConfig, MAX_RING_SIZE, TrafficCounters, VipInfo, VipKey,
    map_name, prog_name, stat,
};

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
    #[error(
        "attaching XDP to {interface} in {mode} mode failed: {source} (try xdp_mode = \"generic\" if the driver lacks native XDP)"
    )]
    Attach {
        interface: String,
        mode: &'static str,
        #[source]
        source: ProgramError,
    },
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// The ifindex of an interface in the calling thread's network namespace.
pub fn ifindex(interface: &str) -> Result<u32, DatapathError> {
    let name =
        CString::new(interface).map_err(|_| DatapathError::NoSuchInterface(interface.into()))?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(DatapathError::NoSuchInterface(interface.into()));
    }
    Ok(index)
}

/// The maps the agent pins under `[agent] bpffs` and a restarted agent adopts. Not the
/// benchmark template or the decap program's VIP set.
pub const PINNED_MAPS: [&str; 13] = [
    map_name::VIPS,
    map_name::VIP_ADDRS,
    map_name::BACKENDS,
    map_name::RING,
    map_name::CONNTRACK,
    map_name::STATS,
    map_name::VIP_STATS,
    map_name::BACKEND_STATS,
    map_name::TX_PORTS,
    map_name::GLOBAL,
    map_name::NEXT_HOPS,
    map_name::BACKEND_CONNS,
    map_name::RR_COUNTERS,
];

/// Name of the pinned XDP link in the bpffs directory.
pub const LINK_PIN: &str = "link";

/// Loads the object with the balancer's maps pinned in `bpffs`: maps already pinned there
/// (by an earlier agent) are reused with their contents, missing ones are created and
/// pinned. A reused connection table keeps its size until `weir teardown`.
pub fn load_object_pinned(conntrack_entries: u32, bpffs: &Path) -> Result<Ebpf, DatapathError> {
    let mut loader = EbpfLoader::new();
    loader.map_max_entries(map_name::CONNTRACK, conntrack_entries.max(1));
    let paths: Vec<(&'static str, PathBuf)> = PINNED_MAPS
        .iter()
        .map(|name| (*name, bpffs.join(name)))
        .collect();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    Ok(loader.load(EBPF_OBJECT)?)
}

/// Loads the object. `conntrack_entries` sizes the connection table; `small` shrinks the
/// balancer-only maps to one entry for processes that only run the decap or pass program
/// (the ring alone preallocates 16 MiB).
pub fn load_object(conntrack_entries: u32, small: bool) -> Result<Ebpf, DatapathError> {
    let mut loader = EbpfLoader::new();
    loader.map_max_entries(map_name::CONNTRACK, conntrack_entries.max(1));
    if small {
        loader.map_max_entries(map_name::RING, 1);
        loader.map_max_entries(map_name::CONNTRACK, 1);
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

/// The writes the agent makes to the datapath. Values are always written whole, so the
/// datapath never sees a half-updated entry.
pub trait MapWriter {
    fn set_global(&mut self, global: GlobalConfig) -> Result<(), DatapathError>;
    fn set_vip(&mut self, key: VipKey, info: VipInfo) -> Result<(), DatapathError>;
    fn remove_vip(&mut self, key: VipKey) -> Result<(), DatapathError>;
    fn set_vip_addr(&mut self, key: VipKey) -> Result<(), DatapathError>;
    fn remove_vip_addr(&mut self, key: VipKey) -> Result<(), DatapathError>;
    fn set_backend(&mut self, id: u32, info: BackendInfo) -> Result<(), DatapathError>;
    /// Writes one ring slot of a service.
    fn set_ring_slot(
        &mut self,
        service_id: u32,
        slot: u32,
        backend_id: u32,
    ) -> Result<(), DatapathError>;
    /// Registers an interface as a redirect target.
    fn set_tx_port(&mut self, ifindex: u32) -> Result<(), DatapathError>;
    /// Overwrites a backend's active-connection count (reconciliation, or 0 when an id is
    /// given to a new backend).
    fn set_active_connections(&mut self, backend_id: u32, count: i64) -> Result<(), DatapathError>;
}

/// Read access to the datapath's counters.
pub trait StatsReader {
    /// Global counters summed over CPUs, indexed by `lb_common::stat`.
    fn global(&self) -> Result<[u64; stat::COUNT as usize], DatapathError>;
    fn service(&self, service_id: u32) -> Result<TrafficCounters, DatapathError>;
    fn backend(&self, backend_id: u32) -> Result<TrafficCounters, DatapathError>;
}

/// The real maps of a loaded object.
pub struct KernelMaps {
    vips: HashMap<MapData, VipKey, VipInfo>,
    vip_addrs: HashMap<MapData, VipKey, u32>,
    backends: Array<MapData, BackendInfo>,
    ring: Array<MapData, u32>,
    global: Array<MapData, GlobalConfig>,
    tx_ports: DevMapHash<MapData>,
    stats: PerCpuArray<MapData, [u64; stat::COUNT as usize]>,
    vip_stats: PerCpuArray<MapData, TrafficCounters>,
    backend_stats: PerCpuArray<MapData, TrafficCounters>,
    /// An LRU hash in the kernel; aya reads it through its `HashMap` type.
    conntrack: HashMap<MapData, FlowKey, FlowValue>,
    backend_conns: Array<MapData, i64>,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
    T::try_from(map).map_err(map_err(name))
}

impl KernelMaps {
    /// Takes the balancer's maps out of a loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        Ok(Self {
            vips: take(ebpf, map_name::VIPS)?,
            vip_addrs: take(ebpf, map_name::VIP_ADDRS)?,
            backends: take(ebpf, map_name::BACKENDS)?,
            ring: take(ebpf, map_name::RING)?,
            global: take(ebpf, map_name::GLOBAL)?,
            tx_ports: take(ebpf, map_name::TX_PORTS)?,
            stats: take(ebpf, map_name::STATS)?,
            vip_stats: take(ebpf, map_name::VIP_STATS)?,
            backend_stats: take(ebpf, map_name::BACKEND_STATS)?,
            conntrack: take(ebpf, map_name::CONNTRACK)?,
            backend_conns: take(ebpf, map_name::BACKEND_CONNS)?,
        })
    }

    /// Number of entries in the connection table (walks it: for tests and the CLI, not for
    /// a hot loop).
    #[must_use]
    pub fn conntrack_len(&self) -> usize {
        self.conntrack.keys().filter(Result::is_ok).count()
    }

    /// A backend's active connections as the datapath counts them.
    #[must_use]
    pub fn active_connections(&self, backend_id: u32) -> i64 {
        self.backend_conns.get(&backend_id, 0).unwrap_or(0)
    }

    /// Every connection-table entry (a walk of the table: seconds for a million entries;
    /// the agent does it in the background every few seconds).
    #[must_use]
    pub fn conntrack_entries(&self) -> Vec<(FlowKey, FlowValue)> {
        self.conntrack.iter().filter_map(Result::ok).collect()
    }

    /// Every VIP entry (for adopting a pinned datapath).
    pub fn read_vips(&self) -> Result<Vec<(VipKey, VipInfo)>, DatapathError> {
        self.vips
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(map_name::VIPS))
    }

    /// Every backend entry ever written (generation above 0), by id.
    pub fn read_backends(&self) -> Result<Vec<(u32, BackendInfo)>, DatapathError> {
        let mut out = Vec::new();
        for id in 0..lb_common::MAX_BACKENDS {
            let info = self
                .backends
                .get(&id, 0)
                .map_err(map_err(map_name::BACKENDS))?;
            if info.generation > 0 {
                out.push((id, info));
            }
        }
        Ok(out)
    }

    /// A service's ring as the datapath holds it.
    pub fn read_ring(&self, service_id: u32, ring_size: u32) -> Result<Vec<u32>, DatapathError> {
        let base = service_id * MAX_RING_SIZE;
        (0..ring_size.min(MAX_RING_SIZE))
            .map(|slot| {
                self.ring
                    .get(&(base + slot), 0)
                    .map_err(map_err(map_name::RING))
            })
            .collect()
    }

    /// The connection-table entry of a flow, if any.
    pub fn conntrack_get(&self, key: &FlowKey) -> Result<Option<FlowValue>, DatapathError> {
        match self.conntrack.get(key, 0) {
            Ok(value) => Ok(Some(value)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(DatapathError::Map {
                name: map_name::CONNTRACK,
                source,
            }),
        }
    }
}

impl MapWriter for KernelMaps {
    fn set_global(&mut self, global: GlobalConfig) -> Result<(), DatapathError> {
        self.global
            .set(0, global, 0)
            .map_err(map_err(map_name::GLOBAL))
    }

    fn set_vip(&mut self, key: VipKey, info: VipInfo) -> Result<(), DatapathError> {
        self.vips
            .insert(key, info, 0)
            .map_err(map_err(map_name::VIPS))
    }

    fn remove_vip(&mut self, key: VipKey) -> Result<(), DatapathError> {
        match self.vips.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(DatapathError::Map {
                name: map_name::VIPS,
                source,
            }),
        }
    }

    fn set_vip_addr(&mut self, key: VipKey) -> Result<(), DatapathError> {
        self.vip_addrs
            .insert(key, 1, 0)
            .map_err(map_err(map_name::VIP_ADDRS))
    }

    fn remove_vip_addr(&mut self, key: VipKey) -> Result<(), DatapathError> {
        match self.vip_addrs.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(DatapathError::Map {
                name: map_name::VIP_ADDRS,
                source,
            }),
        }
    }

    fn set_backend(&mut self, id: u32, info: BackendInfo) -> Result<(), DatapathError> {
        self.backends
            .set(id, info, 0)
            .map_err(map_err(map_name::BACKENDS))
    }

    fn set_ring_slot(
        &mut self,
        service_id: u32,
        slot: u32,
        backend_id: u32,
    ) -> Result<(), DatapathError> {
        self.ring
            .set(service_id * MAX_RING_SIZE + slot, backend_id, 0)
            .map_err(map_err(map_name::RING))
    }

    fn set_active_connections(&mut self, backend_id: u32, count: i64) -> Result<(), DatapathError> {
        self.backend_conns
            .set(backend_id, count, 0)
            .map_err(map_err(map_name::BACKEND_CONNS))
    }

    fn set_tx_port(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        self.tx_ports
            .insert(ifindex, ifindex, None, 0)
            .map_err(|source| DatapathError::DevMap {
                name: map_name::TX_PORTS,
                source,
            })
    }
}

impl StatsReader for KernelMaps {
    fn global(&self) -> Result<[u64; stat::COUNT as usize], DatapathError> {
        let per_cpu = self.stats.get(&0, 0).map_err(map_err(map_name::STATS))?;
        let mut sum = [0u64; stat::COUNT as usize];
        for cpu in per_cpu.iter() {
            for (total, value) in sum.iter_mut().zip(cpu.iter()) {
                *total = total.wrapping_add(*value);
            }
        }
        Ok(sum)
    }

    fn service(&self, service_id: u32) -> Result<TrafficCounters, DatapathError> {
        let per_cpu = self
            .vip_stats
            .get(&service_id, 0)
            .map_err(map_err(map_name::VIP_STATS))?;
        Ok(per_cpu
            .iter()
            .fold(TrafficCounters::default(), |a, b| a.add(*b)))
    }

    fn backend(&self, backend_id: u32) -> Result<TrafficCounters, DatapathError> {
        let per_cpu = self
            .backend_stats
            .get(&backend_id, 0)
            .map_err(map_err(map_name::BACKEND_STATS))?;
        Ok(per_cpu
            .iter()
            .fold(TrafficCounters::default(), |a, b| a.add(*b)))
    }
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

/// The interface a pinned XDP link is attached to: `Some(ifindex)`, or `None` when the link
/// is defunct (its interface is gone). Asks the kernel with `BPF_OBJ_GET` and
/// `BPF_OBJ_GET_INFO_BY_FD`, which aya's `LinkInfo` does not expose for XDP.
pub fn pinned_xdp_link_ifindex(path: &Path) -> std::io::Result<Option<u32>> {
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // `union bpf_attr` for BPF_OBJ_GET: pathname, bpf_fd, file_flags, path_fd.
    let mut get = [0u64; 3];
    get[0] = c_path.as_ptr() as u64;
    // SAFETY: `get` is a valid bpf_attr prefix of the size passed; the kernel only reads
    // the path string, which outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            get.as_mut_ptr(),
            size_of_val(&get) as u32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new file descriptor that we now own.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    // `struct bpf_link_info`: type, id, prog_id, then (8-byte aligned) the per-type union,
    // whose XDP member starts with the ifindex. 64 bytes cover it.
    let mut info = [0u32; 16];
    // `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD: bpf_fd, info_len, info pointer.
    let mut attr = [0u64; 2];
    attr[0] = u64::from(std::os::fd::AsRawFd::as_raw_fd(&fd) as u32)
        | (u64::from(size_of_val(&info) as u32) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    // SAFETY: `attr` points at `info`, a writable buffer of the length it states.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            attr.as_mut_ptr(),
            size_of_val(&attr) as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let ifindex = info[4];
    Ok((ifindex != 0).then_some(ifindex))
}
