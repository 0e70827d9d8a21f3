//! The `sluice` binary: sets the process up (allocator, pages, memory return) and runs the
//! command line (`sluice::cli`).

use std::process::ExitCode;

/// Batches allocate and free large buffers; glibc's allocator unmaps and re-faults them each
/// time (~8% of CPU in profiles), mimalloc keeps them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Transparent huge pages off for this process: mimalloc asks for them on its arenas, and every
/// buffer that grows into fresh memory then faults in and zeroes 2 MiB — a fifth of all CPU
/// time in the benchmark's profile, and ~80 MiB more peak RSS. With 4 KiB pages only what is
/// touched is zeroed.
fn no_huge_pages() {
    // SAFETY: prctl with an integer option and no pointers; a failure leaves THP as it was.
    #[cfg(target_os = "linux")]
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// Freed memory goes back to the OS after 1 ms instead of mimalloc's 10: batches free large
/// buffers all the time, and memory waiting to be returned was a third of peak RSS (the
/// budget, `[workers] memory_mb`, bounds what is in use). Costs ~1 CPU-s per million events.
fn return_freed_memory_promptly() {
    /// `mi_option_purge_delay` in mimalloc.h (v3), which the bindings do not name.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets an option value; called before any thread but this one exists.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 1);
    }
}

fn main() -> ExitCode {
    no_huge_pages();
    return_freed_memory_promptly();
    sluice::cli::main()
}
