//! Privileged tests of the eBPF interception (issue 3): real cgroups, real programs, real
//! processes, test hosts in network namespaces. Run as root; they skip with a message otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

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

#[test]
fn ipv6_connect_is_redirected_and_recorded() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let net = TestNet::new()?;
    let fx = Fixture::new("v6")?;
    let host = net.run(|| std::net::TcpListener::bind((net.ns_v6(), 443)))??;
    let dst = SocketAddr::from((net.ns_v6(), 443));
    check_redirect(&fx, &host, dst, dst, true)
}

#[test]
fn ipv4_mapped_connect_is_handled_as_ipv4() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let net = TestNet::new()?;
    let fx = Fixture::new("mapped")?;
    let host = net.run(|| std::net::TcpListener::bind((net.ns_v4(), 443)))??;
    let mapped = SocketAddr::from((net.ns_v4().to_ipv6_mapped(), 443));
    let dst = SocketAddr::from((net.ns_v4(), 443));
    // Redirected to the IPv4 listener (as ::ffff:127.0.0.1), recorded as an IPv4 destination.
    check_redirect(&fx, &host, mapped, dst, false)
}

#[test]
fn tcp_to_port_53_is_redirected_like_any_tcp() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let net = TestNet::new()?;
    let fx = Fixture::new("tcp53")?;
    let host = net.run(|| std::net::TcpListener::bind((net.ns_v4(), 53)))??;
    let dst = SocketAddr::from((net.ns_v4(), 53));
    check_redirect(&fx, &host, dst, dst, false)
}

/// Runs `program` (a copy of or link to the probe) in the cgroup and returns the recorded exe.
fn recorded_exe(fx: &Fixture, net: &TestNet, program: &Path) -> anyhow::Result<Option<ExeId>> {
    let mut cmd = fx.command_in_cgroup(program);
    cmd.arg("tcp")
        .arg(SocketAddr::from((net.ns_v4(), 443)).to_string());
    let probe = Probe::spawn(cmd)?;
    assert!(probe.ok(), "probe failed: {}", probe.line);
    let (_conn, peer) = accept(&fx.listeners().tcp4)?;
    let record = fx.interceptor().lookup(peer)?.expect("record");
    assert_eq!(record.tgid, probe.pid());
    Ok(record.exe)
}

#[test]
fn copied_binary_and_symlink_are_told_apart() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let net = TestNet::new()?;
    let fx = Fixture::new("copy")?;
    let dir = tempdir("copy")?;
    let copy = dir.path.join("probe-copy");
    std::fs::copy(PROBE, &copy)?;
    let link = dir.path.join("probe-link");
    std::os::unix::fs::symlink(PROBE, &link)?;

    let original = ExeId::of_path(Path::new(PROBE))?;
    let copied = ExeId::of_path(&copy)?;
    assert_ne!(original, copied, "a copy has its own inode");

    assert_eq!(recorded_exe(&fx, &net, &copy)?, Some(copied));
    // The symlink resolves to the real binary, never to the link's own inode.
    let link_meta = std::fs::symlink_metadata(&link)?;
    let via_link = recorded_exe(&fx, &net, &link)?;
    assert_eq!(via_link, Some(original));
    assert_ne!(
        via_link.map(|e| e.ino),
        Some(std::os::unix::fs::MetadataExt::ino(&link_meta))
    );
    Ok(())
}

