//! Network-namespace topologies for tests and benchmarks.
//!
//! Everything made here lives in namespaces this process created (`ferry-<pid>-<n>-<tag>`)
//! and is removed on drop, even when a test panics. Nothing touches the root
//! namespace's interfaces, routes or rules.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// True when running as root. Otherwise prints a LOUD skip message and returns
/// false, or panics when `CI=true` (a skipped kernel test must not pass in CI).
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    let msg = "KERNEL TEST SKIPPED: needs root (network namespaces, netfilter)";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg}, and CI=true");
    }
    eprintln!("\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n!!! {msg}\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n");
    false
}

/// Runs a command to completion, failing with its stderr.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Runs `cmd` inside namespace `ns` (`ip netns exec`), returning stdout.
pub fn exec(ns: &str, cmd: &[&str]) -> Result<String> {
    let out = run(Command::new("ip").args(["netns", "exec", ns]).args(cmd))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Deletes `ferry-<pid>-*` namespaces left by processes that no longer exist.
pub fn cleanup_stale() {
    let Ok(dir) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("ferry-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// A network namespace, deleted (with the processes started in it) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `ferry-<pid>-<n>-<tag>` with loopback up.
    pub fn new(tag: &str) -> Result<Netns> {
        if COUNTER.load(Ordering::Relaxed) == 0 {
            cleanup_stale();
        }
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("ferry-{}-{n}-{tag}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NS args...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let out = run(Command::new("ip").args(["-n", &self.name]).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs a command inside the namespace and returns stdout.
    pub fn exec(&self, cmd: &[&str]) -> Result<String> {
        exec(&self.name, cmd)
    }

    /// A `Command` that will run `prog` inside the namespace.
    pub fn command(&self, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, prog]);
        c
    }

    /// Spawns a process inside the namespace, killed when the guard drops.
    pub fn spawn(&self, prog: &str, args: &[&str]) -> Result<ChildGuard> {
        let child = self
            .command(prog)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {prog} in {}", self.name))?;
        Ok(ChildGuard::new(child))
    }

    pub fn add_addr(&self, dev: &str, cidr: &str) -> Result<()> {
        self.ip(&["addr", "add", cidr, "dev", dev]).map(|_| ())
    }

    pub fn link_up(&self, dev: &str) -> Result<()> {
        self.ip(&["link", "set", dev, "up"]).map(|_| ())
    }

    /// `ip route add DST via GW` (DST may be "default").
    pub fn add_route(&self, dst: &str, via: &str) -> Result<()> {
        self.ip(&["route", "add", dst, "via", via]).map(|_| ())
    }

    /// Sets a sysctl inside the namespace (e.g. "net.ipv4.ip_forward", "1").
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec(&["sysctl", "-qw", &format!("{key}={value}")])
            .map(|_| ())
    }

    /// Runs `f` on a new thread that has entered this namespace; sockets it
    /// creates belong to the namespace.
    pub fn spawn_thread<F, R>(&self, f: F) -> JoinHandle<Result<R>>
    where
        F: FnOnce() -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            enter_netns(&path)?;
            f()
        })
    }

    /// Runs `f` inside the namespace (on a helper thread) and returns its result.
    pub fn run<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        match self.spawn_thread(f).join() {
            Ok(r) => r,
            Err(_) => bail!("thread in {} panicked", self.name),
        }
    }

    /// A TCP listener on `addr` inside the namespace, calling `on_conn` with
    /// each accepted connection (set blocking) until the returned server stops.
    fn serve_tcp_with(
        &self,
        addr: &str,
        on_conn: impl Fn(TcpStream, SocketAddr, Arc<AtomicBool>) + Send + 'static,
    ) -> Result<Server> {
        let addr: SocketAddr = addr.parse()?;
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let s2 = stop.clone();
        let handle = self.spawn_thread(move || {
            let l = TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            let _ = tx.send(());
            while !s2.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, peer)) => {
                        let _ = s.set_nonblocking(false);
                        on_conn(s, peer, s2.clone());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
            Ok(())
        });
        rx.recv_timeout(Duration::from_secs(5))
            .context("tcp server did not start")?;
        Ok(Server {
            stop,
            handle: Some(handle),
        })
    }

    /// Starts a TCP server on `addr` answering every connection with "NAME PEER_IP\n".
    pub fn serve_tcp(&self, addr: &str, name: &str) -> Result<Server> {
        let name = name.to_string();
        self.serve_tcp_with(addr, move |mut s, peer, _| {
            let _ = s.write_all(format!("{name} {}\n", peer.ip()).as_bytes());
        })
    }

    /// Starts a TCP server on `addr` that greets every connection with
    /// "NAME PEER_IP\n" and then echoes what it receives until the peer closes:
    /// a long-lived connection for tests that must outlive a change.
    pub fn serve_tcp_echo(&self, addr: &str, name: &str) -> Result<Server> {
        let name = name.to_string();
        self.serve_tcp_with(addr, move |mut s, peer, stop| {
            let greeting = format!("{name} {}\n", peer.ip());
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
                if s.write_all(greeting.as_bytes()).is_err() {
                    return;
                }
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    match s.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(_) => return,
                    }
                }
            });
        })
    }

    /// Starts a UDP server on `addr` answering every datagram with "NAME PEER_IP\n".
    pub fn serve_udp(&self, addr: &str, name: &str) -> Result<Server> {
        let addr: SocketAddr = addr.parse()?;
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let (s2, name) = (stop.clone(), name.to_string());
        let handle = self.spawn_thread(move || {
            let s = UdpSocket::bind(addr)?;
            s.set_read_timeout(Some(Duration::from_millis(20)))?;
            let _ = tx.send(());
            let mut buf = [0u8; 1500];
            while !s2.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(format!("{name} {}\n", peer.ip()).as_bytes(), peer);
                }
            }
            Ok(())
        });
        rx.recv_timeout(Duration::from_secs(5))
            .context("udp server did not start")?;
        Ok(Server {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill processes still inside, then remove the namespace.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: plain kill(2) on a pid inside our own namespace.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs `f` on a new thread that has entered the named namespace (`ip netns`
/// name) and returns its result; for callers that hold only the name.
pub fn run_in_netns<F, R>(name: &str, f: F) -> Result<R>
where
    F: FnOnce() -> Result<R> + Send + 'static,
    R: Send + 'static,
{
    let path = format!("/var/run/netns/{name}");
    match std::thread::spawn(move || {
        enter_netns(&path)?;
        f()
    })
    .join()
    {
        Ok(r) => r,
        Err(_) => bail!("thread in {name} panicked"),
    }
}

fn enter_netns(path: &str) -> Result<()> {
    let f = File::open(path).with_context(|| format!("opening {path}"))?;
    // SAFETY: setns on a valid namespace fd affects only the calling thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns {path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// A veth pair: `a_if` in `a` with `a_cidr`, `b_if` in `b` with `b_cidr`, both up.
pub fn veth(
    a: &Netns,
    a_if: &str,
    a_cidr: &str,
    b: &Netns,
    b_if: &str,
    b_cidr: &str,
) -> Result<()> {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])?;
    a.add_addr(a_if, a_cidr)?;
    b.add_addr(b_if, b_cidr)?;
    a.link_up(a_if)?;
    b.link_up(b_if)?;
    Ok(())
}

/// A node on a bridge: a veth whose end `port` in `bridge_ns` is enslaved to
/// `bridge`, and whose peer `node_if` in `node` has `node_cidr`; both up.
pub fn bridge_port(
    bridge_ns: &Netns,
    bridge: &str,
    port: &str,
    node: &Netns,
    node_if: &str,
    node_cidr: &str,
) -> Result<()> {
    bridge_ns.ip(&[
        "link",
        "add",
        port,
        "type",
        "veth",
        "peer",
        "name",
        node_if,
        "netns",
        node.name(),
    ])?;
    bridge_ns.ip(&["link", "set", port, "master", bridge, "up"])?;
    node.add_addr(node_if, node_cidr)?;
    node.link_up(node_if)
}

/// The node's underlay address on an [`underlay`] fabric: 198.18.0.`i`.
pub fn underlay_ip(i: u8) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(198, 18, 0, i)
}

/// An L2 underlay: a fabric namespace `{prefix}fab` holding bridge `br0`, and
/// `n` node namespaces `{prefix}n1..n`, each with `eth0` on the bridge at
/// [`underlay_ip`]`(i)`/24. Returns the fabric and the nodes.
pub fn underlay(prefix: &str, n: u8) -> Result<(Netns, Vec<Netns>)> {
    let fabric = Netns::new(&format!("{prefix}fab"))?;
    fabric.ip(&["link", "add", "br0", "type", "bridge"])?;
    fabric.link_up("br0")?;
    let mut nodes = Vec::new();
    for i in 1..=n {
        let ns = Netns::new(&format!("{prefix}n{i}"))?;
        let cidr = format!("{}/24", underlay_ip(i));
        bridge_port(&fabric, "br0", &format!("p{i}"), &ns, "eth0", &cidr)?;
        nodes.push(ns);
    }
    Ok((fabric, nodes))
}

/// A server thread started by [`Netns::serve_tcp`] / [`Netns::serve_udp`]; stops on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<()>>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A spawned process, killed and reaped on drop.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
}

