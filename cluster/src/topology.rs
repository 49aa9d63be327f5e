//! The cluster's namespaces and links (through rtnetlink, via the overlay's
//! netlink layer), and the processes started inside them.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ferry_overlay::netlink::Netlink;
use ipnet::Ipv4Net;

const BRIDGE: &str = "ferry0";
const MTU: u32 = 1500;

pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/var/run/netns").join(name)
}

async fn loopback_up(nl: &Netlink) -> Result<()> {
    if let Some(lo) = nl.link("lo").await? {
        nl.set_up(lo.index).await?;
    }
    Ok(())
}

/// The fabric namespace with the underlay bridge holding `ip`.
pub async fn create_fabric(name: &str, ip: Ipv4Addr, prefix: u8) -> Result<()> {
    let path = ferry_node::runtime::create_netns(name)?;
    ferry_overlay::netns::block_on_in(Some(&path), || async move {
        let nl = Netlink::new()?;
        loopback_up(&nl).await?;
        let bridge = nl.ensure_bridge(BRIDGE, MTU).await?;
        nl.ensure_addr(bridge.index, Ipv4Net::new(ip, prefix)?, true)
            .await?;
        Ok(())
    })
}

/// A node namespace whose `eth0` sits on the fabric bridge at `address`.
pub async fn create_node(
    fabric: &str,
    name: &str,
    i: u8,
    address: Ipv4Addr,
    prefix: u8,
    gateway: Ipv4Addr,
) -> Result<()> {
    let node_path = ferry_node::runtime::create_netns(name)?;
    let node_ns = std::fs::File::open(&node_path)
        .with_context(|| format!("opening {}", node_path.display()))?;
    let (host, peer) = (format!("veth-n{i}"), format!("n{i}-eth0"));
    let fabric_path = netns_path(fabric);
    let fd = node_ns.as_raw_fd();
    ferry_overlay::netns::block_on_in(Some(&fabric_path), || async move {
        let nl = Netlink::new()?;
        nl.add_veth(&host, &peer, MTU).await?;
        let bridge = nl.link(BRIDGE).await?.context("fabric bridge missing")?;
        let host_link = nl.link(&host).await?.context("veth missing")?;
        nl.attach(host_link.index, bridge.index, MTU).await?;
        let peer_link = nl.link(&peer).await?.context("veth peer missing")?;
        nl.move_to_netns(peer_link.index, fd).await
    })?;
    let peer = format!("n{i}-eth0");
    ferry_overlay::netns::block_on_in(Some(&node_path), || async move {
        let nl = Netlink::new()?;
        loopback_up(&nl).await?;
        let link = nl
            .link(&peer)
            .await?
            .context("veth peer missing in the node")?;
        nl.rename(link.index, "eth0").await?;
        nl.ensure_addr(link.index, Ipv4Net::new(address, prefix)?, true)
            .await?;
        nl.set_up(link.index).await?;
        // A default route, as real nodes have: a locally sent packet to a
        // ClusterIP needs one to get as far as the proxy's output DNAT. Not
        // tagged with the overlay's route protocol, so it never reconciles it away.
        let default = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gateway)
            .output_interface(link.index)
            .build();
        nl.handle
            .route()
            .add(default)
            .replace()
            .execute()
            .await
            .context("default route")?;
        // Nodes route pod traffic.
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("enabling forwarding")?;
        Ok(())
    })?;
    drop(node_ns);
    Ok(())
}

fn spawn(binary: &Path, args: &[String], log: &Path, netns: Option<PathBuf>) -> Result<u32> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = Command::new(binary);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let ns_file = netns
        .map(|p| std::fs::File::open(&p).with_context(|| format!("opening {}", p.display())))
        .transpose()?;
    let ns_fd = ns_file.as_ref().map(|f| f.as_raw_fd());
    // SAFETY: only async-signal-safe calls (setsid, setns) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if let Some(fd) = ns_fd {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {} {}", binary.display(), args.join(" ")))?;
    Ok(child.id())
}

/// Starts a detached process inside the named namespace; its output goes to `log`.
pub fn spawn_in(netns: &str, binary: &Path, args: &[String], log: &Path) -> Result<u32> {
    spawn(binary, args, log, Some(netns_path(netns)))
}

/// Starts a detached process in the caller's namespace.
pub fn spawn_in_root(binary: &Path, args: &[String], log: &Path) -> Result<u32> {
    spawn(binary, args, log, None)
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

/// SIGTERM, up to 5 s, then SIGKILL (the process group: the agent's children too).
pub fn stop(pid: u32) {
    // SAFETY: signalling a process group we started with setsid.
    unsafe { libc::kill(-(pid as i32), libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: as above.
    unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    // Reap it if it is our child; harmless otherwise.
    unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), libc::WNOHANG) };
}

/// Kills every process whose network namespace is `path`; returns how many.
pub fn kill_processes_in_path(path: &Path) -> usize {
    use std::os::unix::fs::MetadataExt;
    let Ok(target) = std::fs::metadata(path) else {
        return 0;
    };
    let mut killed = 0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let same = std::fs::metadata(entry.path().join("ns/net"))
            .is_ok_and(|m| m.ino() == target.ino() && m.dev() == target.dev());
        if same && pid != std::process::id() as i32 {
            // SAFETY: killing a process inside a namespace this cluster made.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed += 1;
        }
    }
    killed
}

pub fn kill_processes_in(netns: &str) -> usize {
    kill_processes_in_path(&netns_path(netns))
}

pub fn remove_netns(name: &str) {
    ferry_node::runtime::remove_netns(&netns_path(name));
}
