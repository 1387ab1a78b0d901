//! Privileged tests of "a sandbox cannot accept connections from other hosts": `bind4`/`bind6`
//! keep sandboxed listeners on loopback, and the `ingress` program closes the autobind hole
//! (`listen()` without `bind()`), while the sandbox's own outbound traffic keeps working.
//!
//! "Another host" is a peer in a test network namespace (`198.18.N.10`, `2001:2:0:N::10`)
//! dialling the test host's side of the veth pair (`198.18.N.1`, `2001:2:0:N::1`). Every
//! negative check has a positive twin (the same listener outside the cgroup, or the same
//! listener dialled over loopback), so the tests fail if the attack path itself is broken.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

mod ebpf_support;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    process::Command,
    time::Duration,
};

use ebpf_support::{Fixture, PROBE, Probe, accept, privileged};
use openshell_tests::netns::TestNet;

/// How long a connect may take before it counts as unanswered. A dropped SYN gets no answer
/// at all; a refused or accepted one is answered within milliseconds on a veth pair.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What happened to one TCP connect.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The handshake completed: the listener can accept this client.
    Connected,
    /// RST: nothing listens at that address.
    Refused,
    /// No answer: the SYN was dropped.
    Unanswered,
    Other(std::io::ErrorKind),
}

fn connect(addr: SocketAddr) -> Outcome {
    match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
        Ok(_) => Outcome::Connected,
        Err(e) => match e.kind() {
            std::io::ErrorKind::ConnectionRefused => Outcome::Refused,
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => Outcome::Unanswered,
            kind => Outcome::Other(kind),
        },
    }
}

/// A connect from the peer in the test network namespace: another host.
fn connect_from_peer(net: &TestNet, addr: SocketAddr) -> anyhow::Result<Outcome> {
    net.run(|| connect(addr))
}

/// A port that was free a moment ago (the probe binds it explicitly).
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Runs `ebpf-probe listen SPEC [--udp]`, in the sandbox cgroup or outside it.
fn listen(fx: &Fixture, inside: bool, spec: &str, udp: bool) -> anyhow::Result<Probe> {
    let mut cmd = if inside {
        fx.command_in_cgroup(PROBE)
    } else {
        Command::new(PROBE)
    };
    cmd.arg("listen").arg(spec);
    if udp {
        cmd.arg("--udp");
    }
    Probe::spawn(cmd)
}

fn local(probe: &Probe) -> SocketAddr {
    assert!(probe.ok(), "listen probe failed: {}", probe.line);
    probe
        .field("local")
        .expect("local=")
        .parse()
        .expect("a socket address")
}

const LO4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const LO6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

#[test]
fn wildcard_ipv4_bind_lands_on_loopback_and_other_hosts_cannot_connect() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let net = TestNet::new()?;
    let fx = Fixture::new("bind-any4")?;
    let port = free_port()?;
    let probe = listen(&fx, true, &format!("0.0.0.0:{port}"), false)?;
    assert_eq!(local(&probe), SocketAddr::new(LO4, port));
    assert_eq!(fx.interceptor().counters()?.bind_to_loopback, 1);

    let host = SocketAddr::new(net.host_v4().into(), port);
    assert_eq!(connect_from_peer(&net, host)?, Outcome::Refused);
    // This host itself, at its network address, does not reach it either.
    assert_eq!(connect(host), Outcome::Refused);
    assert_eq!(connect(SocketAddr::new(LO4, port)), Outcome::Connected);

    // The same bind outside the cgroup is reachable from the peer: the attack path works.
    let outside = listen(&fx, false, "0.0.0.0:0", false)?;
    let outside_port = local(&outside).port();
    assert_eq!(local(&outside).ip(), IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    assert_eq!(
        connect_from_peer(&net, SocketAddr::new(net.host_v4().into(), outside_port))?,
        Outcome::Connected
    );
    Ok(())
}

