//! Draining a [`Reader`] while checking what every target relies on: no panic, counters that
//! agree with the items, offsets that only grow, sticky errors, and (for structured inputs)
//! items equal to the chunks written and the model's prediction.

use splitfdstream::proto::stream::{Item, MAX_INLINE_LEN, Reader, StreamError};
use splitfdstream::proto::tar::{Position, TarError, Tracker};

use crate::archive::{Built, Chunk};

/// One item handed to the caller of [`drain`].
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// Inline bytes.
    Inline(&'a [u8]),
    /// An fd reference.
    Fd {
        /// Its index.
        index: u64,
        /// Body size from the tar.
        size: u64,
    },
}

/// What [`drain`] saw.
#[derive(Debug)]
pub struct Drained {
    /// How it ended.
    pub end: End,
    /// The reader's entry count at the end.
    pub entries: u64,
    /// The reader's tar byte count at the end.
    pub tar_bytes: u64,
    /// Whether the reader saw the end-of-archive block.
    pub end_of_archive: bool,
}

/// How [`drain`] ended.
#[derive(Debug)]
pub enum End {
    /// `Ok(None)`: a clean end.
    Clean,
    /// The first error.
    Error(StreamError),
    /// The caller asked to stop.
    Stopped,
}

/// Read `stream` to its end or first error, checking invariants after every item; `each` sees
/// every item and returns whether to go on. With `built` (the stream was made by
/// [`crate::archive::build`]), items must equal the chunks written, and a well-formed input must
/// end as the model predicts.
///
/// # Panics
/// On any broken invariant: that is the finding.
pub fn drain(
    stream: &[u8],
    built: Option<&Built>,
    mut each: impl FnMut(Event<'_>) -> bool,
) -> Drained {
    let len = stream.len() as u64;
    let mut r = Reader::new(stream);
    let mut tar_bytes: u128 = 0;
    let mut fd_refs = 0u64;
    let mut entries = 0u64;
    let mut offset = 0u64;
    // Chunks before the first opaque one can be predicted.
    let predictable = built.map_or(0, |b| {
        b.chunks
            .iter()
            .position(|c| *c == Chunk::Opaque)
            .unwrap_or(b.chunks.len())
    });
    let expect = built.and_then(|b| b.expect);
    let mut k = 0usize;
    let end = loop {
        let event = match r.next_item() {
            Ok(Some(Item::Inline(d))) => {
                assert!(!d.is_empty() && d.len() as u64 <= MAX_INLINE_LEN);
                tar_bytes += d.len() as u128;
                None
            }
            Ok(Some(Item::FdRef { index, size })) => {
                assert_eq!(index, fd_refs, "fd reference out of order");
                assert!(size > 0, "a reference for an empty body");
                fd_refs += 1;
                tar_bytes += u128::from(size);
                Some((index, size))
            }
            Ok(None) => {
                assert!(
                    matches!(r.next_item(), Ok(None)),
                    "a clean end is not final"
                );
                assert_eq!(r.offset(), len, "clean end before the end of the stream");
                break End::Clean;
            }
            Err(e) => {
                let at = r.offset();
                assert!(at <= len);
                for _ in 0..2 {
                    match r.next_item() {
                        Err(StreamError::Failed { offset }) => assert_eq!(offset, at),
                        other => panic!("error not sticky: {other:?} after {e:?}"),
                    }
                }
                assert_eq!(r.offset(), at);
                break End::Error(e);
            }
        };
        // Counters against the items.
        assert!(
            r.offset() > offset && r.offset() <= len,
            "offset did not advance"
        );
        offset = r.offset();
        assert_eq!(u128::from(r.tar_bytes()), tar_bytes, "tar_bytes");
        assert_eq!(r.fd_refs(), fd_refs, "fd_refs");
        assert!(r.entries() >= entries, "entries went down");
        entries = r.entries();
        let event = match event {
            Some((index, size)) => Event::Fd { index, size },
            None => Event::Inline(r.last_inline()),
        };
        // Items against the chunks written.
        if let Some(b) = built
            && k < predictable
        {
            match (event, &b.chunks[k]) {
                (Event::Inline(d), Chunk::Inline { start, len }) => {
                    assert_eq!(d, &b.stream[*start..start + len], "inline chunk {k}")
                }
                (Event::Fd { index, size }, Chunk::Fd { index: i, size: s }) => {
                    assert_eq!(index, *i, "chunk {k}");
                    if let (Some(_), Some(s)) = (expect, s) {
                        assert_eq!(size, *s, "body size of fd reference {index}");
                    }
                }
                (e, c) => panic!("chunk {k}: read {e:?}, wrote {c:?}"),
            }
        }
        k += 1;
        if !each(event) {
            break End::Stopped;
        }
    };
    if let (Some(x), Some(b)) = (expect, built) {
        match &end {
            End::Stopped => {}
            End::Clean => {
                assert!(x.clean, "clean end where the tar may not end");
                assert_eq!(k, b.chunks.len(), "chunks read");
                assert_eq!(
                    (r.entries(), r.tar_bytes(), r.saw_end_of_archive()),
                    (x.entries, x.tar_bytes, x.end_of_archive),
                    "entries, tar bytes, end of archive"
                );
            }
            End::Error(e) => {
                assert!(
                    !x.clean && matches!(e, StreamError::TruncatedStream { .. }),
                    "well-formed stream rejected: {e:?}"
                );
                assert_eq!(k, b.chunks.len(), "chunks read");
            }
        }
    }
    Drained {
        end,
        entries: r.entries(),
        tar_bytes: r.tar_bytes(),
        end_of_archive: r.saw_end_of_archive(),
    }
}

/// What a [`Tracker`] made of a whole tar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackerState {
    /// The first error, or `None`.
    pub error: Option<TarError>,
    /// Offset, entries, in the trailer, at a clean end, position; when no error occurred.
    pub state: Option<(u64, u64, bool, bool, Position)>,
}

