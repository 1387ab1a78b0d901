//! Privileged tests of the eBPF interception (issue 3): real cgroups, real programs, real
//! processes, test hosts in network namespaces. Run as root; they skip with a message otherwise.

mod ebpf_support;

use std::{net::SocketAddr, path::Path};

use ebpf_support::{Fixture, PROBE, Probe, accept, has_pending, privileged};
use openshell::ebpf::ExeId;
use openshell_tests::netns::TestNet;

/// Connects from inside the cgroup to `dst` and checks what the listener and `lookup` see.
fn check_redirect(
    fx: &Fixture,
    net_listener: &std::net::TcpListener,
    dst: SocketAddr,
    expect_dst: SocketAddr,
    v6_listener: bool,
) -> anyhow::Result<()> {
    let mut cmd = fx.command_in_cgroup(PROBE);
    cmd.arg("tcp").arg(dst.to_string());
    let probe = Probe::spawn(cmd)?;
    assert!(probe.ok(), "probe failed: {}", probe.line);
    let listener = if v6_listener {
        &fx.listeners().tcp6
    } else {
        &fx.listeners().tcp4
    };
    let (_conn, peer) = accept(listener)?;
    // The listener's peer is the probe's own socket (ports agree; the probe may print an
    // IPv4-mapped form of the same address).
    let local: SocketAddr = probe.field("local").expect("local=").parse()?;
    assert_eq!(local.port(), peer.port());
    let record = fx
        .interceptor()
        .lookup(peer)?
        .expect("a record for the redirected connection");
    assert_eq!(record.original_dst, expect_dst);
    assert_eq!(record.tgid, probe.pid());
    assert_eq!(record.parent_tgid, Some(std::process::id()));
    assert_eq!(record.exe, Some(ExeId::of_path(Path::new(PROBE))?));
    assert_eq!(
        record.cgroup_id,
        std::fs::metadata(fx.cgroup.path()).map(|m| std::os::unix::fs::MetadataExt::ino(&m))?
    );
    // getpeername shows the destination the program asked for.
    assert_eq!(probe.field("peer"), Some(dst.to_string().as_str()));
    // Nothing reached the test host directly.
    assert!(
        !has_pending(net_listener)?,
        "the connection went direct to the test host"
    );
    Ok(())
}

#[test]
fn ipv4_connect_is_redirected_and_recorded() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let net = TestNet::new()?;
    let fx = Fixture::new("v4")?;
    let host = net.run(|| std::net::TcpListener::bind((net.ns_v4(), 443)))??;
    let dst = SocketAddr::from((net.ns_v4(), 443));
    check_redirect(&fx, &host, dst, dst, false)
}
