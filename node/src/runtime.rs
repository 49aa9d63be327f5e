//! Host processes as containers: spawned in the pod's network namespace (or
//! the node's, for hostNetwork pods), in a private mount namespace holding
//! the pod's volumes, as the leader of their own process group, output
//! appended to a log file. Processes are identified across agent restarts by
//! pid and start time (/proc/<pid>/stat field 22).

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Directory of named network namespaces (as `ip netns`).
pub const NETNS_DIR: &str = "/var/run/netns";

/// The state letter and start time (clock ticks since boot) of `pid`.
pub fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Parses /proc/<pid>/stat: the fields after the command name in parentheses.
pub fn parse_stat(text: &str) -> Option<(char, u64)> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); field 22 (starttime) is fields[19].
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// Whether `pid` is a live (not zombie) process that started at `start_ticks`.
pub fn is_alive(pid: u32, start_ticks: u64) -> bool {
    matches!(proc_stat(pid), Some((s, t)) if t == start_ticks && s != 'Z' && s != 'X')
}

/// Sends `sig` to the process group led by `pid`. Containers lead their own
/// group (setsid), so this reaches the main process and whatever it started;
/// a group id is not reused while any member lives.
pub fn signal_group(pid: u32, sig: i32) {
    if pid <= 1 {
        return;
    }
    // SAFETY: kill(2) with a negative pid signals that process group; no memory is touched.
    unsafe {
        libc::kill(-(pid as i32), sig);
    }
}

/// Sends `sig` to one process.
pub fn signal_pid(pid: u32, sig: i32) {
    if pid <= 1 {
        return;
    }
    // SAFETY: kill(2) on a pid; no memory is touched.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// A bind mount made in the container's mount namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindMount {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

/// Everything needed to start one container process.
#[derive(Clone, Debug)]
pub struct SpawnSpec {
    pub program: PathBuf,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
    /// Network namespace to enter (None: the agent's, i.e. the node's).
    pub netns: Option<PathBuf>,
    pub mounts: Vec<BindMount>,
    /// Set in a private UTS namespace (not for hostNetwork pods).
    pub hostname: Option<String>,
    pub log_path: PathBuf,
}

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).with_context(|| format!("NUL in path {}", p.display()))
}

/// Makes sure a bind-mount target exists: a directory, or an empty file when
/// the source is a file.
pub fn ensure_target(m: &BindMount) -> Result<()> {
    if m.target.exists() {
        return Ok(());
    }
    if m.source.is_dir() {
        std::fs::create_dir_all(&m.target)
    } else {
        if let Some(parent) = m.target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        File::create(&m.target).map(|_| ())
    }
    .with_context(|| format!("creating mount point {}", m.target.display()))
}

/// Opens (creating) the log file for appending.
pub fn open_log(path: &Path) -> Result<File> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening log {}", path.display()))
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Namespace and mount setup done in the child between fork and exec. Only
/// async-signal-safe system calls on data prepared before the fork.
struct ChildSetup {
    netns: Option<File>,
    mnt_ns: Option<File>,
    new_mount_ns: bool,
    mounts: Vec<(CString, CString, bool)>,
    hostname: Option<CString>,
    cwd: Option<CString>,
}

impl ChildSetup {
    fn run(&self) -> std::io::Result<()> {
        // SAFETY: each call is a plain system call on pointers to CStrings and
        // fds owned by `self`, which outlives the call; no allocation happens.
        unsafe {
            check(libc::setsid())?;
            if let Some(ns) = &self.netns {
                check(libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET))?;
            }
            if let Some(ns) = &self.mnt_ns {
                check(libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS))?;
            }
            let mut flags = 0;
            if self.new_mount_ns {
                flags |= libc::CLONE_NEWNS;
            }
            if self.hostname.is_some() {
                flags |= libc::CLONE_NEWUTS;
            }
            if flags != 0 {
                check(libc::unshare(flags))?;
            }
            if self.new_mount_ns {
                let root = c"/";
                check(libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_SLAVE,
                    std::ptr::null(),
                ))?;
                for (src, dst, ro) in &self.mounts {
                    check(libc::mount(
                        src.as_ptr(),
                        dst.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    ))?;
                    if *ro {
                        check(libc::mount(
                            std::ptr::null(),
                            dst.as_ptr(),
                            std::ptr::null(),
                            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                            std::ptr::null(),
                        ))?;
                    }
                }
            }
            if let Some(h) = &self.hostname {
                check(libc::sethostname(h.as_ptr(), h.as_bytes().len()))?;
            }
            if let Some(cwd) = &self.cwd {
                check(libc::chdir(cwd.as_ptr()))?;
            }
        }
        Ok(())
    }
}

