//! Write buffers a core hands from one response to the next. A response head and the body bytes
//! that came with it go out in one buffer of a kilobyte and a half or more: past glibc's
//! per-thread cache (about 1 KiB), so allocating and freeing it went through the main allocator on
//! every request (about 800 instructions of a 32k-instruction request, callgrind). A core keeps a
//! few returned buffers instead, bounded in number and size (at most `HELD` x `MAX_BYTES`), and
//! never shares them: like everything in `Worker`, this is one core's.

use std::cell::RefCell;

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
}