#[test]
fn wildcard_ipv6_binds_land_on_loopback_of_their_family() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let net = TestNet::new()?;
    let fx = Fixture::new("bind-any6")?;

    // `[::]:P` becomes `[::1]:P`: a dual-stack wildcard listener is reachable at [::1] only
    // (the kernel makes a socket bound to `::1` IPv6-only).
    let port = free_port()?;
    let probe = listen(&fx, true, &format!("[::]:{port}"), false)?;
    assert_eq!(local(&probe), SocketAddr::new(LO6, port));
    assert_eq!(
        connect_from_peer(&net, SocketAddr::new(net.host_v6().into(), port))?,
        Outcome::Refused
    );
    assert_eq!(
        connect_from_peer(&net, SocketAddr::new(net.host_v4().into(), port))?,
        Outcome::Refused
    );
    assert_eq!(connect(SocketAddr::new(LO6, port)), Outcome::Connected);
    assert_eq!(connect(SocketAddr::new(LO4, port)), Outcome::Refused);

    // `::ffff:0.0.0.0` (the IPv4 wildcard on an IPv6 socket) becomes `::ffff:127.0.0.1`.
    let port = free_port()?;
    let probe = listen(&fx, true, &format!("[::ffff:0.0.0.0]:{port}"), false)?;
    let mapped_lo = IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped());
    assert_eq!(local(&probe), SocketAddr::new(mapped_lo, port));
    assert_eq!(
        connect_from_peer(&net, SocketAddr::new(net.host_v4().into(), port))?,
        Outcome::Refused
    );
    assert_eq!(connect(SocketAddr::new(LO4, port)), Outcome::Connected);
    assert_eq!(fx.interceptor().counters()?.bind_to_loopback, 2);

    // `[::]:0` stays a dual-stack wildcard (rewriting it would make the socket IPv6-only and
    // break IPv4-mapped clients); the ingress program keeps other hosts out, as for autobind.
    let probe = listen(&fx, true, "[::]:0", false)?;
    let addr = local(&probe);
    assert_eq!(addr.ip(), IpAddr::V6(Ipv6Addr::UNSPECIFIED));
    for ip in [IpAddr::from(net.host_v6()), IpAddr::from(net.host_v4())] {
        assert_eq!(
            connect_from_peer(&net, SocketAddr::new(ip, addr.port()))?,
            Outcome::Unanswered,
            "{ip}"
        );
    }
    assert_eq!(
        connect(SocketAddr::new(LO6, addr.port())),
        Outcome::Connected
    );
    assert_eq!(
        connect(SocketAddr::new(LO4, addr.port())),
        Outcome::Connected
    );
    assert_eq!(fx.interceptor().counters()?.bind_to_loopback, 2);

    // Outside the cgroup a `::` listener answers the peer on both families.
    let outside = listen(&fx, false, "[::]:0", false)?;
    let outside_port = local(&outside).port();
    for ip in [IpAddr::from(net.host_v6()), IpAddr::from(net.host_v4())] {
        assert_eq!(
            connect_from_peer(&net, SocketAddr::new(ip, outside_port))?,
            Outcome::Connected,
            "{ip}"
        );
    }
    Ok(())
}

#[test]
fn binds_to_non_loopback_addresses_are_refused_loopback_binds_pass() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let net = TestNet::new()?;
    let fx = Fixture::new("bind-host")?;
    let refused = [
        (SocketAddr::new(net.host_v4().into(), 0), false),
        (SocketAddr::new(net.host_v4().into(), 0), true),
        (SocketAddr::new(net.host_v6().into(), 0), false),
        (SocketAddr::new(net.host_v6().into(), 0), true),
        (
            SocketAddr::new(net.host_v4().to_ipv6_mapped().into(), 0),
            false,
        ),
    ];
    for (addr, udp) in refused {
        let spec = addr.to_string();
        let inside = listen(&fx, true, &spec, udp)?;
        assert_eq!(
            inside.field("errno"),
            Some(libc::EPERM.to_string().as_str()),
            "{spec} udp={udp}: {}",
            inside.line
        );
        // Outside the cgroup the same bind works (the address is the host's own).
        let outside = listen(&fx, false, &spec, udp)?;
        assert_eq!(local(&outside).ip(), addr.ip(), "{spec} udp={udp}");
    }
    assert_eq!(fx.interceptor().counters()?.bind_denied, 5);

    for spec in [
        "127.0.0.1:0",
        "127.0.0.2:0",
        "[::1]:0",
        "[::ffff:127.0.0.1]:0",
    ] {
        let inside = listen(&fx, true, spec, false)?;
        let want: SocketAddr = spec.parse()?;
        assert_eq!(local(&inside).ip(), want.ip(), "{spec}");
    }
    let counters = fx.interceptor().counters()?;
    assert_eq!(counters.bind_denied, 5);
    assert_eq!(counters.bind_to_loopback, 0);
    Ok(())
}