/// A started container process.
#[derive(Debug)]
pub struct Started {
    pub child: tokio::process::Child,
    pub pid: u32,
    pub start_ticks: u64,
}

/// Starts a container process. Errors are start failures (bad namespace,
/// mount, working directory, or exec).
pub fn spawn(spec: &SpawnSpec) -> Result<Started> {
    let netns = match &spec.netns {
        Some(p) => Some(File::open(p).with_context(|| format!("opening netns {}", p.display()))?),
        None => None,
    };
    for m in &spec.mounts {
        ensure_target(m)?;
    }
    let setup = ChildSetup {
        netns,
        mnt_ns: None,
        new_mount_ns: !spec.mounts.is_empty() || spec.hostname.is_some(),
        mounts: spec
            .mounts
            .iter()
            .map(|m| Ok((cstr(&m.source)?, cstr(&m.target)?, m.read_only)))
            .collect::<Result<_>>()?,
        hostname: spec.hostname.as_deref().map(CString::new).transpose()?,
        cwd: spec.cwd.as_deref().map(cstr).transpose()?,
    };
    let log = open_log(&spec.log_path)?;
    let mut cmd = tokio::process::Command::new(&spec.program);
    cmd.arg0(&spec.argv[0])
        .args(&spec.argv[1..])
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .kill_on_drop(false);
    // SAFETY: the closure only makes system calls (see ChildSetup::run).
    unsafe {
        cmd.pre_exec(move || setup.run());
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", spec.argv[0]))?;
    let pid = child.id().context("started process has no pid")?;
    let start_ticks = proc_stat(pid).map(|(_, t)| t).unwrap_or(0);
    Ok(Started {
        child,
        pid,
        start_ticks,
    })
}

/// The exit code Kubernetes reports for a wait status: the code, or 128 + signal.
pub fn exit_code(status: &std::process::ExitStatus) -> (i32, Option<i32>) {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => (c, None),
        (None, Some(s)) => (128 + s, Some(s)),
        (None, None) => (255, None),
    }
}

/// Runs `argv` inside a container's namespaces (network from `netns`, mounts
/// from the running process `pid`), with its environment and working
/// directory; for exec probes. Returns (success, combined output).
pub async fn exec_in(
    argv: &[String],
    env: &[(String, String)],
    cwd: Option<&Path>,
    netns: Option<&Path>,
    pid: Option<u32>,
    timeout: Duration,
) -> Result<(bool, String)> {
    let path_var = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or(crate::env::DEFAULT_PATH);
    let program = crate::env::find_program(&argv[0], path_var, cwd.unwrap_or(Path::new("/")))
        .map_err(anyhow::Error::msg)?;
    let setup = ChildSetup {
        netns: netns.map(File::open).transpose()?,
        mnt_ns: pid.and_then(|p| File::open(format!("/proc/{p}/ns/mnt")).ok()),
        new_mount_ns: false,
        mounts: vec![],
        hostname: None,
        cwd: cwd.map(cstr).transpose()?,
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.arg0(&argv[0])
        .args(&argv[1..])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: the closure only makes system calls (see ChildSetup::run).
    unsafe {
        cmd.pre_exec(move || setup.run());
    }
    let child = cmd.spawn()?;
    let pid = child.id();
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(out) => {
            let out = out?;
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            text.truncate(1024);
            Ok((out.status.success(), text))
        }
        Err(_) => {
            if let Some(p) = pid {
                signal_group(p, libc::SIGKILL);
            }
            bail!("command timed out after {}s", timeout.as_secs())
        }
    }
}

/// Whether `path` is a network-namespace file (a bind mount of an nsfs inode).
pub fn is_netns_file(path: &Path) -> bool {
    let (Ok(a), Ok(b)) = (
        std::fs::metadata(path),
        std::fs::metadata("/proc/self/ns/net"),
    ) else {
        return false;
    };
    a.dev() == b.dev()
}