impl TrackerState {
    fn of(t: &Tracker, r: Result<(), TarError>) -> TrackerState {
        match r {
            Ok(()) => TrackerState {
                error: None,
                state: Some((
                    t.offset(),
                    t.entries(),
                    t.in_trailer(),
                    t.at_clean_end(),
                    t.position(),
                )),
            },
            Err(e) => TrackerState {
                error: Some(e),
                state: None,
            },
        }
    }
}

/// Pieces [`tracker_differential`] cuts a tar into before feeding the rest whole.
const MAX_PIECES: usize = 256;

/// Feed `tar` to a tracker in one piece, in pieces of the sizes `cuts` cycles through, and the
/// way a producer does (stopping at every regular-file body and skipping it); all three must
/// agree. Returns the state.
///
/// # Panics
/// When they disagree.
pub fn tracker_differential(tar: &[u8], cuts: &[usize]) -> TrackerState {
    let mut whole = Tracker::new();
    let r = whole.feed(tar);
    let one = TrackerState::of(&whole, r);

    let mut pieces = Tracker::new();
    let mut r = Ok(());
    let mut rest = tar;
    let mut i = 0;
    while !rest.is_empty() && r.is_ok() {
        // The cuts cycle for a while, then the rest goes in one piece (tiny cuts over
        // megabytes of body cost time and add nothing).
        let n = match cuts.get(i % cuts.len().max(1)) {
            Some(&n) if i < MAX_PIECES => n,
            _ => rest.len(),
        }
        .clamp(1, rest.len());
        r = pieces.feed(&rest[..n]);
        rest = &rest[n..];
        i += 1;
    }
    let cut = TrackerState::of(&pieces, r);
    assert_eq!(one, cut, "the tracker depends on how the tar is cut");

    let mut producer = Tracker::new();
    let mut pos = 0usize;
    let mut r = Ok(());
    while pos < tar.len() {
        match producer.advance(&tar[pos..]) {
            Ok(n) => pos += n,
            Err(e) => {
                r = Err(e);
                break;
            }
        }
        if let Some(size) = producer.file_body_start() {
            match usize::try_from(size) {
                Ok(size) if size <= tar.len() - pos => {
                    assert_eq!(producer.skip_file_body(), Ok(size as u64));
                    pos += size;
                }
                // The body runs past the end: feed what there is instead.
                _ => {}
            }
        }
    }
    let produced = TrackerState::of(&producer, r);
    assert_eq!(one, produced, "skipping a body differs from feeding it");
    one
}
