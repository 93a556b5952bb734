//! Aligned bounce buffers for O_DIRECT: the kernel needs the memory, the offset and the
//! length of a direct I/O aligned to the device's logical block size. Offsets and lengths
//! from hvm-core are whole 512-byte blocks already; a caller's buffer that is not aligned
//! goes through one of these (one per thread, grown as needed).

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::cell::RefCell;

/// Alignment of every bounce buffer: a page, enough for any logical block size.
pub const ALIGN: usize = 4096;

/// A zeroed, page-aligned byte buffer.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer owns its allocation exclusively; moving it between threads is as
// safe as moving a Vec<u8>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub fn new(len: usize) -> AlignedBuf {
        let len = len.max(ALIGN).next_multiple_of(ALIGN);
        let layout = Layout::from_size_align(len, ALIGN).expect("page-aligned layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, len }
    }

    pub fn as_mut_slice(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= self.len);
        // SAFETY: ptr is valid for self.len bytes, initialised (zeroed at allocation), and
        // borrowed mutably through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.len, ALIGN).expect("page-aligned layout");
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, layout) }
    }
}

/// True when `buf` can go to O_DIRECT as it is.
pub fn is_aligned(buf: &[u8], align: usize) -> bool {
    (buf.as_ptr() as usize) % align == 0
}

thread_local! {
    static BOUNCE: RefCell<Option<AlignedBuf>> = const { RefCell::new(None) };
}

/// Run `f` with this thread's bounce buffer of at least `len` bytes.
pub fn with_bounce<T>(len: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
    BOUNCE.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|b| b.len < len) {
            *slot = Some(AlignedBuf::new(len));
        }
        let buf = slot.as_mut().expect("bounce buffer was just set");
        f(buf.as_mut_slice(len))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounce_buffers_are_aligned_and_grow() {
        with_bounce(100, |b| {
            assert_eq!(b.len(), 100);
            assert!(is_aligned(b, ALIGN));
        });
        with_bounce(1 << 20, |b| {
            assert_eq!(b.len(), 1 << 20);
            assert!(is_aligned(b, ALIGN));
            b[(1 << 20) - 1] = 7;
        });
    }
}