/// `listen()` without `bind()` autobinds to the wildcard address and never runs the bind
/// hooks. The ingress program keeps such a listener reachable at loopback addresses only:
/// neither the peer nor this host at its network address gets an answer (the SYN is dropped).
#[test]
fn autobound_listeners_answer_only_on_loopback() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let net = TestNet::new()?;
    let fx = Fixture::new("autobind")?;

    let probe = listen(&fx, true, "auto4", false)?;
    let addr = local(&probe);
    assert_eq!(
        addr.ip(),
        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        "bind hook was skipped"
    );
    let port = addr.port();
    let host = SocketAddr::new(net.host_v4().into(), port);
    assert_eq!(connect_from_peer(&net, host)?, Outcome::Unanswered);
    assert_eq!(connect(host), Outcome::Unanswered);
    assert_eq!(connect(SocketAddr::new(LO4, port)), Outcome::Connected);
    assert!(fx.interceptor().counters()?.ingress_dropped > 0);

    let probe = listen(&fx, true, "auto6", false)?;
    let addr = local(&probe);
    assert_eq!(addr.ip(), IpAddr::V6(Ipv6Addr::UNSPECIFIED));
    let port = addr.port();
    for ip in [IpAddr::from(net.host_v6()), IpAddr::from(net.host_v4())] {
        assert_eq!(
            connect_from_peer(&net, SocketAddr::new(ip, port))?,
            Outcome::Unanswered,
            "{ip}"
        );
    }
    // A dual-stack autobound listener answers both loopbacks.
    assert_eq!(connect(SocketAddr::new(LO6, port)), Outcome::Connected);
    assert_eq!(connect(SocketAddr::new(LO4, port)), Outcome::Connected);

    // Outside the cgroup an autobound listener answers the peer.
    let outside = listen(&fx, false, "auto4", false)?;
    assert_eq!(
        connect_from_peer(
            &net,
            SocketAddr::new(net.host_v4().into(), local(&outside).port())
        )?,
        Outcome::Connected
    );
    Ok(())
}

/// A stand-in for the proxy: takes one redirected connection from `listener`, dials the
/// original destination (from outside the cgroup) and relays one line each way.
fn relay_one(fx: &Fixture, listener: &TcpListener) -> anyhow::Result<SocketAddr> {
    let (client, peer) = accept(listener)?;
    client.set_nonblocking(false)?;
    client.set_read_timeout(Some(Duration::from_secs(5)))?;
    let record = fx
        .interceptor()
        .take(peer)?
        .expect("a record for the redirected connection");
    let upstream = TcpStream::connect_timeout(&record.original_dst, CONNECT_TIMEOUT)?;
    upstream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(&client).read_line(&mut line)?;
    (&upstream).write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(&upstream).read_line(&mut reply)?;
    (&client).write_all(reply.as_bytes())?;
    Ok(record.original_dst)
}

/// The upstream test host: answers one line with `pong <what it got>`.
fn serve_one(server: &TcpListener) -> anyhow::Result<SocketAddr> {
    let (conn, from) = accept(server)?;
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    (&conn).write_all(format!("pong-{}\n", line.trim()).as_bytes())?;
    Ok(from)
}

#[test]
fn outbound_connections_work_end_to_end_with_the_ingress_filter() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let net = TestNet::new()?;
    let fx = Fixture::new("outbound")?;
    let server4 = net.run(|| TcpListener::bind((net.ns_v4(), 443)))??;
    let server6 = net.run(|| TcpListener::bind((net.ns_v6(), 443)))??;
    let cases = [
        (SocketAddr::from((net.ns_v4(), 443)), false),
        (SocketAddr::from((net.ns_v6(), 443)), true),
        (SocketAddr::from((net.ns_v4().to_ipv6_mapped(), 443)), false),
    ];
    for (dst, v6) in cases {
        let (listener, server) = if v6 {
            (&fx.listeners().tcp6, &server6)
        } else {
            (&fx.listeners().tcp4, &server4)
        };
        std::thread::scope(|s| -> anyhow::Result<()> {
            let upstream = s.spawn(|| serve_one(server));
            let proxy = s.spawn(|| relay_one(&fx, listener));
            let mut cmd = fx.command_in_cgroup(PROBE);
            cmd.arg("tcp-echo").arg(dst.to_string());
            let probe = Probe::spawn(cmd)?;
            let proxied_to = proxy.join().expect("proxy thread")?;
            let upstream_saw = upstream.join().expect("upstream thread")?;
            assert!(probe.ok(), "{dst}: {}", probe.line);
            assert_eq!(probe.field("reply"), Some("pong-ping"), "{dst}");
            // The sandbox's side of the connection is on loopback, the answer came back
            // through the ingress filter, and upstream saw the proxy's (host's) address.
            let local: SocketAddr = probe.field("local").expect("local=").parse()?;
            let on_loopback = match local.ip() {
                IpAddr::V4(ip) => ip.is_loopback(),
                IpAddr::V6(ip) => {
                    ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
                }
            };
            assert!(on_loopback, "{dst}: client side {local}");
            let canonical = |a: SocketAddr| match a.ip() {
                IpAddr::V6(ip) => ip
                    .to_ipv4_mapped()
                    .map_or(a, |v4| SocketAddr::from((v4, a.port()))),
                IpAddr::V4(_) => a,
            };
            assert_eq!(canonical(proxied_to), canonical(dst));
            let host_ip: IpAddr = if v6 {
                net.host_v6().into()
            } else {
                net.host_v4().into()
            };
            assert_eq!(upstream_saw.ip(), host_ip);
            Ok(())
        })?;
    }
    let counters = fx.interceptor().counters()?;
    assert_eq!(counters.tcp_redirected, 3);
    assert_eq!(
        counters.ingress_dropped, 0,
        "no answer to the sandbox's own traffic was dropped"
    );
    Ok(())
}

