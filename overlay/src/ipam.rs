//! Pod address allocation from the node's podCIDR, persisted on disk in the
//! layout of CNI's host-local plugin: one file per allocated address, named by
//! the address and holding `<container id>\n<ifname>`, plus `last_reserved_ip.0`.
//! A file is created with O_EXCL under an flock, so an address is never handed
//! out twice, even across processes; DEL removes it, so nothing leaks.
//! Allocation continues after the last reserved address (round robin), so an
//! address released by DEL is reused only after the rest of the range.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;

/// Default data directory (one subdirectory per network name).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/ferry/ipam";
const LAST_RESERVED: &str = "last_reserved_ip.0";
const LOCK: &str = "lock";

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("no free address left in {0}")]
    Exhausted(Ipv4Net),
    #[error("ipam store {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IpamError + '_ {
    move |source| IpamError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// First and last assignable address: the network address, the gateway
/// (network + 1) and the broadcast address are never handed out.
pub fn range(subnet: Ipv4Net) -> Option<(Ipv4Addr, Ipv4Addr)> {
    let net = u32::from(subnet.network());
    let bcast = u32::from(subnet.broadcast());
    if bcast < net + 3 {
        return None;
    }
    Some((Ipv4Addr::from(net + 2), Ipv4Addr::from(bcast - 1)))
}

/// Pure choice of the next address: the first free one after `last`
/// (wrapping), or from the start of the range when `last` is outside it.
pub fn pick(
    subnet: Ipv4Net,
    used: &BTreeSet<Ipv4Addr>,
    last: Option<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    let (first, end) = range(subnet)?;
    let (first, end) = (u32::from(first), u32::from(end));
    let size = end - first + 1;
    let start = match last.map(u32::from) {
        Some(l) if (first..=end).contains(&l) => l - first + 1,
        _ => 0,
    };
    (0..size)
        .map(|i| Ipv4Addr::from(first + (start + i) % size))
        .find(|ip| !used.contains(ip))
}

/// One allocation on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub ip: Ipv4Addr,
    pub container_id: String,
    pub ifname: String,
}

/// A host-local style store for one network.
#[derive(Clone, Debug)]
pub struct Ipam {
    dir: PathBuf,
    subnet: Ipv4Net,
}

struct Lock(File);

impl Drop for Lock {
    fn drop(&mut self) {
        // SAFETY: flock on an fd we own.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

impl Ipam {
    /// `dir` is the network's directory (e.g. `/var/lib/ferry/ipam/ferry`).
    pub fn new(dir: impl Into<PathBuf>, subnet: Ipv4Net) -> Ipam {
        Ipam {
            dir: dir.into(),
            subnet: subnet.trunc(),
        }
    }

    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }

    fn lock(&self) -> Result<Lock, IpamError> {
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let p = self.dir.join(LOCK);
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(io(&p))?;
        // SAFETY: flock on an fd we own; blocks until the lock is ours.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io(&p)(std::io::Error::last_os_error()));
        }
        Ok(Lock(f))
    }