impl ChildGuard {
    pub fn new(child: Child) -> Self {
        ChildGuard { child: Some(child) }
    }
    pub fn id(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }
    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("child present")
    }
    /// Kills now (SIGKILL) and waits.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Connects to `addr` (from the calling thread's namespace) and reads the reply to EOF.
pub fn tcp_request(addr: &str, timeout: Duration) -> std::io::Result<String> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.trim().to_string())
}

/// Sends one datagram to `addr` and waits for one reply.
pub fn udp_request(addr: &str, timeout: Duration) -> std::io::Result<String> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.connect(addr)?;
    s.set_read_timeout(Some(timeout))?;
    s.send(b"ping")?;
    let mut buf = [0u8; 1500];
    let n = s.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

/// A plain HTTP/1.1 GET (from the calling thread's namespace); returns the
/// status code and the body.
pub fn http_get(addr: &str, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    let sock: SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut s = TcpStream::connect_timeout(&sock, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, text.clone());
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((code, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Retries `f` until it returns Some or `limit` passes.
pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_veth_and_servers() {
        if !require_root() {
            return;
        }
        let a = Netns::new("tka").unwrap();
        let b = Netns::new("tkb").unwrap();
        veth(&a, "va", "198.18.250.1/30", &b, "vb", "198.18.250.2/30").unwrap();
        let _t = b.serve_tcp("0.0.0.0:8080", "bee").unwrap();
        let _u = b.serve_udp("0.0.0.0:8081", "bee").unwrap();
        let r = a
            .run(|| Ok(tcp_request("198.18.250.2:8080", Duration::from_secs(2))?))
            .unwrap();
        assert_eq!(r, "bee 198.18.250.1");
        let r = a
            .run(|| Ok(udp_request("198.18.250.2:8081", Duration::from_secs(2))?))
            .unwrap();
        assert_eq!(r, "bee 198.18.250.1");
        let mut g = a.spawn("sleep", &["30"]).unwrap();
        assert!(g.id() > 0);
        let name = a.name().to_string();
        drop(g.child_mut().try_wait());
        drop(a);
        assert!(!std::path::Path::new(&format!("/var/run/netns/{name}")).exists());
    }
}