#[test]
fn exec_right_after_connect_keeps_the_connecting_binary() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let net = TestNet::new()?;
    let fx = Fixture::new("exec")?;
    let sleep = Path::new("/bin/sleep");
    let mut cmd = fx.command_in_cgroup(PROBE);
    cmd.arg("tcp")
        .arg(SocketAddr::from((net.ns_v4(), 443)).to_string())
        .args(["--exec", "/bin/sleep", "30"]);
    let probe = Probe::spawn(cmd)?;
    assert!(probe.ok(), "probe failed: {}", probe.line);
    // Wait (bounded) until the process runs the new binary.
    let exe_link = format!("/proc/{}/exe", probe.pid());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::read_link(&exe_link)?.file_name() != Some(std::ffi::OsStr::new("sleep")) {
        assert!(
            std::time::Instant::now() < deadline,
            "probe never exec'd sleep"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let (_conn, peer) = accept(&fx.listeners().tcp4)?;
    let record = fx.interceptor().lookup(peer)?.expect("record");
    assert_eq!(record.tgid, probe.pid());
    assert_eq!(record.exe, Some(ExeId::of_path(Path::new(PROBE))?));
    assert_ne!(record.exe, Some(ExeId::of_path(sleep)?));
    Ok(())
}

#[test]
fn a_thread_is_recorded_as_its_process() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let net = TestNet::new()?;
    let fx = Fixture::new("thread")?;
    let mut cmd = fx.command_in_cgroup(PROBE);
    cmd.arg("tcp")
        .arg(SocketAddr::from((net.ns_v4(), 443)).to_string())
        .arg("--thread");
    let probe = Probe::spawn(cmd)?;
    assert!(probe.ok(), "probe failed: {}", probe.line);
    let tid: u32 = probe.field("tid").expect("tid=").parse()?;
    assert_ne!(tid, probe.pid(), "the connect ran on another thread");
    let (_conn, peer) = accept(&fx.listeners().tcp4)?;
    let record = fx.interceptor().lookup(peer)?.expect("record");
    assert_eq!(record.tgid, probe.pid());
    Ok(())
}

#[test]
fn a_process_outside_the_cgroup_is_untouched() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let net = TestNet::new()?;
    let fx = Fixture::new("outside")?;
    let host = net.run(|| std::net::TcpListener::bind((net.ns_v4(), 443)))??;
    let dst = SocketAddr::from((net.ns_v4(), 443));
    let mut cmd = std::process::Command::new(PROBE);
    cmd.arg("tcp").arg(dst.to_string());
    let probe = Probe::spawn(cmd)?;
    assert!(probe.ok(), "probe failed: {}", probe.line);
    let (_conn, peer) = accept(&host)?;
    assert_eq!(probe.field("peer"), Some(dst.to_string().as_str()));
    assert!(
        !has_pending(&fx.listeners().tcp4)?,
        "an outside connect was redirected"
    );
    assert_eq!(fx.interceptor().lookup(peer)?, None);
    // The same probe inside the cgroup is redirected (the test can fail).
    check_redirect(&fx, &host, dst, dst, false)
}

#[test]
fn udp_to_other_ports_gets_eperm() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let net = TestNet::new()?;
    let fx = Fixture::new("udp")?;
    let before = fx.interceptor().counters()?.udp_denied;
    for (mode, addr) in [
        ("udp-sendto", SocketAddr::from((net.ns_v4(), 9999))),
        ("udp-connect", SocketAddr::from((net.ns_v4(), 123))),
        ("udp-sendto", SocketAddr::from((net.ns_v6(), 9999))),
        (
            "udp-connect",
            SocketAddr::from((net.ns_v4().to_ipv6_mapped(), 9999)),
        ),
    ] {
        let mut cmd = fx.command_in_cgroup(PROBE);
        cmd.arg(mode).arg(addr.to_string());
        let probe = Probe::spawn(cmd)?;
        assert_eq!(
            probe.field("errno"),
            Some("1"),
            "{mode} {addr}: {}",
            probe.line
        );
    }
    // The same send from outside the cgroup is allowed (it times out waiting for an answer,
    // which proves the kernel did not refuse it).
    let mut cmd = std::process::Command::new(PROBE);
    cmd.arg("udp-sendto")
        .arg(SocketAddr::from((net.ns_v4(), 9999)).to_string());
    let probe = Probe::spawn(cmd)?;
    assert_ne!(probe.field("errno"), Some("1"), "{}", probe.line);
    assert_eq!(fx.interceptor().counters()?.udp_denied, before + 4);
    Ok(())
}

