//! Every system call the agent makes outside aya and std, in one place: interfaces,
//! filesystems and mounts, file locks, clocks, the kernel version, and the two `bpf(2)`
//! commands aya does not wrap. Safe wrappers from `nix` where it covers the call; the raw
//! `bpf(2)` calls and two `ioctl(2)`s (an interface's MTU, creating a TUN device) are the
//! only unsafe code here.

use std::{
    ffi::CString,
    fs::File,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::{FileTypeExt as _, MetadataExt as _},
    },
    path::Path,
};

use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
    mount::MsFlags,
    sys::statfs::statfs,
    time::{ClockId, clock_gettime},
};

/// `BPF_FS_MAGIC` from `include/uapi/linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The ifindex of an interface in the calling thread's network namespace.
pub fn ifindex(interface: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(interface)
        .ok()
        .filter(|i| *i != 0)
}

/// Interfaces of this network namespace (name, ifindex).
#[must_use]
pub fn interfaces() -> Vec<(String, u32)> {
    nix::net::if_::if_nameindex()
        .map(|list| {
            list.iter()
                .map(|i| (i.name().to_string_lossy().into_owned(), i.index()))
                .collect()
        })
        .unwrap_or_default()
}

/// The addresses of this network namespace's interfaces, from `getifaddrs(3)`.
#[must_use]
pub fn local_addresses() -> Vec<std::net::IpAddr> {
    let Ok(list) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    list.filter_map(|entry| {
        let address = entry.address?;
        if let Some(v4) = address.as_sockaddr_in() {
            Some(std::net::IpAddr::V4(v4.ip()))
        } else {
            address
                .as_sockaddr_in6()
                .map(|v6| std::net::IpAddr::V6(v6.ip()))
        }
    })
    .collect()
}

/// Whether `path` lies on a bpf filesystem.
#[must_use]
pub fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|st| st.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Mounts a new bpffs instance at `target`.
pub fn mount_bpffs(target: &Path) -> io::Result<()> {
    nix::mount::mount(
        Some("bpf"),
        target,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(io::Error::from)
}

/// Whether this process is alone in its mount namespace (as under `ip netns exec`, which
/// gives every command a private one): a filesystem it mounts there goes away when it exits.
/// Processes whose namespace cannot be read (another user's, in a sandbox) are taken to be
/// elsewhere.
#[must_use]
pub fn alone_in_mount_namespace() -> bool {
    let Ok(ours) = std::fs::metadata("/proc/self/ns/mnt") else {
        return false;
    };
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    !entries.filter_map(Result::ok).any(|entry| {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            return false;
        };
        pid != me
            && std::fs::metadata(entry.path().join("ns/mnt"))
                .is_ok_and(|m| (m.dev(), m.ino()) == (ours.dev(), ours.ino()))
    })
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: the clock of `bpf_ktime_get_coarse_ns`, which
/// stamps the connection table's entries.
#[must_use]
pub fn monotonic_coarse_ns() -> u64 {
    clock_gettime(ClockId::CLOCK_MONOTONIC_COARSE).map_or(0, |t| {
        (t.tv_sec() as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(t.tv_nsec() as u64)
    })
}

/// The running kernel's release as (major, minor), e.g. (6, 18) for `6.18.0-1-amd64`.
#[must_use]
pub fn kernel_version() -> Option<(u32, u32)> {
    let uts = nix::sys::utsname::uname().ok()?;
    parse_kernel_release(&uts.release().to_string_lossy())
}

/// `6.18.0-1-amd64` -> (6, 18).
#[must_use]
pub fn parse_kernel_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// An exclusive `flock(2)` on a directory, released when dropped or when the process dies
/// (even by SIGKILL), so a stale lock cannot outlive its holder.
#[derive(Debug)]
pub struct DirLock {
    _lock: Flock<File>,
}

/// Why a [`DirLock`] could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it; its pid if `/proc/locks` tells.
    #[error("held by another process")]
    Held { pid: Option<u32> },
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl DirLock {
    /// Takes the lock on `dir` without waiting. A bpffs holds only pins, so the lock is on
    /// the directory itself rather than on a lock file inside it.
    pub fn try_lock(dir: &Path) -> Result<Self, LockError> {
        let file = File::open(dir)?;
        let inode = file.metadata()?.ino();
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Self { _lock: lock }),
            Err((_, Errno::EWOULDBLOCK)) => Err(LockError::Held {
                pid: flock_holder(inode),
            }),
            Err((_, errno)) => Err(LockError::Io(errno.into())),
        }
    }
}

