//! The binary's allocator: mimalloc, called the way std's `System` calls
//! `malloc`.
//!
//! The `mimalloc` crate's `GlobalAlloc` sends every allocation to
//! `mi_malloc_aligned`, whatever its alignment. When the size class's free
//! list is empty, that path takes mimalloc's generic *aligned* route, which
//! over-allocates by the alignment and aligns by hand: callgrind counted
//! ~230 instructions per allocation of the broker's, against ~30 on the
//! plain path. A Rust alignment up to 16 (`max_align_t`) with a size at
//! least that large is what `mi_malloc` gives anyway (mimalloc aligns every
//! block of 16 bytes or more to 16, smaller ones to 8), so those go to the
//! plain entry points, and only larger alignments to the aligned ones.

use libmimalloc_sys as mi;
use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

/// `malloc`'s guaranteed alignment on x86-64 and aarch64.
const PLAIN_ALIGN: usize = 16;

/// mimalloc, through its plain entry points when they give the alignment.
pub struct MiMalloc;

#[inline]
fn plain(align: usize, size: usize) -> bool {
    align <= PLAIN_ALIGN && align <= size
}

// SAFETY: every pointer comes from mimalloc and goes back to it; the plain
// entry points are used only where their alignment satisfies the layout.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: mimalloc's C API; `layout` is valid.
        unsafe {
            if plain(layout.align(), layout.size()) {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        unsafe {
            if plain(layout.align(), layout.size()) {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _: Layout) {
        // SAFETY: `ptr` came from this allocator.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator with `layout`.
        unsafe {
            if plain(layout.align(), new_size) {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fills `size` bytes at `p` with the pattern [`holds`] checks.
    unsafe fn fill(p: *mut u8, size: usize) {
        for i in 0..size {
            // SAFETY: the caller's block holds `size` bytes.
            unsafe { *p.add(i) = i as u8 };
        }
    }

    unsafe fn holds(p: *const u8, len: usize) -> bool {
        // SAFETY: the caller's block holds `len` bytes.
        (0..len).all(|i| unsafe { *p.add(i) } == i as u8)
    }

    /// Every layout gets memory aligned as asked, through both routes, and
    /// `realloc` keeps the alignment and the contents.
    #[test]
    fn blocks_are_aligned_as_asked_and_realloc_keeps_them() {
        let a = MiMalloc;
        let sizes = [1, 3, 8, 12, 15, 16, 17, 24, 40, 48, 100, 224, 4096, 70_000];
        for align in [1, 2, 4, 8, 16, 32, 64, 4096] {
            for &size in &sizes {
                let layout = Layout::from_size_align(size, align).expect("layout");
                for zeroed in [false, true] {
                    // SAFETY: valid non-zero layouts; every access is within
                    // the block's current size; each block is freed once.
                    unsafe {
                        let mut p = if zeroed {
                            a.alloc_zeroed(layout)
                        } else {
                            a.alloc(layout)
                        };
                        assert!(!p.is_null());
                        assert_eq!(p as usize % align, 0, "size {size} align {align}");
                        if zeroed {
                            assert!((0..size).all(|i| *p.add(i) == 0));
                        }
                        fill(p, size);
                        for &new_size in &sizes {
                            let q = a.realloc(p, layout, new_size);
                            assert_eq!(
                                q as usize % align,
                                0,
                                "{size} -> {new_size}, align {align}"
                            );
                            assert!(holds(q, size.min(new_size)));
                            let grown = Layout::from_size_align(new_size, align).expect("layout");
                            p = a.realloc(q, grown, size);
                            assert_eq!(
                                p as usize % align,
                                0,
                                "{new_size} -> {size}, align {align}"
                            );
                            assert!(holds(p, size.min(new_size)));
                            fill(p, size);
                        }
                        a.dealloc(p, layout);
                    }
                }
            }
        }
    }
}
