//! `timeout`, as `monoio::time::timeout` does it, but with its timer taken from a per-core pool
//! and given back when the timeout ends, so that a request's half-dozen timeouts allocate,
//! register and cancel no timer entry of their own.
//!
//! Why not monoio's: its `Timeout` holds a `Sleep` inline, and a `Sleep`'s timer entry is 640
//! bytes aligned to 128. Every future that awaits one inline inherits that alignment, so the
//! boxed exchange future (`proxy::handle`) was allocated with `posix_memalign` on every request
//! (about 800 instructions, outside glibc's per-thread cache), and every timeout built, moved,
//! registered and cancelled (under the timer driver's lock) a fresh entry. A pooled timer is a
//! pointer in the awaiting future; taking one is a `Vec::pop` and a `Sleep::reset`, which for a
//! later deadline than the timer last had only moves the expiry (monoio's wheel notices when it
//! reaches the old tick).
//!
//! A timer given back keeps its deadline and the waker it was polled with, and only the task that
//! polled it may take it again (on a core, one connection's task: everything a request does runs
//! in it). monoio's timer keeps the first waker it is polled with until it fires, never replacing
//! it (unlike tokio's), and a poll after it fired stores the poller's waker again: a timer that
//! went to another task would wake the wrong one. This is sound across a task's end: a timer that
//! holds a task's waker keeps that task's header alive, so no other task can have its address; one
//! that holds none is safe for anyone. A timer nobody takes before its deadline fires once and
//! wakes its task, which polls and finds nothing to do.
//!
//! The pool is bounded (`KEEP`, the oldest dropped first, as monoio drops a timer: deregistered),
//! and a take looks only at the last `SCAN` timers given back; otherwise a new timer is made. What
//! the pool keeps of a finished connection until its timers are dropped is its task's small
//! header (a connection's future is boxed apart and freed when it ends). Per core, never shared:
//! the pool is a thread local, as monoio's own runtime context is.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Poll, RawWakerVTable, Waker};
use std::time::{Duration, Instant};

use monoio::time::Sleep;

/// Idle timers kept per core: a few per connection of a busy core, few enough (about 700 bytes
/// each) not to matter.
const KEEP: usize = 256;
/// Timers given back last that a take considers: a core's recent requests' timers, so a
/// connection usually finds its own.
const SCAN: usize = 16;

/// The task a timer's waker belongs to: what `Waker::will_wake` compares. The address stays that
/// task's while the timer holds its waker (the waker keeps the task alive).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Owner(*const (), *const RawWakerVTable);

impl Owner {
    fn of(w: &Waker) -> Owner {
        Owner(w.data(), w.vtable())
    }
}

struct Idle {
    sleep: Pin<Box<Sleep>>,
    owner: Owner,
}

thread_local! {
    static POOL: RefCell<VecDeque<Idle>> = const { RefCell::new(VecDeque::new()) };
}

/// The timeout elapsed before the future finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Elapsed;

/// A pooled timer for one timeout, armed by the task `owner`; back to the pool when dropped.
struct Timer {
    sleep: Option<Pin<Box<Sleep>>>,
    owner: Owner,
}

impl Timer {
    /// A timer for `deadline`, for the task that `waker` wakes.
    fn until(deadline: Instant, waker: &Waker) -> Timer {
        let owner = Owner::of(waker);
        let pooled = POOL.with(|p| {
            let mut p = p.borrow_mut();
            let from = p.len().saturating_sub(SCAN);
            let at = (from..p.len()).rev().find(|&i| p[i].owner == owner)?;
            p.remove(at).map(|idle| idle.sleep)
        });
        let sleep = match pooled {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline.into());
                sleep
            }
            None => Box::pin(monoio::time::sleep_until(deadline.into())),
        };
        Timer {
            sleep: Some(sleep),
            owner,
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        if let Some(sleep) = self.sleep.take() {
            let owner = self.owner;
            // A thread being torn down has no pool left: the timer is then simply dropped.
            let _ = POOL.try_with(|p| {
                let mut p = p.borrow_mut();
                if p.len() >= KEEP {
                    p.pop_front();
                }
                p.push_back(Idle { sleep, owner });
            });
        }
    }
}

/// Runs `fut` for at most `d`: its output, or `Elapsed` (and `fut` dropped) once `d` has passed.
pub(crate) async fn timeout<F: Future>(d: Duration, fut: F) -> Result<F::Output, Elapsed> {
    timeout_at(crate::clock::deadline(d), fut).await
}

