//! Katran's XDP balancer in `bench datapath`, built from a checkout given at run time
//! (`--katran PATH` or `WEIR_KATRAN_SRC`; PATH holds `katran/lib/bpf/balancer.bpf.c`).
//!
//! `bench_wrapper.c` includes Katran's `balancer.bpf.c` unchanged and adds one XDP entry,
//! `katran_bench`: Weir's template restoration (`restore_template` of lb-ebpf), the reset of
//! Katran's per-CPU new-connection rate counter (so that a million SYNs a round do not put
//! it in its flood mode, which skips the LRU insert), then Katran's `balancer_ingress`,
//! inlined (`flatten`). It is compiled here with `clang-19 -O2 -g -target bpf` and Katran's
//! default compile-time switches (none: IPIP encapsulation), loaded with aya, and its maps
//! are filled as Katran's userspace (`KatranLb`) fills them: the VIPs in `vip_map`, the
//! reals in `reals` (ids from 1), each VIP's consistent-hash ring of 65,537 positions in
//! `ch_rings`, the default gateway's MAC in `ctl_array`, and one LRU per CPU in
//! `lru_mapping` (its production setup; `fallback_cache` is never used, which the bench
//! checks on Katran's own counter).
//!
//! `bench packets` loads the wrapper's other entry, `katran_gen`: Weir's packet generator
//! (`weir_bench_gen`, the same settings maps) in front of the same `balancer_ingress`.
#![expect(
    dead_code,
    reason = "bench datapath and bench packets each use a different part of this module"
)]

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Ebpf,
    maps::{Array, ArrayOfMaps, HashMap, MapData, PerCpuArray},
    programs::Xdp,
    util::nr_cpus,
};
use lb_common::{BENCH_TEMPLATE_LEN, BenchTemplate};

/// The entry point of `bench_wrapper.c` for `bench datapath`.
pub const PROGRAM: &str = "katran_bench";
/// Its entry point for `bench packets` (a generator in front of Katran, with live frames).
pub const GEN_PROGRAM: &str = "katran_gen";
/// The wrapper, next to this file.
const WRAPPER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/benches/katran/bench_wrapper.c"
);
/// The wrapper's template map: named as Weir's, so that `bench packets` sets both alike.
const TEMPLATE_MAP: &str = lb_common::map_name::BENCH_TEMPLATE;
/// The compiler; `WEIR_KATRAN_CLANG` overrides it.
const CLANG: &str = "clang-19";

/// Katran's `RING_SIZE` (balancer_consts.h).
const RING_SIZE: u32 = 65_537;
/// Katran's `MAX_VIPS`: its stats map has `MAX_VIPS` per-VIP entries, then its counters.
const MAX_VIPS: u32 = 512;
/// Offsets of Katran's global counters in `stats`, after the per-VIP entries.
const FALLBACK_LRU_CNTR: u32 = 3;
/// Katran's `F_IPV6` real flag.
const F_IPV6: u8 = 1;
/// Size of each CPU's LRU: Weir's connection table in this bench holds 65,536 flows.
pub const LRU_ENTRIES: u32 = 65_536;
/// `sizeof(struct flow_key)` and `sizeof(struct real_pos_lru)` of balancer_structs.h.
const FLOW_KEY_SIZE: u32 = 40;
const REAL_POS_LRU_SIZE: u32 = 16;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

/// The default gateway's MAC (`ctl_array[0]`), which Katran writes as the outer
/// destination.
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

/// The Katran checkout of this run, if any.
pub fn source(arg: Option<String>) -> Option<PathBuf> {
    arg.or_else(|| std::env::var("WEIR_KATRAN_SRC").ok())
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
}

/// Katran's object for this run: built from the checkout given by `--katran PATH` or
/// `WEIR_KATRAN_SRC` (said on stdout), or `None` with a line saying how to get `rows`.
pub fn object_for_run(rows: &str) -> Option<Vec<u8>> {
    let Some(src) = source(crate::support::arg::<String>("--katran")) else {
        println!(
            "Katran's {rows} skipped: give a Katran checkout with `-- --katran PATH` or \
             WEIR_KATRAN_SRC=PATH (PATH holds katran/lib; e.g. `git -C <katran repo> archive \
             HEAD katran/lib | tar -x -C /tmp/katran-src`) and install clang-19"
        );
        return None;
    };
    let bytes = build(&src).expect("building Katran (see katran/mod.rs)");
    println!(
        "Katran: {} (commit {}), built with clang-19 -O2 -g -target bpf, default switches (IPIP)",
        src.display(),
        describe(&src)
    );
    Some(bytes)
}

