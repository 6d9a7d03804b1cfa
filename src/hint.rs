//! Memory hints for the table: cache-line prefetches and transparent huge
//! pages. The only module of the crate allowed `unsafe`, and it holds only
//! these wrappers (ARCHITECTURE.md, "Unsafe code").
//!
//! Both are hints: they change what the CPU or the kernel does ahead of
//! time, never what the program computes. A prefetch loads nothing into a
//! register and cannot fault, whatever the address; `madvise` with
//! `MADV_HUGEPAGE` only changes how the kernel backs pages already mapped.
//! On targets without them the functions do nothing. Under Miri the
//! prefetch runs (Miri treats it as a no-op) and `madvise` is skipped (Miri
//! cannot make system calls); `cargo +nightly miri test --lib hint::`
//! runs this module's tests there (`.ci/run` does).

#![allow(unsafe_code)]

/// A cache line's size on the targets the server runs on.
const LINE: usize = 64;

/// Asks the CPU to bring every cache line of `value` into its caches,
/// without waiting for them: a later read finds them there (or on the way)
/// instead of queueing behind the previous miss. Free to call on anything.
#[inline(always)]
pub fn prefetch<T>(value: &T) {
    let start = core::ptr::from_ref(value).cast::<u8>();
    let size = core::mem::size_of::<T>();
    // The lines from the one `start` is in to the one its last byte is in.
    let first = start as usize / LINE;
    let last = (start as usize + size.max(1) - 1) / LINE;
    for line in 0..=last - first {
        prefetch_line(start.wrapping_add(line * LINE));
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_line(at: *const u8) {
    use core::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
    // SAFETY: `_mm_prefetch` is `unsafe` only because it is a target-feature
    // intrinsic taking a pointer. SSE is part of the x86-64 baseline, so the
    // feature is always there; and PREFETCHT0 never dereferences its operand
    // in the program's sense: it cannot fault and reads nothing into a
    // register, so any address (here one inside or just past `value`) is
    // sound.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(at.cast::<i8>()) }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn prefetch_line(_at: *const u8) {}

/// Asks the kernel to back the whole pages of `items` with transparent huge
/// pages (2 MiB on x86-64), where it is set to do so on request
/// (`/sys/kernel/mm/transparent_hugepage/enabled` is `madvise` or
/// `always`). At a million devices the table's arrays are tens of MiB, and
/// with 4 KiB pages nearly every random access also misses the TLB.
/// The whole allocation is advised, capacity included, so pages the
/// vector fills later are huge from their first touch; call it again after
/// the vector reallocates. Allocations smaller than a huge page are left
/// alone: they could not use one. Returns whether the kernel took the advice.
#[allow(clippy::ptr_arg, reason = "the capacity is advised too, not only the items")]
pub fn huge_pages<T>(items: &Vec<T>) -> bool {
    const HUGE: usize = 2 << 20;
    let len = items.capacity().saturating_mul(core::mem::size_of::<T>());
    if len < HUGE {
        return false;
    }
    advise(items.as_ptr().cast::<u8>(), len)
}

#[cfg(all(target_os = "linux", not(miri)))]
fn advise(start: *const u8, len: usize) -> bool {
    const PAGE: usize = 4096;
    // madvise wants a page-aligned start; advise the whole pages inside.
    let begin = (start as usize).div_ceil(PAGE) * PAGE;
    let end = (start as usize + len) / PAGE * PAGE;
    if end <= begin {
        return false;
    }
    let at = start.wrapping_add(begin - start as usize).cast_mut().cast::<core::ffi::c_void>();
    // SAFETY: [begin, end) lies inside the allocation of `items` (its
    // capacity), live while `items` is borrowed, so the range is mapped and
    // ours. MADV_HUGEPAGE changes only how the kernel backs those pages (it
    // may merge them into a huge page); their contents and the mapping's
    // permissions stay as they are, so no reference to them, shared or not,
    // can observe a difference.
    unsafe { rustix::mm::madvise(at, end - begin, rustix::mm::Advice::LinuxHugepage) }.is_ok()
}

#[cfg(not(all(target_os = "linux", not(miri))))]
fn advise(_start: *const u8, _len: usize) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_changes_nothing_whatever_it_is_given() {
        let values = [0u8, 1, 2, 3];
        prefetch(&values);
        prefetch(&values[3]);
        prefetch(&());
        let big = vec![7u64; 1000];
        for value in &big {
            prefetch(value);
        }
        prefetch(&big);
        assert_eq!(values, [0, 1, 2, 3]);
        assert!(big.iter().all(|&v| v == 7));
    }

    #[test]
    #[cfg_attr(miri, ignore = "Miri cannot make the madvise system call")]
    fn huge_pages_leave_the_contents_alone() {
        let small = vec![1u8; 4096];
        assert!(!huge_pages(&small), "smaller than a huge page: left alone");
        let mut big: Vec<u64> = Vec::with_capacity(1_000_000);
        assert!(!cfg!(target_os = "linux") || huge_pages(&big), "an empty vector's capacity is advised");
        big.extend(0..1_000_000);
        let advised = huge_pages(&big);
        if cfg!(target_os = "linux") {
            assert!(advised, "madvise(MADV_HUGEPAGE) refused");
        }
        big[999_999] += 1;
        assert!(big.iter().take(999_999).enumerate().all(|(i, &v)| v == i as u64));
        assert_eq!(big[999_999], 1_000_000);
    }
}