/// The pid holding a `flock` on the file with this inode, from `/proc/locks`
/// (`1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF`).
fn flock_holder(inode: u64) -> Option<u32> {
    let text = std::fs::read_to_string("/proc/locks").ok()?;
    parse_proc_locks(&text, inode)
}

fn parse_proc_locks(text: &str, inode: u64) -> Option<u32> {
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Blocked waiters are listed as `1: -> FLOCK ...`; only the holder counts.
        if fields.get(1) != Some(&"FLOCK") {
            return None;
        }
        let pid = fields.get(4)?.parse().ok()?;
        let ino: u64 = fields.get(5)?.rsplit(':').next()?.parse().ok()?;
        (ino == inode).then_some(pid)
    })
}

/// What is at a path the agent wants to bind a Unix socket on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketPath {
    /// Nothing: free to bind.
    Free,
    /// A socket nobody answers on (left by an agent that died): safe to remove.
    Stale,
    /// A socket a live process answers on.
    Live,
    /// Something that is not a socket (a file, a directory...): never to be touched.
    NotASocket,
}

/// Looks at `path` before binding a Unix socket there.
pub fn socket_path_state(path: &Path) -> io::Result<SocketPath> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(SocketPath::Free),
        Err(err) => return Err(err),
    };
    if !meta.file_type().is_socket() {
        return Ok(SocketPath::NotASocket);
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Ok(SocketPath::Live),
        Err(err) if err.raw_os_error() == Some(libc::ECONNREFUSED) => Ok(SocketPath::Stale),
        Err(err) => Err(err),
    }
}

