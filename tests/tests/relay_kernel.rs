//! The in-kernel relay (`RelayMode::Kernel`) against real TCP connections on loopback, with the
//! real eBPF object loaded: both directions with half-close, a large stream byte for byte, an
//! exchange that keeps up staying in the kernel, a reader that falls behind moving the
//! direction to user space, bytes that were waiting before the sockets were joined, a reset on
//! revocation, and the user-space fallback without a kernel relay. Needs root.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

mod ebpf_support;

use std::{io, sync::Arc, time::Duration};

use ebpf_support::Fixture;
use openshell::{
    ebpf::KernelRelay,
    proxy::relay::{RelayEnd, RelayMode, RelayOutcome, relay},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

const TIMEOUT: Duration = Duration::from_secs(30);

fn kernel_relay(name: &str) -> Option<(Fixture, Arc<KernelRelay>)> {
    if !openshell_tests::is_root() {
        eprintln!("skipped: the kernel relay needs root (eBPF)");
        return None;
    }
    let fixture = Fixture::new(name).expect("fixture");
    let kernel = fixture
        .interceptor()
        .kernel_relay()
        .expect("this kernel supports the sockmap relay");
    Some((fixture, kernel))
}

/// A kernel relay over two fresh loopback pairs (`None`: skipped, not root). The fixture keeps
/// the eBPF object loaded for the test's length.
async fn joined(name: &str) -> Option<(Fixture, Running)> {
    let (fixture, kernel) = kernel_relay(name)?;
    let run = start(Some(&kernel), pair().await, pair().await);
    Some((fixture, run))
}

/// A connected pair on loopback: (the side the relay gets, its peer).
async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (b.unwrap().0, a.unwrap())
}

struct Running {
    client: TcpStream,
    server: TcpStream,
    task: JoinHandle<RelayOutcome>,
    revoke: tokio::sync::oneshot::Sender<()>,
}

/// Starts a relay over (proxy's client side, proxy's upstream side) with `peers` (client,
/// server) as the outer ends.
fn start(
    kernel: Option<&Arc<KernelRelay>>,
    (proxy_client_side, client): (TcpStream, TcpStream),
    (proxy_upstream_side, server): (TcpStream, TcpStream),
) -> Running {
    let (revoke, rx) = tokio::sync::oneshot::channel::<()>();
    let kernel = kernel.cloned();
    let task = tokio::spawn(async move {
        relay(
            proxy_client_side,
            proxy_upstream_side,
            RelayMode::Kernel,
            kernel.as_deref(),
            async {
                // A dropped sender means "never revoked".
                if rx.await.is_err() {
                    std::future::pending::<()>().await;
                }
            },
        )
        .await
    });
    Running {
        client,
        server,
        task,
        revoke,
    }
}

fn pattern(len: usize, seed: usize) -> Vec<u8> {
    (0..len).map(|i| ((i + seed) % 251) as u8).collect()
}

async fn finish(task: JoinHandle<RelayOutcome>) -> RelayOutcome {
    tokio::time::timeout(TIMEOUT, task).await.unwrap().unwrap()
}