/// Answers one DNS query on `socket` by echoing it with the QR bit set; returns the query.
fn answer_one(socket: &std::net::UdpSocket) -> anyhow::Result<Vec<u8>> {
    let mut buf = [0u8; 512];
    let (n, from) = socket.recv_from(&mut buf)?;
    let mut reply = buf[..n].to_vec();
    reply[2] |= 0x80;
    socket.send_to(&reply, from)?;
    Ok(buf[..n].to_vec())
}

#[test]
fn dns_to_any_resolver_reaches_the_dns_listener_and_the_answer_comes_back() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let net = TestNet::new()?;
    let fx = Fixture::new("dns")?;
    // A resolver in the test net, and one that does not exist at all (198.19.255.53).
    let nowhere: std::net::Ipv4Addr = "198.19.255.53".parse()?;
    let cases = [
        ("udp-sendto", SocketAddr::from((net.ns_v4(), 53)), false),
        ("udp-connect", SocketAddr::from((net.ns_v4(), 53)), false),
        ("udp-sendto", SocketAddr::from((nowhere, 53)), false),
        ("udp-sendto", SocketAddr::from((net.ns_v6(), 53)), true),
        ("udp-connect", SocketAddr::from((net.ns_v6(), 53)), true),
        (
            "udp-sendto",
            SocketAddr::from((nowhere.to_ipv6_mapped(), 53)),
            false,
        ),
    ];
    for (mode, resolver, v6) in cases {
        let mut cmd = fx.command_in_cgroup(PROBE);
        cmd.arg(mode).arg(resolver.to_string());
        let socket = if v6 {
            &fx.listeners().dns6
        } else {
            &fx.listeners().dns4
        };
        std::thread::scope(|s| -> anyhow::Result<()> {
            let server = s.spawn(|| answer_one(socket));
            let probe = Probe::spawn(cmd)?;
            let query = server.join().expect("DNS listener thread")?;
            assert_eq!(&query[..2], b"\x12\x34", "the DNS listener got the query");
            assert!(probe.ok(), "{mode} {resolver}: {}", probe.line);
            // The answer appears to come from the resolver the client asked.
            let from: SocketAddr = probe.field("from").expect("from=").parse()?;
            let canonical = |a: SocketAddr| match a.ip() {
                std::net::IpAddr::V6(ip) => ip
                    .to_ipv4_mapped()
                    .map_or(a, |v4| SocketAddr::from((v4, a.port()))),
                std::net::IpAddr::V4(_) => a,
            };
            assert_eq!(canonical(from), canonical(resolver), "{mode}");
            assert!(
                probe
                    .field("reply")
                    .is_some_and(|r| r.starts_with("12348100"))
            );
            if mode == "udp-connect" {
                let peer: SocketAddr = probe.field("peer").expect("peer=").parse()?;
                assert_eq!(
                    canonical(peer),
                    canonical(resolver),
                    "getpeername of a DNS socket"
                );
            }
            Ok(())
        })?;
    }
    Ok(())
}

#[test]
fn python_resolver_client_gets_its_answer() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let net = TestNet::new()?;
    let fx = Fixture::new("pydns")?;
    let script = "import socket,sys\n\
        s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(5)\n\
        q=bytes.fromhex('abcd01000001000000000000076578616d706c650474657374000001 0001'.replace(' ',''))\n\
        s.sendto(q,(sys.argv[1],53)); d,a=s.recvfrom(512)\n\
        print('ok from=%s:%d reply=%s' % (a[0],a[1],d.hex()))\n";
    let mut cmd = fx.command_in_cgroup("/usr/bin/python3");
    cmd.arg("-c").arg(script).arg(net.ns_v4().to_string());
    std::thread::scope(|s| -> anyhow::Result<()> {
        let server = s.spawn(|| answer_one(&fx.listeners().dns4));
        let probe = Probe::spawn(cmd)?;
        let query = server.join().expect("DNS listener thread")?;
        assert_eq!(&query[..2], b"\xab\xcd");
        assert_eq!(
            probe.field("from"),
            Some(format!("{}:53", net.ns_v4()).as_str()),
            "{}",
            probe.line
        );
        assert!(
            probe
                .field("reply")
                .is_some_and(|r| r.starts_with("abcd8100"))
        );
        Ok(())
    })
}