/// (device, inode) of a path, to recognise later whether it is still the same file.
#[must_use]
pub fn file_identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// The interface a pinned XDP link is attached to: `Some(ifindex)`, or `None` when the link
/// is defunct (its interface is gone). Asks the kernel with `BPF_OBJ_GET` and
/// `BPF_OBJ_GET_INFO_BY_FD`, which aya's `LinkInfo` does not expose for XDP.
pub fn pinned_xdp_link_ifindex(path: &Path) -> io::Result<Option<u32>> {
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
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
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // `struct bpf_link_info`: type, id, prog_id, then (8-byte aligned) the per-type union,
    // whose XDP member starts with the ifindex. 64 bytes cover it.
    let mut info = [0u32; 16];
    // `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD: bpf_fd, info_len, info pointer.
    let mut attr = [0u64; 2];
    attr[0] = u64::from(fd.as_raw_fd() as u32) | (u64::from(size_of_val(&info) as u32) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    // SAFETY: `attr` points at `info`, a writable buffer of the length it states, which
    // outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            attr.as_mut_ptr(),
            size_of_val(&attr) as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let ifindex = info[4];
    Ok((ifindex != 0).then_some(ifindex))
}

/// `union bpf_attr` for the `BPF_MAP_*_BATCH` commands (`include/uapi/linux/bpf.h`).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Deletes `keys` from the map behind `map` with `BPF_MAP_DELETE_BATCH` (Linux 5.6), a
/// chunk a syscall. A key already gone is not an error: the datapath deletes entries too.
/// Returns how many were deleted.
///
/// # Safety
///
/// `K` must have exactly the map's key size: the kernel reads `count × key_size` bytes.
pub unsafe fn map_delete_batch<K: Copy>(
    map: std::os::fd::BorrowedFd<'_>,
    keys: &[K],
) -> io::Result<usize> {
    const CHUNK: usize = 4096;
    let mut deleted = 0;
    let mut rest = keys;
    while !rest.is_empty() {
        let n = rest.len().min(CHUNK);
        let mut attr = BatchAttr {
            keys: rest.as_ptr() as u64,
            count: n as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` describes `n` live keys of the map's key size (the caller's
        // contract), which the kernel only reads.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_DELETE_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>() as u32,
            )
        };
        // The kernel stops at the first key it cannot delete (ENOENT: gone meanwhile) and
        // says how many it did: skip that one and go on.
        let done = (attr.count as usize).min(n);
        deleted += done;
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ENOENT) {
                return Err(err);
            }
            rest = &rest[(done + 1).min(rest.len())..];
        } else {
            rest = &rest[n..];
        }
    }
    Ok(deleted)
}

/// Writes `keys[i] -> values[i]` into the map behind `map` with one `BPF_MAP_UPDATE_BATCH`
/// (Linux 5.6) per chunk, instead of a syscall per element.
///
/// # Safety
///
/// `K` and `V` must have exactly the map's key and value sizes: the kernel reads
/// `count × key_size` and `count × value_size` bytes from the slices.
pub unsafe fn map_update_batch<K: Copy, V: Copy>(
    map: std::os::fd::BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> io::Result<()> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    // The kernel copies the whole batch in: bounded chunks keep that memory small.
    const CHUNK: usize = 8192;
    for (keys, values) in keys.chunks(CHUNK).zip(values.chunks(CHUNK)) {
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: keys.len() as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` describes `keys` and `values`, live slices of `count` elements of
        // the map's key and value sizes (the caller's contract), which the kernel only reads.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        if attr.count as usize != keys.len() {
            return Err(io::Error::other(format!(
                "batch update wrote {} of {} elements",
                attr.count,
                keys.len()
            )));
        }
    }
    Ok(())
}

/// Reads every entry of a hash map with `BPF_MAP_LOOKUP_BATCH` (Linux 5.6), `chunk` entries
/// a syscall, calling `each` per entry. Entries may come and go during the walk (the kernel
/// walks bucket by bucket); each one present throughout is seen once.
///
/// # Safety
///
/// `K` and `V` must have exactly the map's key and value sizes: the kernel writes
/// `count × key_size` and `count × value_size` bytes into buffers sized by them.
pub unsafe fn map_lookup_batch<K: Copy + Default, V: Copy + Default>(
    map: std::os::fd::BorrowedFd<'_>,
    chunk: usize,
    mut each: impl FnMut(&K, &V),
) -> io::Result<usize> {
    let mut keys = vec![K::default(); chunk];
    let mut values = vec![V::default(); chunk];
    // The batch token of a hash map is a u32 bucket index; 8 bytes leave room.
    let mut token_in = 0u64;
    let mut token_out = 0u64;
    let mut first = true;
    let mut seen = 0;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                (&raw const token_in) as u64
            },
            out_batch: (&raw mut token_out) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at `keys` and `values`, writable buffers of `count`
        // elements of the map's key and value sizes (the caller's contract), and at the two
        // batch tokens; all outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>() as u32,
            )
        };
        let done = if rc < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ENOENT) {
                return Err(err);
            }
            // ENOENT: the walk is over; `count` entries were still filled in.
            true
        } else {
            false
        };
        let filled = (attr.count as usize).min(chunk);
        for (key, value) in keys.iter().zip(&values).take(filled) {
            each(key, value);
        }
        seen += filled;
        if done {
            return Ok(seen);
        }
        token_in = token_out;
        first = false;
    }
}

