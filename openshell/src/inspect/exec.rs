//! Runs the futures hyper hands to its executor (h2 streams, upstream connections and their
//! request-body pipes) inside the task that serves the client connection, instead of spawning
//! a tokio task for each.
//!
//! A request on an inspected connection passes the client-side connection, the stream's
//! handler and the upstream connection in turn. As separate tasks, each hand-over is a wake-up
//! that the multi-threaded runtime may deliver to the other worker thread (an eventfd or futex
//! wake and a context switch); in one task it is a poll of the next future.
//!
//! Dropping the connection's task (the proxy does when a new policy generation no longer
//! allows the connection) drops everything it runs, including a relayed upgrade.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use futures_util::task::AtomicWaker;
use tokio::sync::mpsc;

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The executor given to hyper: it queues futures for [`drive`].
#[derive(Clone)]
pub(super) struct ConnExec(mpsc::UnboundedSender<Queued>);

/// The receiving end, consumed by [`drive`].
pub(super) struct Tasks(mpsc::UnboundedReceiver<Queued>);

struct Queued {
    task: Task,
    /// Runs on after the connection's HTTP serving ends (an upgraded stream's relay).
    lingers: bool,
}

impl ConnExec {
    /// Runs `fut` in the connection's task, to completion even after the HTTP serving ended.
    pub(super) fn linger(&self, fut: impl Future<Output = ()> + Send + 'static) {
        let _ = self.0.send(Queued {
            task: Box::pin(fut),
            lingers: true,
        });
    }
}

pub(super) fn channel() -> (ConnExec, Tasks) {
    let (tx, rx) = mpsc::unbounded_channel();
    (ConnExec(tx), Tasks(rx))
}

impl<F> hyper::rt::Executor<F> for ConnExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        // The receiver lives as long as the connection's task; once it is gone, the future
        // belongs to a connection that has ended and has nothing left to do.
        let _ = self.0.send(Queued {
            task: Box::pin(fut),
            lingers: false,
        });
    }
}

/// Polls `main` together with every future queued on the executor, in the calling task, until
/// `main` completes. Futures still pending then belong to the ended connection and are dropped,
/// except those queued with [`ConnExec::linger`], which are driven to completion before `drive`
/// returns.
///
/// A wake-up that one of these futures gives another while they are being polled (the
/// client-side connection handing a request to its stream, the stream handing it to the
/// upstream connection) is served by another pass in the same poll, not by rescheduling the
/// task, which would let the runtime move it to the other worker thread.
pub(super) async fn drive<F: Future>(main: F, tasks: Tasks) -> F::Output {
    let Tasks(mut queued) = tasks;
    let mut running = FuturesUnordered::<Task>::new();
    let mut lingering = FuturesUnordered::<Task>::new();
    let mut main = std::pin::pin!(main);
    let inner = Arc::new(LocalWake::default());
    let waker = Waker::from(Arc::clone(&inner));
    let out = std::future::poll_fn(|cx| {
        inner.task.register(cx.waker());
        let mut local = Context::from_waker(&waker);
        for _ in 0..PASSES {
            inner.state.store(POLLING, Ordering::SeqCst);
            while let Poll::Ready(Some(q)) = queued.poll_recv(&mut local) {
                if q.lingers {
                    lingering.push(q.task);
                } else {
                    running.push(q.task);
                }
            }
            while let Poll::Ready(Some(())) = running.poll_next_unpin(&mut local) {}
            while let Poll::Ready(Some(())) = lingering.poll_next_unpin(&mut local) {}
            if let Poll::Ready(out) = main.as_mut().poll(&mut local) {
                inner.state.store(IDLE, Ordering::SeqCst);
                return Poll::Ready(out);
            }
            // Another pass if something was woken meanwhile, else wait for the next wake-up.
            if inner
                .state
                .compare_exchange(POLLING, IDLE, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                return Poll::Pending;
            }
        }
        // Still busy after a bounded number of passes: let the runtime run other tasks first.
        inner.state.store(IDLE, Ordering::SeqCst);
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await;
    drop(running);
    while let Ok(q) = queued.try_recv() {
        if q.lingers {
            lingering.push(q.task);
        }
    }
    while lingering.next().await.is_some() {}
    out
}

/// Passes per poll before the task yields to the runtime (tokio's own budget is 128 polls).
const PASSES: usize = 32;
const IDLE: u8 = 0;
const POLLING: u8 = 1;
const WOKEN: u8 = 2;

/// The waker the driven futures see: while [`drive`] polls them it only notes the wake-up
/// (`WOKEN`), otherwise it wakes the task.
#[derive(Default)]
struct LocalWake {
    state: AtomicU8,
    task: AtomicWaker,
}

impl Wake for LocalWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let noted = self
            .state
            .compare_exchange(POLLING, WOKEN, Ordering::SeqCst, Ordering::SeqCst);
        match noted {
            Ok(_) | Err(WOKEN) => {}
            Err(_) => self.task.wake(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor as _;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test]
    async fn queued_futures_run_in_the_driving_task_until_main_ends() {
        let (exec, tasks) = channel();
        let done = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let main = {
            let exec = exec.clone();
            let done = Arc::clone(&done);
            async move {
                for _ in 0..3 {
                    let done = Arc::clone(&done);
                    exec.execute(async move {
                        tokio::task::yield_now().await;
                        done.fetch_add(1, Ordering::SeqCst);
                    });
                }
                let waiter = Arc::clone(&done);
                exec.execute(async move {
                    // Completes only once the others have run, then lets main finish.
                    while waiter.load(Ordering::SeqCst) < 3 {
                        tokio::task::yield_now().await;
                    }
                    let _ = tx.send(());
                });
                let _ = rx.await;
                "main"
            }
        };
        let out = tokio::time::timeout(std::time::Duration::from_secs(5), drive(main, tasks))
            .await
            .expect("drive finished");
        assert_eq!(out, "main");
        assert_eq!(done.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn lingering_futures_run_to_completion_after_main_ends() {
        let (exec, tasks) = channel();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let finished = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&finished);
        exec.linger(async move {
            // Completes only after main has returned.
            let _ = rx.await;
            seen.fetch_add(1, Ordering::SeqCst);
        });
        let main = async move {
            tokio::task::yield_now().await;
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                let _ = tx.send(());
            });
            "main"
        };
        let out = tokio::time::timeout(std::time::Duration::from_secs(5), drive(main, tasks))
            .await
            .expect("drive finished");
        assert_eq!(out, "main");
        assert_eq!(finished.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn pending_futures_are_dropped_when_main_ends() {
        let (exec, tasks) = channel();
        let dropped = Arc::new(AtomicUsize::new(0));
        struct Guard(Arc<AtomicUsize>);
        impl Drop for Guard {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let guard = Guard(Arc::clone(&dropped));
        exec.execute(async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        });
        let main = async {
            tokio::task::yield_now().await;
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), drive(main, tasks))
            .await
            .expect("drive finished");
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
    }
}
