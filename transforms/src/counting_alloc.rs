//! For tests that measure what a structure costs in memory: an allocator that counts what each
//! thread allocates (tests run in parallel on other threads). A test binary installs it with
//! `#[global_allocator] static A: Counting = Counting;` and reads [`allocated_here`].

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

pub struct Counting;

thread_local! {
    static HERE: Cell<isize> = const { Cell::new(0) };
}

// SAFETY: delegates to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HERE.with(|h| h.set(h.get() + layout.size() as isize));
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HERE.with(|h| h.set(h.get() - layout.size() as isize));
        System.dealloc(ptr, layout)
    }
}

/// Bytes this thread holds, allocated minus freed, since it started.
pub fn allocated_here() -> isize {
    HERE.with(|h| h.get())
}
