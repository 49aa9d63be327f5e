//! The BPF filesystem, where programs and maps outlive the process that made
//! them (`ferry cni` runs for milliseconds; the pods it wires keep using them).

use std::ffi::CString;
use std::io;
use std::path::Path;

/// Where bpffs is mounted by convention.
pub const MOUNT_POINT: &str = "/sys/fs/bpf";

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a valid C string and a zeroed statfs the kernel fills in.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Makes sure `dir` exists on a bpffs, mounting one at /sys/fs/bpf when none
/// is (as Cilium and Calico do; distributions without systemd leave it unmounted).
pub fn ensure_dir(dir: &Path) -> io::Result<()> {
    let mount = Path::new(MOUNT_POINT);
    if dir.starts_with(mount) && !is_bpffs(mount)? {
        let src = CString::new("bpf").expect("no NUL");
        let target = CString::new(MOUNT_POINT).expect("no NUL");
        // SAFETY: valid C strings; no mount data.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("mounting bpffs at {MOUNT_POINT}: {e}"),
            ));
        }
    }
    std::fs::create_dir_all(dir)?;
    if !is_bpffs(dir)? {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not on a BPF filesystem", dir.display()),
        ));
    }
    Ok(())
}
