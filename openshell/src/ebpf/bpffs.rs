//! Making sure pins land on a BPF filesystem.

use std::path::Path;

use super::EbpfError;

/// The conventional bpffs mount point, which systemd mounts at boot on most distributions.
const BPFFS_MOUNT: &str = "/sys/fs/bpf";
/// `BPF_FS_MAGIC` from `linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Checks that `dir` (or its nearest existing ancestor) is on bpffs. When that ancestor is the
/// conventional `/sys/fs/bpf` and nothing is mounted there yet, mounts bpffs, as systemd does.
pub(super) fn ensure_bpffs(dir: &Path) -> Result<(), EbpfError> {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or_else(|| Path::new("/"));
    if is_bpffs(existing)? {
        return Ok(());
    }
    if existing != Path::new(BPFFS_MOUNT) {
        return Err(EbpfError::NotBpffs {
            path: dir.to_path_buf(),
        });
    }
    mount_bpffs(existing)?;
    if is_bpffs(existing)? {
        Ok(())
    } else {
        Err(EbpfError::NotBpffs {
            path: dir.to_path_buf(),
        })
    }
}

fn is_bpffs(path: &Path) -> Result<bool, EbpfError> {
    let c_path = path_cstring(path)?;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `c_path` is a valid NUL-terminated path and `stat` is large enough for the result.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(EbpfError::io(path, std::io::Error::last_os_error()));
    }
    // SAFETY: statfs returned 0, so it filled `stat`.
    let stat = unsafe { stat.assume_init() };
    Ok(stat.f_type == BPF_FS_MAGIC)
}

fn mount_bpffs(path: &Path) -> Result<(), EbpfError> {
    let c_path = path_cstring(path)?;
    // SAFETY: all pointers are valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c_path.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(EbpfError::MountBpffs {
            path: path.to_path_buf(),
            source: std::io::Error::last_os_error(),
        })
    }
}

fn path_cstring(path: &Path) -> Result<std::ffi::CString, EbpfError> {
    use std::os::unix::ffi::OsStrExt as _;
    std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        EbpfError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains a NUL byte"),
        )
    })
}