/// Request with half-close from the client, then the response with half-close from the
/// server; both byte for byte. `before`: bytes the relay moved (client → server, back) before.
async fn exchange(
    run: Running,
    request: Vec<u8>,
    response: Vec<u8>,
    before: (u64, u64),
) -> RelayOutcome {
    let Running {
        mut client,
        mut server,
        task,
        revoke: _revoke,
    } = run;
    let sizes = (request.len() as u64, response.len() as u64);
    let expected_request = request.clone();
    let expected_response = response.clone();
    let server_side = tokio::spawn(async move {
        let mut got = Vec::new();
        tokio::time::timeout(TIMEOUT, server.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert!(got == expected_request, "the request arrived altered");
        // The client's write side is shut; the response must still reach it.
        server.write_all(&response).await.unwrap();
        server.shutdown().await.unwrap();
    });
    client.write_all(&request).await.unwrap();
    client.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(TIMEOUT, client.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    server_side.await.unwrap();
    assert!(got == expected_response, "the response arrived altered");
    let outcome = finish(task).await;
    assert!(matches!(outcome.end, RelayEnd::Finished), "{outcome:?}");
    assert_eq!(outcome.sent, before.0 + sizes.0);
    assert_eq!(outcome.received, before.1 + sizes.1);
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_relays_both_directions_with_half_close() {
    let Some((_fixture, run)) = joined("krelay-half").await else {
        return;
    };
    let outcome = exchange(run, pattern(3 << 20, 1), pattern((5 << 20) + 3, 7), (0, 0)).await;
    // The kernel forwarded (the first bytes of each direction at least).
    assert!(outcome.in_kernel > 0, "{outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_relays_a_large_stream_byte_for_byte() {
    let Some((_fixture, run)) = joined("krelay-large").await else {
        return;
    };
    let outcome = exchange(run, pattern(64 << 20, 3), b"done".to_vec(), (0, 0)).await;
    // The kernel forwards the first bytes at least (user space takes over once the server's
    // side falls behind; `a_reader_that_falls_behind_moves_the_direction_to_user_space`).
    assert!(outcome.in_kernel > 0, "{outcome:?}");
}

/// Request and response in lockstep, 16 KiB each way per round with a pause of 1 ms between
/// rounds (an interactive pace, well below bulk), 4 MiB in all each way: the kernel never runs
/// ahead of a peer that keeps up, and user space keeps raising the credit, so both directions
/// stay in the kernel for the whole connection, far past the 1 MiB it may hold queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_keeps_up_stays_in_the_kernel() {
    let Some((_fixture, run)) = joined("krelay-lockstep").await else {
        return;
    };
    let Running {
        mut client,
        mut server,
        task,
        revoke: _revoke,
    } = run;
    const CHUNK: usize = 16 << 10;
    const ROUNDS: usize = 256;
    let server_side = tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        for round in 0..ROUNDS {
            server.read_exact(&mut buf).await.unwrap();
            assert!(
                buf == pattern(CHUNK, round),
                "request {round} arrived altered"
            );
            server.write_all(&pattern(CHUNK, round + 1)).await.unwrap();
        }
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        server.shutdown().await.unwrap();
    });
    let mut buf = vec![0u8; CHUNK];
    for round in 0..ROUNDS {
        client.write_all(&pattern(CHUNK, round)).await.unwrap();
        tokio::time::timeout(TIMEOUT, client.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            buf == pattern(CHUNK, round + 1),
            "response {round} arrived altered"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    client.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(TIMEOUT, client.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());
    tokio::time::timeout(TIMEOUT, server_side)
        .await
        .unwrap()
        .unwrap();
    let outcome = finish(task).await;
    assert!(matches!(outcome.end, RelayEnd::Finished), "{outcome:?}");
    let each_way = (CHUNK * ROUNDS) as u64;
    assert_eq!((outcome.sent, outcome.received), (each_way, each_way));
    assert_eq!(outcome.in_kernel, 2 * each_way, "{outcome:?}");
}

/// The server reads nothing until the client's writes stall, then everything: the kernel ran
/// 1 MiB ahead of the server's side, so user space took the direction over for good, and the
/// 48 MiB arrive byte for byte, most of them relayed in user space.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_falls_behind_moves_the_direction_to_user_space() {
    let Some((_fixture, run)) = joined("krelay-behind").await else {
        return;
    };
    let Running {
        mut client,
        mut server,
        task,
        revoke: _revoke,
    } = run;
    const TOTAL: usize = 48 << 20;
    const CHUNK: usize = 256 << 10;
    let data = pattern(TOTAL, 5);
    let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let progress = std::sync::Arc::clone(&written);
    let sent = data.clone();
    let client_side = tokio::spawn(async move {
        for chunk in sent.chunks(CHUNK) {
            client.write_all(chunk).await.unwrap();
            progress.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
        }
        client.shutdown().await.unwrap();
        client
    });
    // Stalled: no progress for half a second (bounded by TIMEOUT).
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let mut last = usize::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = written.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            now < TOTAL,
            "the client wrote everything to a server that read nothing"
        );
        if now == last {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the client never stalled"
        );
        last = now;
    }
    let mut got = Vec::new();
    tokio::time::timeout(TIMEOUT, server.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert!(got == data, "the stream arrived altered");
    server.shutdown().await.unwrap();
    let _client = client_side.await.unwrap();
    let outcome = finish(task).await;
    assert!(matches!(outcome.end, RelayEnd::Finished), "{outcome:?}");
    assert_eq!(outcome.sent, TOTAL as u64);
    assert!(outcome.in_kernel > 0, "{outcome:?}");
    // What the kernel forwarded was written before the stall (`last` counts whole chunks, the
    // chunk in progress may have been partly written); everything after went through user
    // space.
    assert!(
        outcome.in_kernel <= (last + CHUNK) as u64,
        "{outcome:?}, stalled at {last}"
    );
}

/// Waits until `socket` has `len` bytes queued for reading (they arrived at the proxy's
/// socket before the relay joined it).
async fn wait_queued(socket: &TcpStream, len: usize) {
    use std::os::fd::AsRawFd as _;
    for _ in 0..2000 {
        let mut queued: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int for an open socket.
        let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::FIONREAD, &raw mut queued) };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        if usize::try_from(queued).unwrap() >= len {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{len} bytes never arrived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_waiting_before_the_join_arrive_first_and_in_order() {
    let Some((_fixture, kernel)) = kernel_relay("krelay-early") else {
        return;
    };
    // Both peers send before the relay starts: the client right after connecting, the server
    // a greeting. Then nothing more, until each has read what the other sent first.
    let (proxy_client_side, mut client) = pair().await;
    let (proxy_upstream_side, mut server) = pair().await;
    let early_request = pattern(100_000, 11);
    let greeting = pattern(70_000, 13);
    client.write_all(&early_request).await.unwrap();
    server.write_all(&greeting).await.unwrap();
    wait_queued(&proxy_client_side, early_request.len()).await;
    wait_queued(&proxy_upstream_side, greeting.len()).await;
    let run = start(
        Some(&kernel),
        (proxy_client_side, client),
        (proxy_upstream_side, server),
    );
    let Running {
        mut client,
        mut server,
        task,
        revoke: _revoke,
    } = run;
    let mut got = vec![0u8; early_request.len()];
    tokio::time::timeout(TIMEOUT, server.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert!(got == early_request, "the early request arrived altered");
    let mut got = vec![0u8; greeting.len()];
    tokio::time::timeout(TIMEOUT, client.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert!(got == greeting, "the greeting arrived altered");
    // The rest of the exchange follows the early bytes, in order.
    let run = Running {
        client,
        server,
        task,
        revoke: _revoke,
    };
    let before = (early_request.len() as u64, greeting.len() as u64);
    exchange(run, pattern(2 << 20, 17), pattern(3 << 20, 19), before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_speaks_first_and_closes_while_the_client_still_sends() {
    let Some((_fixture, run)) = joined("krelay-order").await else {
        return;
    };
    // Half-close the other way round: the server sends and shuts its side first; the client
    // keeps sending afterwards, and the server reads it all.
    let Running {
        mut client,
        mut server,
        task,
        revoke: _revoke,
    } = run;
    let response = pattern(4 << 20, 23);
    let request = pattern(6 << 20, 29);
    server.write_all(&response).await.unwrap();
    server.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(TIMEOUT, client.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert!(got == response, "the response arrived altered");
    let expected = request.clone();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        tokio::time::timeout(TIMEOUT, server.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert!(got == expected, "the request arrived altered");
    });
    client.write_all(&request).await.unwrap();
    client.shutdown().await.unwrap();
    reader.await.unwrap();
    let outcome = finish(task).await;
    assert!(matches!(outcome.end, RelayEnd::Finished), "{outcome:?}");
    assert!(outcome.in_kernel > 0, "{outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_kernel_relay_resets_both_sides() {
    let Some((_fixture, run)) = joined("krelay-revoke").await else {
        return;
    };
    let Running {
        mut client,
        mut server,
        task,
        revoke,
    } = run;
    client.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    tokio::time::timeout(TIMEOUT, server.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"hello");
    revoke.send(()).unwrap();
    let outcome = finish(task).await;
    assert!(matches!(outcome.end, RelayEnd::Revoked), "{outcome:?}");
    for side in [&mut client, &mut server] {
        let mut rest = Vec::new();
        let err = tokio::time::timeout(TIMEOUT, side.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_reset_reaches_the_client_through_a_kernel_relay() {
    let Some((_fixture, run)) = joined("krelay-reset").await else {
        return;
    };
    let Running {
        mut client,
        server,
        task,
        revoke: _revoke,
    } = run;
    openshell::proxy::relay::reset(&server);
    drop(server);
    let outcome = finish(task).await;
    assert!(matches!(outcome.end, RelayEnd::Failed(_)), "{outcome:?}");
    let mut rest = Vec::new();
    let err = tokio::time::timeout(TIMEOUT, client.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_kernel_relay_the_kernel_mode_copies_in_user_space() {
    let run = start(None, pair().await, pair().await);
    let outcome = exchange(run, pattern(1 << 20, 31), pattern(2 << 20, 37), (0, 0)).await;
    assert_eq!(outcome.in_kernel, 0, "{outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_does_not_read_stops_the_sender() {
    let Some((_fixture, run)) = joined("krelay-slow").await else {
        return;
    };
    let Running {
        mut client,
        mut server,
        task,
        revoke: _revoke,
    } = run;
    // The server reads nothing. The client writes until no write has gone through for a
    // second: the kernel must not take more than socket buffers' worth on the relay's behalf.
    let chunk = vec![7u8; 1 << 20];
    let mut written: usize = 0;
    let limit: usize = 1 << 30;
    while written < limit {
        match tokio::time::timeout(Duration::from_secs(1), client.write(&chunk)).await {
            Ok(Ok(n)) => written += n,
            Ok(Err(e)) => panic!("write failed: {e}"),
            Err(_) => break,
        }
    }
    eprintln!("accepted before blocking: {written} bytes");
    assert!(
        written < 128 << 20,
        "{written} bytes queued for a reader that reads nothing"
    );
    // Everything accepted arrives once the server reads.
    client.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(TIMEOUT, server.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.len(), written);
    assert!(got.iter().all(|b| *b == 7));
    drop(server);
    drop(client);
    let _ = finish(task).await;
}

/// The server closed before the relay started (its FIN already at the proxy; a socket past
/// ESTABLISHED cannot join the map, so the relay copies): the client sees a clean end of
/// stream, 50 times in a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_closed_before_the_join() {
    let Some((_fixture, kernel)) = kernel_relay("krelay-closed") else {
        return;
    };
    for _ in 0..50 {
        let (proxy_upstream_side, server) = pair().await;
        drop(server);
        tokio::time::sleep(Duration::from_millis(2)).await;
        let (proxy_client_side, client) = pair().await;
        // `start` wants the server end too; this one is the closed server's stand-in.
        let (_, stand_in) = pair().await;
        let Running {
            mut client, task, ..
        } = start(
            Some(&kernel),
            (proxy_client_side, client),
            (proxy_upstream_side, stand_in),
        );
        let mut rest = Vec::new();
        let read = tokio::time::timeout(TIMEOUT, client.read_to_end(&mut rest))
            .await
            .unwrap();
        assert!(read.is_ok(), "{read:?}");
        drop(client);
        let outcome = finish(task).await;
        assert!(matches!(outcome.end, RelayEnd::Finished), "{outcome:?}");
    }
}