/// Compiles the wrapper against the checkout at `src` into a temporary directory; returns
/// the object's bytes.
pub fn build(src: &Path) -> Result<Vec<u8>> {
    let balancer = src.join("katran/lib/bpf/balancer.bpf.c");
    ensure!(
        balancer.is_file(),
        "{} not found: --katran wants the root of a Katran checkout (the directory holding katran/lib)",
        balancer.display()
    );
    let dir = std::env::temp_dir().join(format!("weir-katran-{}", std::process::id()));
    // The BPF target defines no `__x86_64__`, so glibc's headers (Katran includes
    // <string.h>) look for the 32-bit stubs, which an amd64 host does not have; an empty
    // one stands in (Katran uses no libc function).
    std::fs::create_dir_all(dir.join("include/gnu")).context("temp dir")?;
    std::fs::write(dir.join("include/gnu/stubs-32.h"), "").context("stubs-32.h")?;
    let object = dir.join("katran_bench.o");
    let clang = std::env::var("WEIR_KATRAN_CLANG").unwrap_or_else(|_| CLANG.to_owned());
    let multiarch = format!("/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wno-unused-value"])
        .args(["-Wno-pointer-sign", "-Wno-compare-distinct-pointer-types"])
        .arg("-I")
        .arg(src)
        .arg("-I")
        .arg(dir.join("include"))
        .arg("-I")
        .arg(&multiarch)
        .arg("-c")
        .arg(WRAPPER)
        .arg("-o")
        .arg(&object)
        .status()
        .with_context(|| {
            format!("running {clang} (install it: apt-get install clang-19, or `WEIR_KATRAN_SRC=... cargo xtask setup`)")
        })?;
    ensure!(status.success(), "{clang} failed to build {WRAPPER}");
    let bytes = std::fs::read(&object).context("reading the Katran object")?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(bytes)
}

/// The commit of the checkout, when it is a git work tree (for the output).
pub fn describe(src: &Path) -> String {
    Command::new("git")
        .arg("-C")
        .arg(src)
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "not a git checkout".to_owned())
}

/// `struct real_definition` of a real at `addr`: the address (an IPv4 one in the first
/// four bytes), the flags (`F_IPV6`), padding.
fn real_definition(addr: IpAddr) -> [u8; 20] {
    let mut d = [0u8; 20];
    match addr {
        IpAddr::V4(a) => d[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => {
            d[..16].copy_from_slice(&a.octets());
            d[16] = F_IPV6;
        }
    }
    d
}

/// A VIP: address, port, protocol, and the ids of its reals.
pub struct Vip {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: u8,
    pub reals: Vec<u32>,
}

impl Vip {
    /// `struct vip_definition`: address, port (network order), protocol, padding.
    fn definition(&self) -> [u8; 20] {
        let mut d = [0u8; 20];
        match self.addr {
            IpAddr::V4(a) => d[..4].copy_from_slice(&a.octets()),
            IpAddr::V6(a) => d[..16].copy_from_slice(&a.octets()),
        }
        d[16..18].copy_from_slice(&self.port.to_be_bytes());
        d[18] = self.proto;
        d
    }
}

/// Katran loaded, its maps filled, its bench entry verified.
pub struct Katran {
    pub ebpf: Ebpf,
    /// The per-CPU LRUs, held open for the bench's life.
    lrus: Vec<MapData>,
}

/// A new LRU hash map of Katran's flow keys (`bpf(BPF_MAP_CREATE)`: aya creates no
/// standalone LRU map).
fn create_lru(cpu: u32) -> Result<MapData> {
    // union bpf_attr's BPF_MAP_CREATE part: map_type, key_size, value_size, max_entries,
    // map_flags, inner_map_fd, numa_node, map_name[16]; the rest zero.
    let mut attr = [0u32; 32];
    attr[0] = BPF_MAP_TYPE_LRU_HASH;
    attr[1] = FLOW_KEY_SIZE;
    attr[2] = REAL_POS_LRU_SIZE;
    attr[3] = LRU_ENTRIES;
    let name = format!("katran_lru{cpu}");
    let mut name_bytes = [0u8; 16];
    name_bytes[..name.len().min(15)].copy_from_slice(&name.as_bytes()[..name.len().min(15)]);
    for (i, chunk) in name_bytes.chunks(4).enumerate() {
        attr[7 + i] = u32::from_ne_bytes(chunk.try_into().expect("4 bytes"));
    }
    // SAFETY: BPF_MAP_CREATE reads `size_of_val(&attr)` bytes of a valid, initialised
    // buffer and returns a new file descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0, // BPF_MAP_CREATE
            attr.as_ptr(),
            size_of_val(&attr),
        )
    };
    if fd < 0 {
        bail!(
            "BPF_MAP_CREATE of an LRU: {}",
            std::io::Error::last_os_error()
        );
    }
    let fd = i32::try_from(fd).context("fd")?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    MapData::from_fd(fd).context("LRU map")
}

