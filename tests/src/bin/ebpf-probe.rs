//! A small client for the eBPF tests: it opens one connection or sends one datagram and prints
//! what it saw, one `key=value` line, so the tests can compare it with what the kernel recorded.
//!
//! - `ebpf-probe tcp ADDR [--thread] [--exec PROGRAM ARGS...] [--hold]`: connect, print
//!   `ok local=.. peer=.. pid=.. tid=..`, then exec PROGRAM (if given), or with `--hold` wait
//!   (at most 10 s) until the peer closes or resets the connection, or else wait for stdin to
//!   close.
//! - `ebpf-probe udp-sendto ADDR` / `udp-connect ADDR`: send a DNS-shaped query, print
//!   `ok from=.. peer=.. reply=<hex>` for the first answer (5 s timeout).
//! - `ebpf-probe tcp-echo ADDR`: connect, send `ping\n`, print `ok local=.. reply=<line>`.
//! - `ebpf-probe udp-recv ADDR`: bind a UDP socket to ADDR, wait up to 3 s for one datagram,
//!   print `ok from=.. data=..`.
//! - `ebpf-probe listen ADDR|auto4|auto6 [--udp]`: bind to ADDR (TCP: and listen), or for
//!   `auto4`/`auto6` create a TCP socket and `listen()` without `bind()` (the kernel autobinds to
//!   the wildcard address); print `ok local=..` (what `getsockname` says), then wait for stdin to
//!   close. Connections are left in the accept queue.
//!
//! Errors print `err errno=N what` and exit 2.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::unix::process::CommandExt as _,
    time::Duration,
};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match run(&args) {
        Ok(()) => 0,
        Err(e) => {
            println!("err errno={} {e}", e.raw_os_error().unwrap_or(0));
            2
        }
    };
    std::process::exit(code);
}

fn tid() -> i64 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::syscall(libc::SYS_gettid) }
}

fn parse(addr: Option<&String>) -> std::io::Result<SocketAddr> {
    addr.and_then(|a| a.parse().ok())
        .ok_or_else(|| std::io::Error::other("usage: ebpf-probe MODE ADDR"))
}

fn run(args: &[String]) -> std::io::Result<()> {
    let mode = args.first().map(String::as_str).unwrap_or_default();
    if mode == "listen" {
        return listen(
            args.get(1).map(String::as_str).unwrap_or_default(),
            &args[2..],
        );
    }
    let addr = parse(args.get(1))?;
    match mode {
        "tcp-echo" => {
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.write_all(b"ping\n")?;
            let mut reply = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(&stream), &mut reply)?;
            println!("ok local={} reply={}", stream.local_addr()?, reply.trim());
            Ok(())
        }
        "tcp" => {
            let rest = &args[2..];
            let in_thread = rest.first().is_some_and(|a| a == "--thread");
            let stream = if in_thread {
                std::thread::spawn(move || connect(addr))
                    .join()
                    .map_err(|_| std::io::Error::other("connect thread panicked"))??
            } else {
                connect(addr)?
            };
            std::io::stdout().flush()?;
            if let Some(pos) = rest.iter().position(|a| a == "--exec") {
                let program = rest
                    .get(pos + 1)
                    .ok_or_else(|| std::io::Error::other("--exec needs a program"))?;
                // Keep the connection open across exec so the test can still accept it.
                let fd = std::os::fd::IntoRawFd::into_raw_fd(stream);
                // SAFETY: clears FD_CLOEXEC on a descriptor this process owns.
                if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                return Err(std::process::Command::new(program)
                    .args(&rest[pos + 2..])
                    .exec());
            }
            if rest.iter().any(|a| a == "--hold") {
                // Stay alive until the peer closes or resets the connection (bounded), so the
                // proxy judges a live process, as it would a real client waiting for its answer.
                let mut stream = stream;
                stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                let mut sink = Vec::new();
                let _ = stream.read_to_end(&mut sink);
                return Ok(());
            }
            let mut sink = Vec::new();
            std::io::stdin().read_to_end(&mut sink)?;
            drop(stream);
            Ok(())
        }
        "udp-recv" => {
            let socket = UdpSocket::bind(addr)?;
            socket.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut buf = [0u8; 512];
            let (n, from) = socket.recv_from(&mut buf)?;
            println!("ok from={from} data={}", String::from_utf8_lossy(&buf[..n]));
            Ok(())
        }
        "udp-sendto" | "udp-connect" => {
            let bind: SocketAddr = if addr.is_ipv4() {
                "0.0.0.0:0".parse().map_err(std::io::Error::other)?
            } else {
                "[::]:0".parse().map_err(std::io::Error::other)?
            };
            let socket = UdpSocket::bind(bind)?;
            socket.set_read_timeout(Some(Duration::from_secs(5)))?;
            // A DNS query for `example.test. A`, id 0x1234.
            let query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x04test\x00\x00\x01\x00\x01";
            let peer = if mode == "udp-connect" {
                socket.connect(addr)?;
                socket.send(query)?;
                socket.peer_addr()?.to_string()
            } else {
                socket.send_to(query, addr)?;
                "-".to_owned()
            };
            let mut buf = [0u8; 512];
            let (n, from) = socket.recv_from(&mut buf)?;
            let hex: String = buf[..n].iter().map(|b| format!("{b:02x}")).collect();
            println!("ok from={from} peer={peer} reply={hex}");
            Ok(())
        }
        _ => Err(std::io::Error::other(
            "usage: ebpf-probe tcp|tcp-echo|udp-sendto|udp-connect|listen ADDR",
        )),
    }
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    println!(
        "ok local={} peer={} pid={} tid={}",
        stream.local_addr()?,
        stream.peer_addr()?,
        std::process::id(),
        tid()
    );
    Ok(stream)
}

fn listen(spec: &str, rest: &[String]) -> std::io::Result<()> {
    let udp = rest.first().is_some_and(|a| a == "--udp");
    // The socket stays open (as an OwnedFd) until stdin closes.
    let (_socket, local): (std::os::fd::OwnedFd, SocketAddr) = match (spec, udp) {
        ("auto4" | "auto6", false) => {
            let family = if spec == "auto4" {
                libc::AF_INET
            } else {
                libc::AF_INET6
            };
            // SAFETY: plain socket(2) call; the result is checked.
            let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: `fd` is a fresh socket this function owns from here on.
            let listener =
                unsafe { <std::net::TcpListener as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            // SAFETY: listen(2) on the socket owned by `listener`; no bind(2) before it.
            if unsafe { libc::listen(fd, 16) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let local = listener.local_addr()?;
            (listener.into(), local)
        }
        (_, false) => {
            let listener = std::net::TcpListener::bind(parse(Some(&spec.to_owned()))?)?;
            let local = listener.local_addr()?;
            (listener.into(), local)
        }
        (_, true) => {
            let socket = UdpSocket::bind(parse(Some(&spec.to_owned()))?)?;
            let local = socket.local_addr()?;
            (socket.into(), local)
        }
    };
    println!("ok local={local}");
    std::io::stdout().flush()?;
    let mut sink = Vec::new();
    std::io::stdin().read_to_end(&mut sink)?;
    Ok(())
}
