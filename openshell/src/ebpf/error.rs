//! The error type of the eBPF layer.

use std::path::{Path, PathBuf};

use aya::{maps::MapError, programs::ProgramError};

use super::{BtfError, VMLINUX_BTF};

/// Errors of the eBPF layer. Each says what failed and on which object.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("loading the openshell eBPF object failed (are you root on a kernel with BTF?)")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("eBPF program `{program}`: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("eBPF program `{program}` is missing from the object or has the wrong type")]
    MissingProgram { program: &'static str },
    #[error("eBPF map `{map}`: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("eBPF map `{map}` is missing from the object")]
    MissingMap { map: &'static str },
    #[error("reading kernel BTF from {VMLINUX_BTF}: {0}")]
    BtfRead(#[source] std::io::Error),
    #[error("kernel BTF at {VMLINUX_BTF}: {0}")]
    Btf(#[from] BtfError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pinning or opening link {path}: {message}")]
    Pin { path: PathBuf, message: String },
    #[error(
        "{path} is not on a BPF filesystem; mount one (`mount -t bpf bpf /sys/fs/bpf`) or \
         choose a pin directory under an existing bpffs mount"
    )]
    NotBpffs { path: PathBuf },
    #[error("mounting bpffs at {path}: {source}")]
    MountBpffs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is not a cgroup v2 directory (no cgroup.procs in it); create the sandbox cgroup \
         under the cgroup2 mount first"
    )]
    NotACgroup { path: PathBuf },
    #[error("{what}: port 0 is not a usable listener port; pass the port the listener is bound to")]
    ZeroPort { what: &'static str },
    #[error(
        "{what}: {addr} is not a loopback address; sandboxes only receive loopback traffic, so \
         bind the listener to 127.0.0.1 (or ::1 for IPv6)"
    )]
    ListenerNotLoopback {
        what: &'static str,
        addr: std::net::SocketAddr,
    },
}

impl EbpfError {
    pub(super) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(super) fn map(map: &'static str, source: MapError) -> Self {
        Self::Map {
            map,
            source: Box::new(source),
        }
    }

    pub(super) fn program(program: &'static str, source: ProgramError) -> Self {
        Self::Program {
            program,
            source: Box::new(source),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_what_where_and_how_to_fix() {
        let not_bpffs = EbpfError::NotBpffs {
            path: PathBuf::from("/tmp/pins"),
        };
        insta::assert_snapshot!(not_bpffs.to_string(), @"/tmp/pins is not on a BPF filesystem; mount one (`mount -t bpf bpf /sys/fs/bpf`) or choose a pin directory under an existing bpffs mount");
        let not_cgroup = EbpfError::NotACgroup {
            path: PathBuf::from("/tmp"),
        };
        insta::assert_snapshot!(not_cgroup.to_string(), @"/tmp is not a cgroup v2 directory (no cgroup.procs in it); create the sandbox cgroup under the cgroup2 mount first");
        let zero = EbpfError::ZeroPort {
            what: "tcp_v4 listener",
        };
        insta::assert_snapshot!(zero.to_string(), @"tcp_v4 listener: port 0 is not a usable listener port; pass the port the listener is bound to");
        let btf = EbpfError::Btf(BtfError::NoMember {
            strukt: "mm_struct".into(),
            member: "exe_file".into(),
        });
        insta::assert_snapshot!(btf.to_string(), @"kernel BTF at /sys/kernel/btf/vmlinux: kernel BTF struct `mm_struct` has no member `exe_file`");
        let io = EbpfError::io(
            Path::new("/sys/fs/bpf/openshell/v1/maps"),
            std::io::Error::from_raw_os_error(libc::EACCES),
        );
        insta::assert_snapshot!(io.to_string(), @"/sys/fs/bpf/openshell/v1/maps: Permission denied (os error 13)");
    }
}