/// The MTU of an interface in the calling thread's network namespace (`SIOCGIFMTU`; not
/// `/sys/class/net`, which shows the namespace sysfs was mounted in, not the caller's).
pub fn mtu(interface: &str) -> io::Result<u32> {
    // SAFETY: `ifreq` is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = interface.as_bytes();
    if name.is_empty() || name.len() >= req.ifr_name.len() || name.contains(&0) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    // SAFETY: `SIOCGIFMTU` reads the NUL-terminated name and writes `ifru_mtu` of the
    // `ifreq` it is given, which lives across the call; the socket is open.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFMTU, &raw mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled the `ifru_mtu` member of the union.
    let mtu = unsafe { req.ifr_ifru.ifru_mtu };
    u32::try_from(mtu).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

/// `TUNSETIFF` (`_IOW('T', 202, int)` in `include/uapi/linux/if_tun.h`).
const TUNSETIFF: libc::Ioctl = 0x4004_54ca;

/// Creates TUN device `name` in the calling thread's network namespace (`IFF_TUN |
/// IFF_NO_PI`, not persistent: the kernel deletes it, and every route on it, when the
/// returned file is closed, including when the process dies). Fails with `EBUSY` while
/// another process holds a device of that name, `EINVAL` when a device of another kind
/// has it, `EPERM` without `CAP_NET_ADMIN`.
pub fn create_tun(name: &str) -> io::Result<File> {
    // SAFETY: `ifreq` is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= req.ifr_name.len() || bytes.contains(&0) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: `TUNSETIFF` reads the NUL-terminated name and `ifru_flags` of the `ifreq` it
    // is given (and may write the name back), which lives across the call; the fd is an
    // open /dev/net/tun (std opens it with O_CLOEXEC, so no child inherits the device).
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &raw mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tun_name_the_kernel_cannot_take_is_refused_before_any_call() {
        for name in ["", "a-name-far-too-long", "nul\0name"] {
            let err = create_tun(name).expect_err(name);
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{name:?}");
        }
    }

    #[test]
    fn local_addresses_include_loopback() {
        let addresses = local_addresses();
        assert!(
            addresses.iter().any(std::net::IpAddr::is_loopback),
            "{addresses:?}"
        );
    }

    #[test]
    fn kernel_release_parses() {
        assert_eq!(parse_kernel_release("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(parse_kernel_release("5.11.22"), Some((5, 11)));
        assert_eq!(parse_kernel_release("4.19"), Some((4, 19)));
        assert_eq!(parse_kernel_release("linux"), None);
        assert!(kernel_version().is_some());
    }

    #[test]
    fn proc_locks_names_the_holder_not_a_waiter() {
        let text = "1: FLOCK  ADVISORY  WRITE 4242 00:2a:777 0 EOF\n\
                    1: -> FLOCK  ADVISORY  WRITE 5151 00:2a:777 0 EOF\n\
                    2: POSIX  ADVISORY  WRITE 99 08:01:777 0 EOF\n";
        assert_eq!(parse_proc_locks(text, 777), Some(4242));
        assert_eq!(parse_proc_locks(text, 778), None);
    }

    #[test]
    fn a_directory_lock_is_exclusive_and_names_its_holder() {
        let dir = std::env::temp_dir().join(format!("weir-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = DirLock::try_lock(&dir).unwrap();
        match DirLock::try_lock(&dir) {
            Err(LockError::Held { pid }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("second lock: {other:?}"),
        }
        drop(first);
        let again = DirLock::try_lock(&dir).unwrap();
        drop(again);
        std::fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn loopback_has_an_mtu() {
        // Every network namespace has `lo`; its MTU is 65536 unless someone changed it.
        assert!(mtu("lo").unwrap() >= 1280);
        assert!(mtu("weir-no-such-if").is_err());
        assert!(mtu("").is_err());
    }

    #[test]
    fn socket_paths_are_told_apart() {
        let dir = std::env::temp_dir().join(format!("weir-sock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("notes.txt");
        std::fs::write(&file, "data").unwrap();
        assert_eq!(socket_path_state(&file).unwrap(), SocketPath::NotASocket);
        assert_eq!(socket_path_state(&dir).unwrap(), SocketPath::NotASocket);
        let sock = dir.join("s.sock");
        assert_eq!(socket_path_state(&sock).unwrap(), SocketPath::Free);
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert_eq!(socket_path_state(&sock).unwrap(), SocketPath::Live);
        drop(listener);
        assert_eq!(socket_path_state(&sock).unwrap(), SocketPath::Stale);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