/// Runs `fut` until `deadline`: its output, or `Elapsed` (and `fut` dropped) once it has passed.
pub(crate) async fn timeout_at<F: Future>(deadline: Instant, fut: F) -> Result<F::Output, Elapsed> {
    let mut fut = std::pin::pin!(fut);
    // The future first: most finish on their first poll, before a timer is needed at all.
    let mut timer: Option<Timer> = None;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(out));
        }
        let t = timer.get_or_insert_with(|| Timer::until(deadline, cx.waker()));
        match t.sleep.as_mut().map(|sleep| sleep.as_mut().poll(cx)) {
            Some(Poll::Pending) => Poll::Pending,
            _ => Poll::Ready(Err(Elapsed)),
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<F: Future>(f: F) -> F::Output {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    fn pooled() -> usize {
        POOL.with(|p| p.borrow().len())
    }

    #[test]
    fn a_ready_future_needs_no_timer() {
        run(async {
            assert_eq!(timeout(Duration::from_secs(1), async { 7 }).await, Ok(7));
            assert_eq!(pooled(), 0);
        });
    }

    #[test]
    fn a_slow_future_times_out_and_its_timer_is_reused() {
        run(async {
            let slow = monoio::time::sleep(Duration::from_secs(5));
            let started = Instant::now();
            assert_eq!(timeout(Duration::from_millis(20), slow).await, Err(Elapsed));
            assert!(started.elapsed() < Duration::from_secs(2));
            assert_eq!(pooled(), 1);
            // The fired timer, reused with a later deadline, lets a quicker future finish...
            let quick = async {
                monoio::time::sleep(Duration::from_millis(5)).await;
                "done"
            };
            assert_eq!(timeout(Duration::from_secs(5), quick).await, Ok("done"));
            assert_eq!(pooled(), 1);
            // ...and, reused with an earlier deadline than that, still fires in time.
            let slow = monoio::time::sleep(Duration::from_secs(5));
            let started = Instant::now();
            assert_eq!(timeout(Duration::from_millis(20), slow).await, Err(Elapsed));
            assert!(started.elapsed() < Duration::from_secs(2));
            assert_eq!(pooled(), 1);
        });
    }

    async fn times_out_in_20ms() -> (Result<(), Elapsed>, Duration) {
        let slow = monoio::time::sleep(Duration::from_secs(5));
        let started = Instant::now();
        let out = timeout(Duration::from_millis(20), slow).await;
        (out, started.elapsed())
    }

    async fn times_out_in_time(task: impl Future<Output = (Result<(), Elapsed>, Duration)>) {
        let (out, took) = task.await;
        assert_eq!(out, Err(Elapsed));
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    #[test]
    fn a_timer_is_taken_again_only_by_its_own_task() {
        run(async {
            let quick = || monoio::time::sleep(Duration::from_millis(2));
            // This task arms a timer and gives it back armed; taking it again, it reuses it.
            assert_eq!(timeout(Duration::from_secs(10), quick()).await, Ok(()));
            assert_eq!(timeout(Duration::from_secs(10), quick()).await, Ok(()));
            assert_eq!(pooled(), 1);
            // Another task must not get it: monoio would keep waking this one, never that one.
            times_out_in_time(monoio::spawn(times_out_in_20ms())).await;
            assert_eq!(pooled(), 2);
            // Nor a fired one: polled once after firing, it holds its task's waker again. A
            // new task whose timeouts took the fired timer above would never be woken.
            times_out_in_time(monoio::spawn(times_out_in_20ms())).await;
            assert_eq!(pooled(), 3);
        });
    }

    #[test]
    fn concurrent_timeouts_take_separate_timers() {
        run(async {
            let a = timeout(
                Duration::from_millis(30),
                monoio::time::sleep(Duration::from_secs(5)),
            );
            let b = timeout(
                Duration::from_secs(5),
                monoio::time::sleep(Duration::from_millis(5)),
            );
            let (a, b) = futures_util::future::join(a, b).await;
            assert_eq!((a, b), (Err(Elapsed), Ok(())));
            assert_eq!(pooled(), 2);
        });
    }

    #[test]
    fn the_pool_is_bounded() {
        run(async {
            let many: Vec<_> = (0..KEEP + 10)
                .map(|_| {
                    monoio::spawn(timeout(
                        Duration::from_millis(10),
                        monoio::time::sleep(Duration::from_secs(5)),
                    ))
                })
                .collect();
            for task in many {
                assert_eq!(task.await, Err(Elapsed));
            }
            assert_eq!(pooled(), KEEP);
            // Full, the pool drops its oldest timer for the newest.
            assert_eq!(
                timeout(Duration::from_secs(1), async {
                    monoio::time::sleep(Duration::from_millis(1)).await
                })
                .await,
                Ok(())
            );
            assert_eq!(pooled(), KEEP);
        });
    }
}
