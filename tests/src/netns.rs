//! Test hosts in network namespaces: a veth pair between the test's network namespace and a new
//! one, addresses from 198.18.0.0/15 (IPv4) and 2001:2::/48 (IPv6) only.
//!
//! Each [`TestNet`] takes one /24 (`198.18.N.0/24`, `2001:2:0:N::/64`), N = 0..=255, by holding
//! an exclusive `flock` on `/run/openshell-tests/net-N.lock`, so tests in parallel (in one test
//! binary or across binaries) never share addresses. The host side is `.1`, the namespace side
//! `.10`. Dropping the `TestNet` deletes the namespace, which removes the veth pair with it.
//!
//! ```no_run
//! let net = openshell_tests::netns::TestNet::new()?;
//! let listener = net.run(|| std::net::TcpListener::bind((net.ns_v4(), 443)))??;
//! let mut child = net.command("python3").arg("-c").arg("print(1)").spawn()?;
//! # anyhow::Ok(())
//! ```

use std::{
    fs::{self, File},
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, bail};

const LOCK_DIR: &str = "/run/openshell-tests";
const SUBNETS: u8 = 255;

/// A network namespace linked to the test's own by a veth pair. See the module docs.
#[derive(Debug)]
pub struct TestNet {
    name: String,
    subnet: u8,
    /// Holds the subnet's lock for the lifetime of the namespace.
    _lock: File,
}

impl TestNet {
    /// Creates the namespace, the veth pair and the addresses, and brings everything up.
    pub fn new() -> anyhow::Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let (subnet, lock) = take_subnet()?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("osh-{}-{n}", std::process::id());
        let net = Self {
            name,
            subnet,
            _lock: lock,
        };
        net.setup()
            .with_context(|| format!("setting up network namespace {}", net.name))?;
        Ok(net)
    }

    fn setup(&self) -> anyhow::Result<()> {
        let (host_if, ns_if) = (self.host_interface(), format!("osh{}n", self.subnet));
        // A leftover from a crashed run would make `ip link add` fail; it held the same lock,
        // so it is ours to remove.
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        ip(&["netns", "add", &self.name])?;
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if, "netns", &self.name,
        ])?;
        let host4 = format!("{}/24", self.host_v4());
        let host6 = format!("{}/64", self.host_v6());
        ip(&["addr", "add", &host4, "dev", &host_if])?;
        ip(&["-6", "addr", "add", &host6, "dev", &host_if, "nodad"])?;
        ip(&["link", "set", &host_if, "up"])?;
        let ns4 = format!("{}/24", self.ns_v4());
        let ns6 = format!("{}/64", self.ns_v6());
        let n = self.name.as_str();
        ip(&["-n", n, "addr", "add", &ns4, "dev", &ns_if])?;
        ip(&["-n", n, "-6", "addr", "add", &ns6, "dev", &ns_if, "nodad"])?;
        ip(&["-n", n, "link", "set", &ns_if, "up"])?;
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// The name of the test's end of the veth pair (it goes away with the namespace).
    pub fn host_interface(&self) -> String {
        format!("osh{}h", self.subnet)
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The test's side of the veth pair: `198.18.N.1`.
    pub fn host_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.subnet, 1)
    }

    /// The namespace's side: `198.18.N.10`.
    pub fn ns_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.subnet, 10)
    }

    /// The test's side of the veth pair: `2001:2:0:N::1`.
    pub fn host_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 2, 0, u16::from(self.subnet), 0, 0, 0, 1)
    }

    /// The namespace's side: `2001:2:0:N::10`.
    pub fn ns_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 2, 0, u16::from(self.subnet), 0, 0, 0, 0x10)
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `f` on a thread that has entered the namespace and returns its result. Sockets
    /// created by `f` stay in the namespace, so `net.run(|| TcpListener::bind(...))` gives a
    /// listener on the test host that the test can `accept()` on from any thread.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        let path = PathBuf::from("/run/netns").join(&self.name);
        let ns = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on a valid namespace fd only changes this thread's namespace;
                // the thread ends when `f` returns.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    bail!(
                        "setns into {}: {}",
                        self.name,
                        std::io::Error::last_os_error()
                    );
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in namespace {} panicked", self.name))?
        })
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        // Deleting the namespace destroys the veth end inside it, and with it the pair.
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("cleanup of network namespace {} failed: {e:#}", self.name);
        }
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2 is needed for network namespace tests)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Locks the first free subnet index.
fn take_subnet() -> anyhow::Result<(u8, File)> {
    fs::create_dir_all(LOCK_DIR).with_context(|| format!("creating {LOCK_DIR}"))?;
    for subnet in 0..SUBNETS {
        let path = PathBuf::from(LOCK_DIR).join(format!("net-{subnet}.lock"));
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        // SAFETY: flock on a valid open fd; LOCK_NB never blocks.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok((subnet, file));
        }
    }
    bail!("all {SUBNETS} test subnets in 198.18.0.0/16 are in use")
}