fn bind_mount(src: &Path, dst: &Path) -> Result<()> {
    let (s, d) = (cstr(src)?, cstr(dst)?);
    // SAFETY: mount(2) on valid C strings.
    let rc = unsafe {
        libc::mount(
            s.as_ptr(),
            d.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    check(rc).with_context(|| format!("bind-mounting {} on {}", src.display(), dst.display()))
}

fn ensure_netns_dir() -> Result<()> {
    std::fs::create_dir_all(NETNS_DIR).with_context(|| format!("creating {NETNS_DIR}"))
}

/// Creates the named network namespace `/var/run/netns/<name>` (loopback is
/// brought up by the pod network), or returns it when it already is one.
pub fn create_netns(name: &str) -> Result<PathBuf> {
    ensure_netns_dir()?;
    let path = Path::new(NETNS_DIR).join(name);
    if is_netns_file(&path) {
        return Ok(path);
    }
    File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let target = path.clone();
    let r = std::thread::spawn(move || -> Result<()> {
        // SAFETY: unshare affects only this short-lived thread.
        check(unsafe { libc::unshare(libc::CLONE_NEWNET) }).context("unshare(CLONE_NEWNET)")?;
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        bind_mount(Path::new(&format!("/proc/self/task/{tid}/ns/net")), &target)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("netns thread panicked"))?;
    if let Err(e) = r {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok(path)
}

/// Names `pid`'s network namespace as `/var/run/netns/<name>` (re-adopting a
/// pod whose name was lost, e.g. after the agent's mount namespace went away).
pub fn name_netns_of(pid: u32, name: &str) -> Result<PathBuf> {
    ensure_netns_dir()?;
    let path = Path::new(NETNS_DIR).join(name);
    let src = PathBuf::from(format!("/proc/{pid}/ns/net"));
    let same = match (std::fs::metadata(&path), std::fs::metadata(&src)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    };
    if same {
        return Ok(path);
    }
    remove_netns(&path);
    File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    bind_mount(&src, &path)?;
    Ok(path)
}

/// Unmounts and removes a named network namespace (missing is fine).
pub fn remove_netns(path: &Path) {
    if let Ok(p) = cstr(path) {
        // SAFETY: umount2 on a valid C string; failure (not mounted) is ignored.
        unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
    }
    let _ = std::fs::remove_file(path);
}

/// A stable netns name for a pod: `ferry-pod-<16 hex digits of its uid's hash>`.
pub fn netns_name(uid: &str) -> String {
    let h = uid.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    format!("ferry-pod-{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing() {
        let text = "1234 (my (odd) proc) S 1 1234 1234 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000 100";
        assert_eq!(parse_stat(text), Some(('S', 987654)));
        assert_eq!(parse_stat("garbage"), None);
        let me = std::process::id();
        let (state, start) = proc_stat(me).unwrap();
        assert!(state != 'Z');
        assert!(is_alive(me, start));
        assert!(!is_alive(me, start + 1));
        assert!(!is_alive(u32::MAX - 1, start));
    }

    #[test]
    fn netns_names_are_stable_and_short() {
        let a = netns_name("0b6c5f8e-1111-2222-3333-444455556666");
        assert_eq!(a, netns_name("0b6c5f8e-1111-2222-3333-444455556666"));
        assert_ne!(a, netns_name("x"));
        assert_eq!(a.len(), "ferry-pod-".len() + 16);
    }

    #[test]
    fn exit_codes() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            exit_code(&std::process::ExitStatus::from_raw(3 << 8)),
            (3, None)
        );
        assert_eq!(
            exit_code(&std::process::ExitStatus::from_raw(9)),
            (137, Some(9))
        );
    }

    #[tokio::test]
    async fn spawn_plain_process_and_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("c/0.log");
        let spec = SpawnSpec {
            program: "/bin/sh".into(),
            argv: vec![
                "sh".into(),
                "-c".into(),
                "echo hello $GREETING; pwd; exit 3".into(),
            ],
            env: vec![("GREETING".into(), "world".into())],
            cwd: Some(dir.path().to_path_buf()),
            netns: None,
            mounts: vec![],
            hostname: None,
            log_path: log.clone(),
        };
        let mut s = spawn(&spec).unwrap();
        assert!(s.start_ticks > 0);
        let st = s.child.wait().await.unwrap();
        assert_eq!(exit_code(&st), (3, None));
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(text, format!("hello world\n{}\n", dir.path().display()));
    }

    #[tokio::test]
    async fn exec_probe_command() {
        let env = vec![("PATH".to_string(), crate::env::DEFAULT_PATH.to_string())];
        let (ok, out) = exec_in(
            &["sh".into(), "-c".into(), "echo hi".into()],
            &env,
            None,
            None,
            None,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert!(ok);
        assert_eq!(out, "hi\n");
        let (ok, _) = exec_in(
            &["false".into()],
            &env,
            None,
            None,
            None,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert!(!ok);
        let e = exec_in(
            &["sleep".into(), "5".into()],
            &env,
            None,
            None,
            None,
            Duration::from_secs(1),
        )
        .await;
        assert!(e.is_err());
    }
}