impl Katran {
    /// Loads `object` (from [`build`]), verifies `program` ([`PROGRAM`] or [`GEN_PROGRAM`])
    /// and fills the maps.
    pub fn load(object: &[u8], program: &str, reals: &[IpAddr], vips: &[Vip]) -> Result<Self> {
        let mut ebpf = aya::EbpfLoader::new()
            .load(object)
            .context("loading Katran's object")?;
        let program: &mut Xdp = ebpf
            .program_mut(program)
            .with_context(|| format!("no {program} in the object"))?
            .try_into()
            .with_context(|| format!("{program} is not XDP"))?;
        program.load().context("Katran: verifier")?;

        let mut real_map: Array<_, [u8; 20]> =
            Array::try_from(ebpf.map_mut("reals").context("reals")?)?;
        for (i, r) in reals.iter().enumerate() {
            real_map.set(i as u32 + 1, real_definition(*r), 0)?;
        }
        let mut vip_map: HashMap<_, [u8; 20], [u32; 2]> =
            HashMap::try_from(ebpf.map_mut("vip_map").context("vip_map")?)?;
        for (num, v) in vips.iter().enumerate() {
            // vip_meta: flags (none: Katran's default VIP), vip_num.
            vip_map.insert(v.definition(), [0, num as u32], 0)?;
        }
        // The ring: any valid one; the reals in turn (one array lookup whatever the ring).
        let mut rings: Array<_, u32> =
            Array::try_from(ebpf.map_mut("ch_rings").context("ch_rings")?)?;
        for (num, v) in vips.iter().enumerate() {
            for pos in 0..RING_SIZE {
                let real = v.reals[pos as usize % v.reals.len()];
                rings.set(RING_SIZE * num as u32 + pos, real, 0)?;
            }
        }
        let mut ctl: Array<_, [u8; 8]> =
            Array::try_from(ebpf.map_mut("ctl_array").context("ctl_array")?)?;
        let mut mac = [0u8; 8];
        mac[..6].copy_from_slice(&GATEWAY_MAC);
        ctl.set(0, mac, 0)?;

        let cpus = nr_cpus().map_err(|(p, e)| anyhow::anyhow!("{p}: {e}"))? as u32;
        let mut lrus = Vec::new();
        let mut mapping: ArrayOfMaps<_, MapData> =
            ArrayOfMaps::try_from(ebpf.map_mut("lru_mapping").context("lru_mapping")?)?;
        for cpu in 0..cpus {
            let lru = create_lru(cpu)?;
            mapping.set(cpu, &lru, 0).context("lru_mapping")?;
            lrus.push(lru);
        }
        Ok(Self { ebpf, lrus })
    }

    /// The loaded object, and the per-CPU LRUs to keep open as long as it runs.
    pub fn into_parts(self) -> (Ebpf, Vec<MapData>) {
        (self.ebpf, self.lrus)
    }

    /// The frame each run starts from.
    pub fn set_template(&mut self, input: &[u8]) -> Result<()> {
        let mut t = BenchTemplate {
            len: input.len() as u32,
            data: [0; BENCH_TEMPLATE_LEN],
        };
        let head = input.len().min(BENCH_TEMPLATE_LEN);
        t.data[..head].copy_from_slice(&input[..head]);
        let mut template: Array<_, BenchTemplate> =
            Array::try_from(self.ebpf.map_mut(TEMPLATE_MAP).context(TEMPLATE_MAP)?)?;
        template.set(0, t, 0)?;
        Ok(())
    }

    /// Runs that fell back to `fallback_cache` (no per-CPU LRU), over all CPUs.
    pub fn fallback_lru_runs(&self) -> Result<u64> {
        let stats: PerCpuArray<_, [u64; 2]> =
            PerCpuArray::try_from(self.ebpf.map("stats").context("stats")?)?;
        let v = stats.get(&(MAX_VIPS + FALLBACK_LRU_CNTR), 0)?;
        Ok(v.iter().map(|s| s[0]).sum())
    }
}

/// Checks one output of Katran for `input`: the gateway's MAC as the outer destination, an
/// outer IPv4 (protocol 4) or IPv6 (next header 41 for an IPv6 packet, 4 for IPv4) header to
/// one of `reals`, and the inner packet (the input without its Ethernet header) untouched.
pub fn check_encap(input: &[u8], output: &[u8], reals: &[IpAddr]) -> Result<IpAddr> {
    ensure!(output.len() > 14, "output too short");
    ensure!(
        output[..6] == GATEWAY_MAC,
        "outer destination MAC {:02x?}, not the gateway's",
        &output[..6]
    );
    let ethertype = u16::from_be_bytes([output[12], output[13]]);
    let inner_v6 = u16::from_be_bytes([input[12], input[13]]) == 0x86dd;
    let (outer_len, dst, proto) = match ethertype {
        0x0800 => {
            ensure!(output.len() >= 34, "no outer IPv4 header");
            let dst = Ipv4Addr::from(<[u8; 4]>::try_from(&output[30..34])?);
            (20, IpAddr::V4(dst), output[23])
        }
        0x86dd => {
            ensure!(output.len() >= 54, "no outer IPv6 header");
            let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&output[38..54])?);
            (40, IpAddr::V6(dst), output[20])
        }
        other => bail!("outer ethertype {other:#06x}"),
    };
    let want_proto = if inner_v6 { 41 } else { 4 };
    ensure!(
        proto == want_proto,
        "outer protocol {proto}, want {want_proto}"
    );
    ensure!(
        reals.contains(&dst),
        "outer destination {dst} is not a real"
    );
    ensure!(
        output[14 + outer_len..] == input[14..],
        "inner packet changed"
    );
    Ok(dst)
}
