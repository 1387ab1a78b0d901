//! A gateway restart keeps enforcement on: the programs stay attached through their pinned links
//! while no gateway runs (connects are refused, never direct), and the next gateway re-adopts
//! the pins instead of attaching twice.
//!
//! Gateway A is a real process (`ebpf-gateway`) that loads, attaches, pins and exits; the test
//! process plays gateway B.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

mod ebpf_support;

use std::net::SocketAddr;

use ebpf_support::{Fixture, Listeners, PROBE, Probe, accept, has_pending, privileged};
use openshell::ebpf::{ExeId, Interceptor};
use openshell_tests::netns::TestNet;

const GATEWAY: &str = env!("CARGO_BIN_EXE_ebpf-gateway");

#[test]
fn restart_keeps_enforcement_and_re_adopts_pins() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let net = TestNet::new()?;
    let host = net.run(|| std::net::TcpListener::bind((net.ns_v4(), 443)))??;
    let dst = SocketAddr::from((net.ns_v4(), 443));
    let mut fx = Fixture::new("restart")?;
    // The fixture's own attachment stands for nothing here: start from a bare cgroup.
    fx.attachment.take().expect("attachment").detach()?;
    drop(fx.interceptor.take());
    let listeners_a = Listeners::bind()?;
    let config_a = listeners_a.config(&fx.bpffs_dir)?;

    // Gateway A: a separate process that attaches, pins and exits.
    let out = std::process::Command::new(GATEWAY)
        .arg(fx.cgroup.path())
        .arg(&fx.bpffs_dir)
        .arg(config_a.tcp_v4.to_string())
        .arg(config_a.dns_v4.to_string())
        .output()?;
    assert!(
        out.status.success(),
        "gateway A failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "attached newly=true"
    );
    // A's listeners go away with it.
    drop(listeners_a);
    drop(fx.listeners.take());

    let mut cmd = fx.command_in_cgroup(PROBE);
    cmd.arg("tcp").arg(dst.to_string());
    let probe = Probe::spawn(cmd)?;
    assert_eq!(
        probe.field("errno"),
        Some(libc::ECONNREFUSED.to_string().as_str()),
        "with no gateway a connect must be refused: {}",
        probe.line
    );
    assert!(
        !has_pending(&host)?,
        "a connect went direct while no gateway ran"
    );
    drop(probe);
    // The listening rules hold too: a wildcard bind still lands on loopback.
    let mut cmd = fx.command_in_cgroup(PROBE);
    cmd.args(["listen", "0.0.0.0:0"]);
    let probe = Probe::spawn(cmd)?;
    assert!(
        probe
            .field("local")
            .is_some_and(|l| l.starts_with("127.0.0.1:")),
        "with no gateway a wildcard bind must land on loopback: {}",
        probe.line
    );
    drop(probe);

    // Gateway B starts with new listener ports and re-adopts the pins.
    let listeners = Listeners::bind()?;
    let mut interceptor = Interceptor::load(&listeners.config(&fx.bpffs_dir)?)?;
    let attachment = interceptor.attach(fx.cgroup.path())?;
    assert!(
        !attachment.newly_attached(),
        "B must re-adopt A's links, not attach again"
    );
    fx.attachment = Some(attachment);
    fx.interceptor = Some(interceptor);
    fx.listeners = Some(listeners);

    let before = fx.interceptor().counters()?;
    assert_eq!(
        before.tcp_redirected, 1,
        "the refused connect was redirected by A's programs"
    );
    let mut cmd = fx.command_in_cgroup(PROBE);
    cmd.arg("tcp").arg(dst.to_string());
    let probe = Probe::spawn(cmd)?;
    assert!(probe.ok(), "after the restart: {}", probe.line);
    let (_conn, peer) = accept(&fx.listeners().tcp4)?;
    let record = fx
        .interceptor()
        .lookup(peer)?
        .expect("B sees the records of A's programs");
    assert_eq!(record.original_dst, dst);
    assert_eq!(record.tgid, probe.pid());
    assert_eq!(
        record.exe,
        Some(ExeId::of_path(std::path::Path::new(PROBE))?)
    );
    // Counters survive in the pinned map, and one connect ran connect4 exactly once: the
    // programs are attached once, not twice.
    let after = fx.interceptor().counters()?;
    assert!(
        before.tcp_redirected >= 1,
        "A's counts are kept: {before:?}"
    );
    assert_eq!(after.tcp_redirected, before.tcp_redirected + 1);
    assert_eq!(after.bind_to_loopback, 1, "bind4 ran once for the one bind");
    assert!(!has_pending(&host)?);

    // take() consumes the record.
    assert!(fx.interceptor().take(peer)?.is_some());
    assert_eq!(fx.interceptor().lookup(peer)?, None);
    Ok(())
}

#[test]
fn detach_removes_enforcement_and_pins() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let net = TestNet::new()?;
    let host = net.run(|| std::net::TcpListener::bind((net.ns_v4(), 443)))??;
    let dst = SocketAddr::from((net.ns_v4(), 443));
    let mut fx = Fixture::new("detach")?;
    // Detach through the Interceptor (as a restarted gateway would, without the Attachment).
    drop(fx.attachment.take());
    let cgroup = fx.cgroup.path().to_path_buf();
    fx.interceptor
        .as_mut()
        .expect("interceptor")
        .detach(&cgroup)?;
    let version = format!("v{}", openshell::ebpf::LAYOUT_VERSION);
    let links = std::fs::read_dir(fx.bpffs_dir.join(version).join("links"))?.count();
    assert_eq!(links, 0, "no link pins left");

    let mut cmd = fx.command_in_cgroup(PROBE);
    cmd.arg("tcp").arg(dst.to_string());
    let probe = Probe::spawn(cmd)?;
    assert!(probe.ok(), "{}", probe.line);
    accept(&host)?;
    assert!(!has_pending(&fx.listeners().tcp4)?);
    // Binds are left alone again.
    let mut cmd = fx.command_in_cgroup(PROBE);
    cmd.args(["listen", "0.0.0.0:0"]);
    let probe = Probe::spawn(cmd)?;
    assert!(
        probe
            .field("local")
            .is_some_and(|l| l.starts_with("0.0.0.0:")),
        "{}",
        probe.line
    );
    Ok(())
}
