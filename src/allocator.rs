//! The process's global allocator: mimalloc, called through its plain entry points whenever a
//! layout allows it.
//!
//! Hand-written because the `mimalloc` crate's `GlobalAlloc` sends every request, whatever its
//! alignment, to `mi_malloc_aligned`. In mimalloc 3 that call has a fast path for small blocks
//! only; every allocation over 1 KiB (a request's boxed futures, read buffers, response heads)
//! goes through its generic aligned path (about 200 instructions under callgrind, against about
//! 30 for `mi_malloc`), and a block size that is not a power of two is over-allocated there by
//! `align - 1` bytes. (Known upstream: purpleprotocol/mimalloc_rust pull request 170, open.)
//! mimalloc's bins are multiples of 8 bytes (16 above 16) and every page starts its blocks
//! 16-aligned (`MI_PAGE_MIN_START_BLOCK_ALIGN`), so a layout whose alignment is at most 16 and
//! divides its size is satisfied by the plain call; any other layout keeps the aligned one.
//!
//! This file belongs to the binary, not the library: it is the project's only `unsafe` code
//! (the library forbids it).

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// `MI_MAX_ALIGN_SIZE`: the alignment every plain mimalloc block of a size it divides has.
const PLAIN_ALIGN: usize = 16;

pub struct Mimalloc;

/// Whether the plain (unaligned) entry points satisfy `align` for a block of `size` bytes.
#[inline]
fn plain(size: usize, align: usize) -> bool {
    align <= PLAIN_ALIGN && size.is_multiple_of(align)
}

/// `plain(size)` when `plain` holds for the layout, else `aligned(size, align)`: the one choice
/// `alloc` and `alloc_zeroed` share.
///
/// # Safety
/// Both calls must be mimalloc allocation functions of that signature.
#[inline]
#[allow(unsafe_code)]
unsafe fn allocate(
    layout: Layout,
    plain_call: unsafe extern "C" fn(usize) -> *mut c_void,
    aligned_call: unsafe extern "C" fn(usize, usize) -> *mut c_void,
) -> *mut u8 {
    let (size, align) = (layout.size(), layout.align());
    // SAFETY: the caller passes mimalloc's functions, which accept any size.
    unsafe {
        if plain(size, align) {
            plain_call(size).cast()
        } else {
            aligned_call(size, align).cast()
        }
    }
}

// SAFETY: every pointer handed out comes from mimalloc and is freed by `mi_free`, which takes
// blocks from both the plain and the aligned entry points. A plain call is made only when
// `plain` holds, where mimalloc's block layout guarantees the alignment (module header);
// `realloc` uses the plain call only when the old block was plain too and the new size keeps
// the rule, so a block from the aligned path is always resized by the aligned call.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: mimalloc's allocation calls accept any size; null reports failure.
        unsafe { allocate(layout, mi::mi_malloc, mi::mi_malloc_aligned) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe { allocate(layout, mi::mi_zalloc, mi::mi_zalloc_aligned) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator (the caller's contract), so from mimalloc.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let align = layout.align();
        // SAFETY: `ptr` came from this allocator with `layout` (the caller's contract).
        unsafe {
            if plain(layout.size(), align) && plain(new_size, align) {
                mi::mi_realloc(ptr.cast(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast(), new_size, align).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes from a few bytes to past the small-block limit, at alignments up to a page: each
    /// block comes back aligned (plain and zeroed), zeroed when asked, and keeps its bytes and
    /// its alignment when it grows or shrinks, whichever path it came from or goes to.
    #[test]
    #[allow(unsafe_code)]
    fn blocks_are_aligned_through_every_path() {
        let a = Mimalloc;
        for align in [1usize, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in (1..=2200).step_by(7).chain([1024, 4096, 8192, 65536]) {
                let layout = Layout::from_size_align(size, align).unwrap();
                for new_size in [size * 2 + 24, size / 3 + 1] {
                    let new_layout = Layout::from_size_align(new_size, align).unwrap();
                    // SAFETY: non-zero layouts; each block is written within its size and
                    // freed (or resized) with the layout it has.
                    unsafe {
                        let z = a.alloc_zeroed(layout);
                        assert!(!z.is_null());
                        assert_eq!(z as usize % align, 0, "zeroed {size}/{align}");
                        assert!((0..size).all(|i| *z.add(i) == 0));
                        a.dealloc(z, layout);

                        let p = a.alloc(layout);
                        assert!(!p.is_null());
                        assert_eq!(p as usize % align, 0, "alloc {size}/{align}");
                        p.write_bytes(0xab, size);
                        let q = a.realloc(p, layout, new_size);
                        assert!(!q.is_null());
                        assert_eq!(q as usize % align, 0, "realloc {size}->{new_size}/{align}");
                        let kept = size.min(new_size);
                        assert!((0..kept).all(|i| *q.add(i) == 0xab));
                        a.dealloc(q, new_layout);
                    }
                }
            }
        }
    }
}
