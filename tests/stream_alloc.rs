//! The reader's memory is bounded by the spec's limits whatever a peer sends: at most
//! `READ_BUF_LEN + MAX_INLINE_LEN` bytes beyond what was allocated before, never an allocation
//! sized by an unchecked length, and no allocation per chunk.
//!
//! A counting global allocator tracks live bytes per thread, so tests running in parallel threads
//! do not see each other's allocations.
#![allow(unsafe_code)] // `GlobalAlloc` is an unsafe trait; the impl only forwards to `System`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::prelude::*;
use splitfdstream::proto::stream::{MAX_INLINE_LEN, READ_BUF_LEN, Reader, Writer};

struct Counting;

thread_local! {
    // `const` initialisers without `Drop`: touching them never allocates.
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    static COUNT: Cell<usize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
        if delta > 0 {
            let _ = COUNT.try_with(|c| c.set(c.get() + 1));
        }
    });
}

// SAFETY: every call is forwarded unchanged to `System`; the bookkeeping does not allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) };
        note(-(layout.size() as isize));
    }
    // `realloc` keeps the default (alloc, copy, dealloc), so a peak counts old and new blocks.
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Peak bytes allocated beyond the start, and allocations made, while draining `stream`.
fn drain_measured(stream: &[u8]) -> (isize, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let count0 = COUNT.with(Cell::get);
    {
        let mut r = Reader::new(stream);
        while let Ok(Some(_)) = r.next_item() {}
    }
    (PEAK.with(Cell::get) - base, COUNT.with(Cell::get) - count0)
}

const BOUND: isize = READ_BUF_LEN as isize + MAX_INLINE_LEN as isize;

fn inline_prefix(len: u64) -> [u8; 8] {
    (-(len as i64)).to_le_bytes()
}

/// A ustar header for a regular file of `size` bytes.
fn header(size: u64) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[..4].copy_from_slice(b"file");
    b[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    b[156] = b'0';
    b[257..265].copy_from_slice(b"ustar\x0000");
    b[148..156].fill(b' ');
    let sum: u32 = b.iter().map(|&x| u32::from(x)).sum();
    b[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    b
}

#[test]
fn largest_chunks_stay_within_the_bound() {
    // Three maximal chunks of end-of-archive zeros, then a declared maximal chunk cut short.
    let mut s = Vec::new();
    for _ in 0..3 {
        s.extend(inline_prefix(MAX_INLINE_LEN));
        s.resize(s.len() + MAX_INLINE_LEN as usize, 0);
    }
    s.extend(inline_prefix(MAX_INLINE_LEN));
    s.extend([0; 100]);
    let (peak, count) = drain_measured(&s);
    assert!(peak <= BOUND, "peak {peak} > {BOUND}");
    assert!(
        peak >= MAX_INLINE_LEN as isize,
        "the chunk was not buffered whole?"
    );
    assert!(count <= 3, "{count} allocations");
    // A declared length over the limit allocates nothing but the read buffer.
    let s = inline_prefix(u64::MAX >> 1);
    let (peak, _) = drain_measured(&s);
    assert!(peak <= READ_BUF_LEN as isize, "peak {peak}");
}

#[test]
fn no_allocation_per_chunk() {
    // 20,000 entries, each a header chunk, an fd reference and a padding chunk.
    let mut w = Writer::new(Vec::new());
    let h = header(10);
    for i in 0..20_000 {
        w.write_inline(&h).unwrap();
        w.write_fd_ref(i).unwrap();
        w.write_inline(&[0; 502]).unwrap();
    }
    w.write_inline(&[0; 1024]).unwrap();
    let s = w.into_inner().unwrap();
    let (peak, count) = drain_measured(&s);
    assert!(peak <= READ_BUF_LEN as isize + 1024, "peak {peak}");
    assert!(count <= 2, "{count} allocations for {} bytes", s.len());
}

/// A chunk sequence a hostile peer might send: prefixes of any kind with too little, enough or
/// garbage data.
fn hostile() -> impl Strategy<Value = Vec<u8>> {
    let chunk = prop_oneof![
        (
            1u64..=MAX_INLINE_LEN + 2,
            prop::collection::vec(any::<u8>(), 0..600)
        )
            .prop_map(|(len, data)| [&inline_prefix(len)[..], &data].concat()),
        (0i64..4).prop_map(|i| i.to_le_bytes().to_vec()),
        any::<i64>().prop_map(|p| p.to_le_bytes().to_vec()),
        (0u64..2000).prop_map(|size| [&inline_prefix(512)[..], &header(size)].concat()),
        (1usize..1500).prop_map(|n| [&inline_prefix(n as u64)[..], &vec![0; n]].concat()),
    ];
    prop::collection::vec(chunk, 0..12).prop_map(|c| c.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn garbage_is_bounded(data in prop::collection::vec(any::<u8>(), 0..4096)) {
        let (peak, _) = drain_measured(&data);
        prop_assert!(peak <= BOUND, "peak {}", peak);
    }

    #[test]
    fn hostile_chunks_are_bounded(data in hostile()) {
        let (peak, count) = drain_measured(&data);
        prop_assert!(peak <= BOUND, "peak {}", peak);
        // The read buffer, possibly one growth for a big chunk: never per chunk.
        prop_assert!(count <= 3, "{} allocations", count);
    }
}
