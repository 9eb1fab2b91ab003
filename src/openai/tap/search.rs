//! One-byte searches with their searcher built once (`Byte`), and the bytes the tap searches
//! for. Why not `memchr::memchr`: the tap searches a chunk of a few hundred bytes about six
//! times, and each call's dispatch and needle set-up were a fifth of its cost.

use std::sync::OnceLock;

/// `memchr::memchr`/`memrchr` for one byte, through an AVX2 searcher built once: the tap
/// searches a chunk of a few hundred bytes about six times, and each `memchr::memchr` call's
/// dispatch and needle set-up were a fifth of its cost. Without AVX2, the plain calls.
pub(crate) struct Byte {
    byte: u8,
    #[cfg(target_arch = "x86_64")]
    avx2: OnceLock<Option<memchr::arch::x86_64::avx2::memchr::One>>,
}

impl Byte {
    const fn new(byte: u8) -> Byte {
        Byte {
            byte,
            #[cfg(target_arch = "x86_64")]
            avx2: OnceLock::new(),
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn avx2(&self) -> Option<&memchr::arch::x86_64::avx2::memchr::One> {
        self.avx2
            .get_or_init(|| memchr::arch::x86_64::avx2::memchr::One::new(self.byte))
            .as_ref()
    }

    #[inline]
    pub(crate) fn find(&self, s: &[u8]) -> Option<usize> {
        #[cfg(target_arch = "x86_64")]
        if let Some(one) = self.avx2() {
            return one.find(s);
        }
        memchr::memchr(self.byte, s)
    }

    #[inline]
    pub(crate) fn rfind(&self, s: &[u8]) -> Option<usize> {
        #[cfg(target_arch = "x86_64")]
        if let Some(one) = self.avx2() {
            return one.rfind(s);
        }
        memchr::memrchr(self.byte, s)
    }
}

pub(super) static NEWLINE: Byte = Byte::new(b'\n');
pub(super) static UNDERSCORE: Byte = Byte::new(b'_');
pub(super) static BRACKET: Byte = Byte::new(b'[');
pub(super) static U: Byte = Byte::new(b'u');
