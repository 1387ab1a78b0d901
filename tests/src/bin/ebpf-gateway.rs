//! A stand-in for the gateway process in the restart test: loads the interceptor with the given
//! listeners and pin directory, attaches it to a cgroup (pinning the links), prints
//! `attached newly=<bool>` and exits, leaving only the pins behind.
//!
//! Usage: `ebpf-gateway CGROUP_DIR BPFFS_DIR TCP4_ADDR DNS4_ADDR`

use std::path::PathBuf;

use anyhow::Context as _;
use openshell::ebpf::{Interceptor, InterceptorConfig};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [cgroup, bpffs, tcp4, dns4] = &args[..] else {
        anyhow::bail!("usage: ebpf-gateway CGROUP_DIR BPFFS_DIR TCP4_ADDR DNS4_ADDR");
    };
    let config = InterceptorConfig::new(
        tcp4.parse().context("TCP4_ADDR")?,
        dns4.parse().context("DNS4_ADDR")?,
        PathBuf::from(bpffs),
    );
    let mut interceptor = Interceptor::load(&config)?;
    let attachment = interceptor.attach(&PathBuf::from(cgroup))?;
    println!("attached newly={}", attachment.newly_attached());
    // Exiting closes every descriptor; the pinned links keep the programs attached.
    Ok(())
}
