//! Arbitrary bytes as a splitfdstream: the reader must end with an item stream, a clean end or an
//! error, never a panic, and must stay consistent with its own counters.
#![no_main]

use libfuzzer_sys::fuzz_target;
use splitfdstream::proto::stream::{Item, MAX_INLINE_LEN, Reader, StreamError};

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let mut tar_bytes = 0u64;
    let mut fd_refs = 0u64;
    loop {
        match r.next_item() {
            Ok(Some(Item::Inline(d))) => {
                assert!(!d.is_empty() && d.len() as u64 <= MAX_INLINE_LEN);
                tar_bytes += d.len() as u64;
            }
            Ok(Some(Item::FdRef { index, size })) => {
                assert_eq!(index, fd_refs);
                assert!(size > 0);
                fd_refs += 1;
                tar_bytes += size;
            }
            Ok(None) => {
                assert_eq!(r.offset(), data.len() as u64);
                break;
            }
            Err(_) => {
                assert!(matches!(r.next_item(), Err(StreamError::Failed { .. })));
                break;
            }
        }
        assert_eq!((r.tar_bytes(), r.fd_refs()), (tar_bytes, fd_refs));
        assert!(r.offset() <= data.len() as u64);
    }
});
