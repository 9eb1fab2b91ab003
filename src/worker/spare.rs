//! Write buffers a core hands from one response to the next. A response head and the body bytes
//! that came with it go out in one buffer of a kilobyte and a half or more: past glibc's
//! per-thread cache (about 1 KiB), so allocating and freeing it went through the main allocator on
//! every request (about 800 instructions of a 32k-instruction request, callgrind). A core keeps a
//! few returned buffers instead, bounded in number and size (at most `HELD` x `MAX_BYTES`), and
//! never shares them: like everything in `Worker`, this is one core's.

use std::cell::RefCell;

use crate::openai::tap::{Kind, Tap, DEFAULT_MAX_EVENT};

/// Most buffers a core keeps.
const HELD: usize = 8;
/// Larger buffers (a long body's) are freed, not kept.
const MAX_BYTES: usize = 16 * 1024;

#[derive(Default)]
pub(crate) struct Spare(RefCell<Vec<Vec<u8>>>);

impl Spare {
    /// An empty buffer with room for at least `min` bytes.
    pub(crate) fn take(&self, min: usize) -> Vec<u8> {
        let mut buf = self.0.borrow_mut().pop().unwrap_or_default();
        buf.reserve(min);
        buf
    }

    /// Keeps `buf` for a later `take`, unless the core holds enough or it is too large.
    pub(crate) fn give(&self, mut buf: Vec<u8>) {
        let mut held = self.0.borrow_mut();
        if held.len() < HELD && (1..=MAX_BYTES).contains(&buf.capacity()) {
            buf.clear();
            held.push(buf);
        }
    }
}

/// Most usage taps a core keeps.
const TAPS_HELD: usize = 16;

/// Usage taps a core hands from one exchange to the next, with the buffers inside them (a
/// JSON body kept until it is parsed, an SSE event's pending bytes, the last usage's text):
/// a fresh box and a fresh body buffer cost every request two allocations, two frees and a
/// copy of the tap into its box. Bounded like the write buffers (`TAPS_HELD`, each tap's
/// buffers at most `MAX_BYTES`); a tap comes back reset, so one that is taken holds nothing of
/// its last exchange.
// Boxes, not taps: the box itself is what an exchange holds (`Exchange::tap`), so keeping it
// is keeping that allocation.
#[allow(clippy::vec_box)]
#[derive(Default)]
pub(crate) struct Taps(RefCell<Vec<Box<Tap>>>);

impl Taps {
    /// A tap that watches nothing yet (`Kind::None`), as `Tap::new` makes one.
    pub(crate) fn take(&self) -> Box<Tap> {
        self.0
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Box::new(Tap::new(Kind::None)))
    }

    /// Keeps `tap` for a later `take`, reset, unless the core holds enough or its buffers are
    /// too large.
    pub(crate) fn give(&self, mut tap: Box<Tap>) {
        let mut held = self.0.borrow_mut();
        if held.len() < TAPS_HELD && tap.kept_bytes() <= MAX_BYTES {
            tap.reset(Kind::None, DEFAULT_MAX_EVENT);
            held.push(tap);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_empty_and_bounded() {
        let spare = Spare::default();
        let mut b = spare.take(1500);
        assert!(b.capacity() >= 1500);
        b.extend_from_slice(b"head and body");
        let at = b.as_ptr();
        spare.give(b);
        let again = spare.take(100);
        assert!(again.is_empty() && again.capacity() >= 1500);
        assert_eq!(
            again.as_ptr(),
            at,
            "the same allocation is handed out again"
        );
        // Too large, or too many: freed.
        spare.give(Vec::with_capacity(MAX_BYTES + 1));
        for _ in 0..HELD + 3 {
            spare.give(Vec::with_capacity(64));
        }
        assert_eq!(spare.0.borrow().len(), HELD);
        assert!(spare.0.borrow().iter().all(|b| b.capacity() <= MAX_BYTES));
    }

    #[test]
    fn taps_come_back_reset_and_bounded() {
        let taps = Taps::default();
        let mut tap = taps.take();
        tap.reset(Kind::OpenAiJson, 1024);
        let body = br#"{"usage":{"prompt_tokens":4,"completion_tokens":6,"total_tokens":10}}"#;
        tap.feed(body, &mut |_: &[u8]| {});
        tap.finish(&mut |_: &[u8]| {});
        assert_eq!(tap.usage().map(|u| u.total_tokens), Some(10));
        let at: *const Tap = &*tap;
        let kept = tap.kept_bytes();
        assert!(kept >= body.len());
        taps.give(tap);
        let again = taps.take();
        assert!(
            std::ptr::eq(at, &*again),
            "the same box is handed out again"
        );
        assert_eq!(again.usage(), None, "nothing of the last exchange");
        assert_eq!(again.kept_bytes(), kept, "with its buffer");
        // A tap whose buffers grew too large is freed; at most TAPS_HELD are kept.
        let mut big = Box::new(Tap::new(Kind::OpenAiJson));
        big.feed(&vec![b' '; MAX_BYTES + 1], &mut |_: &[u8]| {});
        taps.give(big);
        assert!(taps.0.borrow().is_empty());
        for _ in 0..TAPS_HELD + 3 {
            taps.give(Box::new(Tap::new(Kind::None)));
        }
        assert_eq!(taps.0.borrow().len(), TAPS_HELD);
    }
}