/// Makes `127.0.0.1` reachable from the peer over the veth pair, as on a host where
/// `route_localnet` is on (kube-proxy sets it; CVE-2020-8558): the test host accepts packets
/// for `127.0.0.0/8` on its veth end, and the peer routes `127.0.0.1` to the test host.
/// Both settings go away with the namespace (the sysctl belongs to the veth device).
fn route_peer_loopback_to_host(net: &TestNet) -> anyhow::Result<()> {
    let sysctl = format!(
        "/proc/sys/net/ipv4/conf/{}/route_localnet",
        net.host_interface()
    );
    std::fs::write(&sysctl, "1")?;
    let (host, peer) = (net.host_v4().to_string(), net.ns_v4().to_string());
    for args in [
        &[
            "route",
            "del",
            "local",
            "127.0.0.0/8",
            "dev",
            "lo",
            "table",
            "local",
        ][..],
        &[
            "route",
            "del",
            "local",
            "127.0.0.1",
            "dev",
            "lo",
            "table",
            "local",
        ][..],
        &["route", "add", "127.0.0.1/32", "via", &host, "src", &peer][..],
    ] {
        let out = Command::new("ip")
            .arg("-n")
            .arg(net.name())
            .args(args)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Runs `ebpf-probe udp-recv 127.0.0.1:PORT` while the peer sends datagrams to that address
/// over the veth pair; returns the probe's line.
fn udp_from_peer_to_loopback(fx: &Fixture, net: &TestNet, inside: bool) -> anyhow::Result<String> {
    let port = free_port()?;
    let dst = SocketAddr::new(LO4, port);
    let mut cmd = if inside {
        fx.command_in_cgroup(PROBE)
    } else {
        Command::new(PROBE)
    };
    cmd.arg("udp-recv").arg(dst.to_string());
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| -> anyhow::Result<String> {
        let sender = s.spawn(|| {
            net.run(|| -> anyhow::Result<()> {
                let socket = std::net::UdpSocket::bind((net.ns_v4(), 0))?;
                // Bounded: at most 50 datagrams, 100 ms apart, until the probe has answered.
                for _ in 0..50 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    socket.send_to(b"from-peer", dst)?;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Ok(())
            })
        });
        let probe = Probe::spawn(cmd);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        sender.join().expect("sender thread")??;
        Ok(probe?.line.clone())
    })
}

/// With `route_localnet` on, other hosts can send to `127.0.0.1` through a real interface. The
/// ingress program also checks that a packet came in on the loopback device, so a sandbox's
/// loopback listener still hears nothing from them.
#[test]
fn loopback_listeners_ignore_other_hosts_even_with_route_localnet() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let net = TestNet::new()?;
    let fx = Fixture::new("localnet")?;
    route_peer_loopback_to_host(&net)?;

    // The attack path works: a loopback socket outside the cgroup hears the peer.
    let outside = udp_from_peer_to_loopback(&fx, &net, false)?;
    assert!(
        outside.starts_with(&format!("ok from={}:", net.ns_v4())),
        "{outside}"
    );

    let before = fx.interceptor().counters()?.ingress_dropped;
    let inside = udp_from_peer_to_loopback(&fx, &net, true)?;
    assert_eq!(
        inside,
        format!(
            "err errno={} Resource temporarily unavailable (os error {})",
            libc::EAGAIN,
            libc::EAGAIN
        ),
        "a sandboxed loopback socket heard another host"
    );
    assert!(fx.interceptor().counters()?.ingress_dropped > before);
    Ok(())
}
