//! Structure-aware: the input is a list of ops (`splitfdstream_fuzz::archive`) that build a tar
//! with valid checksums, PAX and GNU extensions, sparse blocks, huge and negative sizes, and
//! encode it as a splitfdstream with chunks cut anywhere and references right or wrong.
//!
//! Checks: the reader never panics; its counters agree with its items, offsets only grow, an
//! error is sticky; items are the chunks written; a well-formed archive reads exactly as the
//! model predicts. When every byte of the tar is known, a `Tracker` fed the whole tar, fed it in
//! pieces, and run as a producer (skipping bodies) agree with each other and with the reader.
#![no_main]

use libfuzzer_sys::fuzz_target;
use splitfdstream::proto::stream::StreamError;
use splitfdstream_fuzz::archive::{self, Chunk};
use splitfdstream_fuzz::check::{self, End, Event};
use splitfdstream_fuzz::input::Cursor;
use splitfdstream_fuzz::ops::Op;

fuzz_target!(|data: &[u8]| {
    let ops = Op::decode_all(&mut Cursor::new(data));
    let built = archive::build(&ops);
    // Whether every reference stands for as many bytes as the builder put behind it; only then
    // is `built.tar` the tar the reader reconstructs.
    let mut same_tar = true;
    let drained = check::drain(&built.stream, Some(&built), |event| {
        if let Event::Fd { index, size } = event {
            same_tar &= built.bodies.get(index as usize).map(|b| b.size) == Some(size);
        }
        true
    });
    let Some(tar) = &built.tar else {
        return;
    };
    // Cut the tar where the stream cut it, so the pieces change with the input.
    let cuts: Vec<usize> = built
        .chunks
        .iter()
        .map(|c| match c {
            Chunk::Inline { len, .. } => *len,
            Chunk::Fd { size, .. } => size.unwrap_or(1) as usize,
            Chunk::Opaque => 1,
        })
        .collect();
    let whole = check::tracker_differential(tar, &cuts);
    if !same_tar {
        return;
    }
    match drained.end {
        End::Clean => {
            let (offset, entries, in_trailer, clean, _) = whole
                .state
                .expect("the reader accepted a tar the tracker rejects");
            assert!(clean, "the reader ended cleanly where the tracker cannot");
            assert_eq!(
                (offset, entries, in_trailer),
                (drained.tar_bytes, drained.entries, drained.end_of_archive),
                "reader and tracker disagree"
            );
        }
        End::Error(StreamError::BadTarHeader { source, .. }) => {
            assert_eq!(
                whole.error,
                Some(source),
                "reader and tracker fail differently"
            );
        }
        End::Error(StreamError::TruncatedStream { .. }) => {
            let (_, _, _, clean, _) = whole.state.expect("the tracker failed, the reader did not");
            assert!(!clean, "the reader saw a truncation the tracker does not");
        }
        End::Error(_) | End::Stopped => {}
    }
});
