//! One timer for a run of I/O operations that follow each other, each under its own timeout: a
//! client connection's reads and writes, and its requests' first-byte waits and upstream body
//! reads (`Downstream::alarm`).
//!
//! The operations must not overlap: the one `Sleep` serves one operation at a time, and an
//! operation polled beside another under the same alarm could move the timer past the other's
//! deadline. The request path is sequential; the client watch (`relay::watch_client`), which runs
//! beside the exchange, keeps its own timer.
//!
//! Why not `monoio::time::timeout` around each one: every call reads the clock, puts a timer in
//! the wheel and takes it out again when the operation ends first, which it nearly always does. A
//! 16-token stream did that 34 times. Here one `Sleep` stays armed across the operations: it is
//! set no later than `step` after an operation starts, `step` being at most the shortest timeout
//! in use, so the next operation's deadline is later than the armed one and keeping it costs
//! nothing. When it rings before the running operation's deadline, it is set again, closer to it;
//! an operation only fails once the timer rings at or past its own deadline, so every timeout
//! still ends exactly where `timeout` would have ended it (the timer wheel's millisecond).
//!
//! A wrong `step` costs speed, never correctness: a deadline earlier than the armed one moves the
//! timer there at once.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use monoio::time::{Instant as At, Sleep};

use crate::clock;

/// The operation ran past its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Elapsed;

pub(crate) struct Alarm {
    /// Boxed so the alarm can move with whoever owns it; one allocation per alarm.
    sleep: Pin<Box<Sleep>>,
    /// No operation arms the timer further away than this from its start.
    step: Duration,
}

impl Alarm {
    /// An alarm for operations whose timeouts are all at least `step`. Its timer starts at the
    /// farthest deadline there is, so the first operation sets it.
    pub(crate) fn new(step: Duration) -> Alarm {
        let never = At::from_std(clock::deadline(Duration::MAX));
        Alarm {
            sleep: Box::pin(monoio::time::sleep_until(never)),
            step: step.max(Duration::from_millis(1)),
        }
    }

    /// Runs `fut`, started at `now`, for at most `timeout`.
    pub(crate) fn within<F: Future>(
        &mut self,
        now: Instant,
        timeout: Duration,
        fut: F,
    ) -> Until<'_, F> {
        self.until(now, clock::after(now, timeout), fut)
    }

    /// Runs `fut`, started at `now`, until `deadline`.
    pub(crate) fn until<F: Future>(
        &mut self,
        now: Instant,
        deadline: Instant,
        fut: F,
    ) -> Until<'_, F> {
        let soon = clock::after(now, self.step).min(deadline);
        // A timer that rang (while no operation ran, or ending the last one) is set anew.
        if self.sleep.is_elapsed() || soon < self.sleep.deadline().into_std() {
            self.set(soon);
        }
        Until {
            alarm: self,
            deadline,
            fut,
        }
    }

    fn set(&mut self, at: Instant) {
        self.sleep.as_mut().reset(At::from_std(at));
    }
}

pin_project_lite::pin_project! {
    /// An operation under an `Alarm`: a named future rather than an `async fn`, whose state
    /// would hold the operation twice (as its argument and pinned), and every open stream holds
    /// one.
    pub(crate) struct Until<'a, F> {
        alarm: &'a mut Alarm,
        deadline: Instant,
        #[pin]
        fut: F,
    }
}

impl<F: Future> Future for Until<'_, F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.fut.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        let (alarm, deadline) = (&mut **this.alarm, *this.deadline);
        while alarm.sleep.as_mut().poll(cx).is_ready() {
            let rang = alarm.sleep.deadline().into_std();
            if rang >= deadline {
                return Poll::Ready(Err(Elapsed));
            }
            // Rang for an earlier operation, or a step short of this one's deadline.
            alarm.set(clock::after(rang, alarm.step).min(deadline));
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::testing::block_on;

    const MS: Duration = Duration::from_millis(1);

    /// An operation that never ends.
    fn forever() -> std::future::Pending<()> {
        std::future::pending()
    }

    /// How long `alarm.within(now, timeout, forever())` took to fail.
    async fn fails_after(alarm: &mut Alarm, timeout: Duration) -> Duration {
        let now = Instant::now();
        assert_eq!(alarm.within(now, timeout, forever()).await, Err(Elapsed));
        now.elapsed()
    }

    #[test]
    fn an_operation_that_ends_in_time_is_not_touched() {
        block_on(async {
            let mut alarm = Alarm::new(20 * MS);
            for _ in 0..3 {
                let sleep = monoio::time::sleep(5 * MS);
                let out = alarm.within(Instant::now(), 40 * MS, async {
                    sleep.await;
                    7
                });
                assert_eq!(out.await, Ok(7));
            }
        });
    }

    /// The timer rings at `step` and at every step after; the operation still runs its whole
    /// timeout, and not much more.
    #[test]
    fn a_timeout_longer_than_the_step_ends_at_its_own_deadline() {
        block_on(async {
            let mut alarm = Alarm::new(10 * MS);
            let took = fails_after(&mut alarm, 55 * MS).await;
            assert!(took >= 55 * MS, "{took:?}");
            assert!(took < 55 * MS + 40 * MS, "{took:?}");
        });
    }

    /// A step longer than a timeout (a timeout under the configured minimum) is not waited for.
    #[test]
    fn a_timeout_shorter_than_the_step_is_not_late() {
        block_on(async {
            let mut alarm = Alarm::new(Duration::from_secs(60));
            let took = fails_after(&mut alarm, 20 * MS).await;
            assert!(took >= 20 * MS && took < 60 * MS, "{took:?}");
        });
    }

    /// An operation with a long timeout, then one with a short one: the timer armed for the
    /// first does not make the second wait for it.
    #[test]
    fn a_shorter_deadline_after_a_longer_one_moves_the_timer_closer() {
        block_on(async {
            let mut alarm = Alarm::new(Duration::from_secs(60));
            let quick = alarm.within(Instant::now(), Duration::from_secs(30), async { 1 });
            assert_eq!(quick.await, Ok(1));
            let took = fails_after(&mut alarm, 20 * MS).await;
            assert!(took >= 20 * MS && took < 60 * MS, "{took:?}");
        });
    }

    /// Operations that end between rings: the timer armed by an earlier one rings during a later
    /// one, which goes on to its own deadline.
    #[test]
    fn a_ring_meant_for_an_earlier_operation_does_not_end_a_later_one() {
        block_on(async {
            let mut alarm = Alarm::new(30 * MS);
            // Armed 30 ms from here; this one ends after 20.
            let first = alarm.within(Instant::now(), 30 * MS, monoio::time::sleep(20 * MS));
            assert_eq!(first.await, Ok(()));
            // Rings 10 ms into this one, which has 25 ms to go: it ends.
            let start = Instant::now();
            let second = alarm.within(start, 30 * MS, monoio::time::sleep(25 * MS));
            assert_eq!(second.await, Ok(()));
            assert!(start.elapsed() >= 25 * MS);
            // And a failing one after it still gets its whole timeout.
            let took = fails_after(&mut alarm, 30 * MS).await;
            assert!(took >= 30 * MS && took < 70 * MS, "{took:?}");
        });
    }
}
