//! Running code inside another network namespace: on a fresh thread that has
//! entered it with setns(2), so the caller's thread is never moved.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

/// Enters the namespace behind `path` on the calling thread.
pub fn enter(path: &Path) -> Result<()> {
    let f = File::open(path).with_context(|| format!("opening netns {}", path.display()))?;
    // SAFETY: setns on a valid fd only changes the calling thread's namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!(
            "setns {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Runs `f` on a new thread; inside `netns` when given, else in the caller's namespace.
pub fn run_in<R: Send>(netns: Option<&Path>, f: impl FnOnce() -> Result<R> + Send) -> Result<R> {
    std::thread::scope(|s| {
        s.spawn(|| {
            if let Some(p) = netns {
                enter(p)?;
            }
            f()
        })
        .join()
        .map_err(|_| anyhow!("namespace worker thread panicked"))?
    })
}

/// Runs an async block on a new current-thread runtime on a new thread
/// (inside `netns` when given). Netlink sockets opened inside belong there.
pub fn block_on_in<R: Send, F>(netns: Option<&Path>, f: impl FnOnce() -> F + Send) -> Result<R>
where
    F: std::future::Future<Output = Result<R>>,
{
    run_in(netns, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building runtime")?;
        rt.block_on(f())
    })
}