    /// Every allocation on disk (any subnet).
    pub fn allocations(&self) -> Result<Vec<Allocation>, IpamError> {
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io(&self.dir)(e)),
        };
        for e in rd.flatten() {
            let Ok(ip) = e.file_name().to_string_lossy().parse::<Ipv4Addr>() else {
                continue;
            };
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let mut lines = text.lines();
            out.push(Allocation {
                ip,
                container_id: lines.next().unwrap_or("").trim().to_string(),
                ifname: lines.next().unwrap_or("").trim().to_string(),
            });
        }
        out.sort_by_key(|a| a.ip);
        Ok(out)
    }

    /// The address held by (container, ifname), if any.
    pub fn lookup(&self, container_id: &str, ifname: &str) -> Result<Option<Ipv4Addr>, IpamError> {
        Ok(self
            .allocations()?
            .into_iter()
            .find(|a| a.container_id == container_id && a.ifname == ifname)
            .map(|a| a.ip))
    }

    /// Allocates an address for (container, ifname); the same one again when
    /// it already holds one (a retried ADD).
    pub fn allocate(&self, container_id: &str, ifname: &str) -> Result<Ipv4Addr, IpamError> {
        let _lock = self.lock()?;
        let all = self.allocations()?;
        if let Some(a) = all.iter().find(|a| {
            a.container_id == container_id && a.ifname == ifname && self.subnet.contains(&a.ip)
        }) {
            return Ok(a.ip);
        }
        let mut used: BTreeSet<Ipv4Addr> = all.iter().map(|a| a.ip).collect();
        let last_path = self.dir.join(LAST_RESERVED);
        let last = std::fs::read_to_string(&last_path)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let mut last = last;
        loop {
            let ip = pick(self.subnet, &used, last).ok_or(IpamError::Exhausted(self.subnet))?;
            let path = self.dir.join(ip.to_string());
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    f.write_all(format!("{container_id}\n{ifname}").as_bytes())
                        .and_then(|_| f.sync_all())
                        .map_err(io(&path))?;
                    let tmp = self.dir.join(format!("{LAST_RESERVED}.tmp"));
                    std::fs::write(&tmp, ip.to_string())
                        .and_then(|_| std::fs::rename(&tmp, &last_path))
                        .map_err(io(&last_path))?;
                    return Ok(ip);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    used.insert(ip);
                    last = Some(ip);
                }
                Err(e) => return Err(io(&path)(e)),
            }
        }
    }

    /// Releases what (container, ifname) holds; Ok(None) when it holds nothing.
    pub fn release(&self, container_id: &str, ifname: &str) -> Result<Option<Ipv4Addr>, IpamError> {
        let _lock = self.lock()?;
        let mut released = None;
        for a in self.allocations()? {
            if a.container_id == container_id && a.ifname == ifname {
                let p = self.dir.join(a.ip.to_string());
                match std::fs::remove_file(&p) {
                    Ok(()) => released = Some(a.ip),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io(&p)(e)),
                }
            }
        }
        Ok(released)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn range_excludes_network_gateway_broadcast() {
        let (a, b) = range(net("10.244.1.0/24")).unwrap();
        assert_eq!(
            (a.to_string(), b.to_string()),
            ("10.244.1.2".into(), "10.244.1.254".into())
        );
        assert!(range(net("10.244.1.0/31")).is_none());
        let (a, b) = range(net("10.244.1.0/30")).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn pick_round_robin_and_wrap() {
        let n = net("10.0.0.0/29"); // .2 ..= .6
        let mut used = BTreeSet::new();
        assert_eq!(pick(n, &used, None).unwrap().to_string(), "10.0.0.2");
        assert_eq!(
            pick(n, &used, Some("10.0.0.2".parse().unwrap()))
                .unwrap()
                .to_string(),
            "10.0.0.3"
        );
        assert_eq!(
            pick(n, &used, Some("10.0.0.6".parse().unwrap()))
                .unwrap()
                .to_string(),
            "10.0.0.2"
        );
        used.insert("10.0.0.2".parse().unwrap());
        assert_eq!(
            pick(n, &used, Some("10.0.0.6".parse().unwrap()))
                .unwrap()
                .to_string(),
            "10.0.0.3"
        );
        for i in 2..=6 {
            used.insert(format!("10.0.0.{i}").parse().unwrap());
        }
        assert_eq!(pick(n, &used, None), None);
    }

    #[test]
    fn store_never_twice_idempotent_release_and_exhaustion() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::new(dir.path().join("ferry"), net("10.0.0.0/29"));
        let a = ipam.allocate("c1", "eth0").unwrap();
        assert_eq!(
            ipam.allocate("c1", "eth0").unwrap(),
            a,
            "retried ADD gets the same"
        );
        let b = ipam.allocate("c2", "eth0").unwrap();
        let c = ipam.allocate("c1", "net1").unwrap();
        assert!(a != b && b != c && a != c);
        let d = ipam.allocate("c3", "eth0").unwrap();
        let e = ipam.allocate("c4", "eth0").unwrap();
        let err = ipam.allocate("c5", "eth0").unwrap_err();
        assert!(matches!(err, IpamError::Exhausted(_)), "{err}");
        assert_eq!(ipam.release("c2", "eth0").unwrap(), Some(b));
        assert_eq!(
            ipam.release("c2", "eth0").unwrap(),
            None,
            "repeat release is fine"
        );
        assert_eq!(ipam.lookup("c2", "eth0").unwrap(), None);
        assert_eq!(
            ipam.allocate("c5", "eth0").unwrap(),
            b,
            "freed address reused"
        );
        // A new store over the same directory sees the same state (persistence).
        let again = Ipam::new(dir.path().join("ferry"), net("10.0.0.0/29"));
        assert_eq!(again.lookup("c4", "eth0").unwrap(), Some(e));
        assert_eq!(again.allocations().unwrap().len(), 5);
        let _ = (d, c);
    }

    #[test]
    fn released_address_is_not_reused_before_the_range_wraps() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::new(dir.path(), net("10.0.0.0/28"));
        let a = ipam.allocate("c1", "eth0").unwrap();
        ipam.release("c1", "eth0").unwrap();
        let b = ipam.allocate("c2", "eth0").unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn concurrent_allocations_are_distinct() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let p = path.clone();
                std::thread::spawn(move || {
                    let ipam = Ipam::new(p, net("10.1.0.0/24"));
                    (0..10)
                        .map(|i| ipam.allocate(&format!("c{t}-{i}"), "eth0").unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let all: Vec<Ipv4Addr> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        let set: BTreeSet<_> = all.iter().collect();
        assert_eq!(set.len(), 80);
    }
}