#[test]
fn with_the_listener_closed_connects_are_refused_not_direct() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let net = TestNet::new()?;
    let mut fx = Fixture::new("closed")?;
    let host = net.run(|| std::net::TcpListener::bind((net.ns_v4(), 443)))??;
    fx.listeners = None;
    let before = fx.interceptor().record_counts()?;
    for dst in [
        SocketAddr::from((net.ns_v4(), 443)),
        SocketAddr::from((net.ns_v4().to_ipv6_mapped(), 443)),
    ] {
        let mut cmd = fx.command_in_cgroup(PROBE);
        cmd.arg("tcp").arg(dst.to_string());
        let probe = Probe::spawn(cmd)?;
        assert_eq!(
            probe.field("errno"),
            Some(libc::ECONNREFUSED.to_string().as_str()),
            "{dst}: {}",
            probe.line
        );
    }
    assert!(
        !has_pending(&host)?,
        "a connect went direct while the listener was down"
    );
    // The refused connects leave no record for the proxy to find later.
    assert_eq!(fx.interceptor().record_counts()?, before);
    assert_eq!(fx.interceptor().counters()?.tcp_redirected, 2);
    Ok(())
}

#[test]
fn no_network_mode_refuses_everything_in_the_kernel() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let net = TestNet::new()?;
    let fx = Fixture::new("nonet")?;
    fx.interceptor()
        .set_mode(fx.cgroup.path(), openshell::ebpf::CgroupMode::NoNetwork)?;
    for (mode, dst) in [
        ("tcp", SocketAddr::from((net.ns_v4(), 443))),
        ("udp-sendto", SocketAddr::from((net.ns_v4(), 53))),
    ] {
        let mut cmd = fx.command_in_cgroup(PROBE);
        cmd.arg(mode).arg(dst.to_string());
        let probe = Probe::spawn(cmd)?;
        assert_eq!(probe.field("errno"), Some("1"), "{mode}: {}", probe.line);
    }
    assert_eq!(fx.interceptor().counters()?.no_network_denied, 2);
    fx.interceptor()
        .set_mode(fx.cgroup.path(), openshell::ebpf::CgroupMode::Intercept)?;
    let dst = SocketAddr::from((net.ns_v4(), 443));
    let host = net.run(|| std::net::TcpListener::bind((net.ns_v4(), 443)))??;
    check_redirect(&fx, &host, dst, dst, false)
}

#[test]
fn records_are_released_with_their_sockets() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let net = TestNet::new()?;
    let fx = Fixture::new("release")?;
    let baseline = fx.interceptor().record_counts()?.sockets;
    let dst = SocketAddr::from((net.ns_v4(), 443));
    let mut probes = Vec::new();
    for _ in 0..5 {
        let mut cmd = fx.command_in_cgroup(PROBE);
        cmd.arg("tcp").arg(dst.to_string());
        let probe = Probe::spawn(cmd)?;
        assert!(probe.ok(), "{}", probe.line);
        let (conn, peer) = accept(&fx.listeners().tcp4)?;
        probes.push((probe, conn, peer));
    }
    assert_eq!(fx.interceptor().record_counts()?.sockets, baseline + 5);
    // Closing the client sockets (the probes exit) releases their records.
    for (probe, conn, peer) in probes {
        drop(probe);
        drop(conn);
        // The peer-keyed record stays for the proxy until it takes it.
        assert!(fx.interceptor().take(peer)?.is_some());
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while fx.interceptor().record_counts()?.sockets != baseline {
        assert!(
            std::time::Instant::now() < deadline,
            "socket records leaked: {} live, {baseline} before",
            fx.interceptor().record_counts()?.sockets
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Ok(())
}

struct TempDir {
    path: std::path::PathBuf,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn tempdir(name: &str) -> anyhow::Result<TempDir> {
    let path = std::env::temp_dir().join(format!("openshell-ebpf-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&path)?;
    Ok(TempDir { path })
}
