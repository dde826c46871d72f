//! A hostile OCI image layout into `OciBackend`: `index.json`, manifest, config and one layer
//! blob (uncompressed, gzip or zstd) written into a scratch directory on tmpfs, then `open`,
//! `open_image` and `stream_layer` into a sink that checks what it receives.
//!
//! Input: three option bytes (compression, wrong digests, reference form, extra manifests,
//! hostile media types and file types, a failing sink, trailing or missing blob bytes), an
//! optional raw `index.json`, then the ops of `splitfdstream_fuzz::archive` for the layer tar.
//!
//! Checks: no panic; `open_image` refuses a config whose diff_ids do not match the layers and
//! unknown layer media types; the sink gets only inline chunks of 1 byte to `MAX_CHUNK`, never
//! an fd; a layer is streamed successfully only when its blob digest and diff_id are right and
//! the sink took everything, and then the bytes received are the layer tar and the entry count
//! returned is the one the client's `Reader` computes from them (the client compares the two).
#![no_main]

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use serde_json::json;
use sha2::{Digest, Sha256};
use splitfdstream::helper::oci_layout::{MAX_CHUNK, OciBackend};
use splitfdstream::helper::{Backend, LayerSink};
use splitfdstream::proto::stream::{Reader, Writer};
use splitfdstream_fuzz::archive::{self, Chunk};
use splitfdstream_fuzz::input::Cursor;
use splitfdstream_fuzz::ops::Op;
use splitfdstream_fuzz::scratch::ScratchDir;

/// Layer media types: the ones the backend reads, and some it must refuse.
const MEDIA_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.layer.v1.tar+bzip2",
    "",
];

const TAG: &str = "t";

/// Receives a layer and checks each call.
struct Sink {
    data: Vec<u8>,
    chunks: Vec<usize>,
    /// Fail at this call (a consumer that went away).
    fail_at: Option<usize>,
    failed: bool,
}

impl LayerSink for Sink {
    fn inline(&mut self, data: &[u8]) -> std::io::Result<()> {
        assert!(
            !data.is_empty() && data.len() <= MAX_CHUNK,
            "inline chunk of {} bytes",
            data.len()
        );
        if self.fail_at == Some(self.chunks.len()) {
            self.failed = true;
            return Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        }
        self.chunks.push(data.len());
        self.data.extend_from_slice(data);
        Ok(())
    }

    fn file(&mut self, _fd: OwnedFd, size: u64, _crc64: Option<u64>) -> std::io::Result<()> {
        panic!("the OCI backend sent a {size}-byte body as an fd; it sends layers inline");
    }
}

fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn write_blob(dir: &Path, data: &[u8]) -> String {
    let d = digest(data);
    std::fs::write(dir.join("blobs/sha256").join(&d[7..]), data).expect("writing a blob");
    d
}

fn compress(tar: &[u8], how: u8) -> Vec<u8> {
    match how {
        1 => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(tar).expect("gzip");
            e.finish().expect("gzip")
        }
        2 => zstd::encode_all(tar, 1).expect("zstd"),
        _ => tar.to_vec(),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut c = Cursor::new(data);
    let [a, b, aux] = c.array::<3>();
    let raw_index = (a & 0x80 != 0).then(|| {
        let n = usize::from(c.u16());
        c.bytes(n).to_vec()
    });
    let built = archive::build(&Op::decode_all(&mut c));
    // The layer tar: all of it when known, else the inline bytes alone.
    let tar = built.tar.clone().unwrap_or_else(|| {
        let mut t = Vec::new();
        for ch in &built.chunks {
            if let Chunk::Inline { start, len } = ch {
                t.extend_from_slice(&built.stream[*start..start + len]);
            }
        }
        t
    });

    let compression = a & 3;
    let wrong_blob_digest = a & 4 != 0;
    let wrong_diff_id = a & 8 != 0;
    let two_manifests = a & 0x40 != 0;
    let odd_media_type = b & 1 != 0;
    let extra_diff_id = b & 2 != 0;
    let wrong_manifest_size = b & 4 != 0;
    let no_layout_file = b & 8 != 0;
    let odd_file_type = b & 0x10 != 0;
    let fail_sink = b & 0x20 != 0;
    let trailing = b & 0x40 != 0;
    let truncated = b & 0x80 != 0;

    let dir = ScratchDir::new("oci");
    let root = dir.path();
    std::fs::create_dir_all(root.join("blobs/sha256")).expect("mkdir");
    if !no_layout_file {
        std::fs::write(
            root.join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .expect("oci-layout");
    }

    // The layer blob: plain, gzip, zstd, or (3) plain under a gzip media type.
    let mut blob = compress(&tar, compression);
    if trailing {
        blob.extend_from_slice(b"trailing garbage");
    }
    if truncated {
        blob.truncate(blob.len() / 2);
    }
    let layer_digest = if odd_file_type {
        // A directory, FIFO or symlink where the blob should be.
        let d = digest(&blob);
        let path = root.join("blobs/sha256").join(&d[7..]);
        match aux % 3 {
            0 => std::fs::create_dir(&path).expect("mkdir"),
            1 => rustix::fs::mknodat(
                rustix::fs::CWD,
                &path,
                rustix::fs::FileType::Fifo,
                rustix::fs::Mode::from_raw_mode(0o644),
                0,
            )
            .expect("mkfifo"),
            _ => {
                let real = write_blob(root, &[&blob[..], b"x"].concat());
                std::os::unix::fs::symlink(&real[7..], &path).expect("symlink");
            }
        }
        d
    } else {
        write_blob(root, &blob)
    };
    let media_type = if odd_media_type {
        MEDIA_TYPES[usize::from(aux >> 2) % MEDIA_TYPES.len()]
    } else {
        // Compression 3 is a plain tar labelled gzip.
        MEDIA_TYPES[[0, 1, 2, 1][usize::from(compression)]]
    };
    let readable_type = MEDIA_TYPES[..5].contains(&media_type);
    let layer_digest = if wrong_blob_digest {
        digest(layer_digest.as_bytes())
    } else {
        layer_digest
    };
    let diff_id = if wrong_diff_id {
        digest(b"another layer")
    } else {
        digest(&tar)
    };
    let mut diff_ids = vec![diff_id.clone()];
    if extra_diff_id {
        diff_ids.push(diff_id.clone());
    }
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .expect("config json");
    let config_digest = write_blob(root, &config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{"mediaType": media_type, "digest": layer_digest, "size": blob.len()}],
    }))
    .expect("manifest json");
    let manifest_digest = write_blob(root, &manifest);
    let manifest_size = manifest.len() + usize::from(wrong_manifest_size);
    let mut manifests = vec![json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest_digest,
        "size": manifest_size,
        "annotations": {"org.opencontainers.image.ref.name": TAG},
    })];
    if two_manifests {
        manifests.push(json!({
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": config_digest,
            "size": config.len(),
            "annotations": {"org.opencontainers.image.ref.name": if aux & 1 != 0 { TAG } else { "u" }},
        }));
    }
    let index = match &raw_index {
        Some(raw) => raw.clone(),
        None => serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": manifests}))
            .expect("index json"),
    };
    std::fs::write(root.join("index.json"), &index).expect("index.json");

    let Ok(backend) = OciBackend::open(root) else {
        assert!(
            no_layout_file,
            "a layout with an oci-layout file did not open"
        );
        return;
    };
    let reference = match (a >> 4) & 3 {
        0 => String::new(),
        1 => TAG.to_owned(),
        2 => manifest_digest.clone(),
        _ => format!("@{manifest_digest}"),
    };
    let Ok(image) = backend.open_image(&reference) else {
        return;
    };
    assert!(
        !extra_diff_id,
        "a config with more diff_ids than layers was accepted"
    );
    assert!(
        readable_type,
        "layer media type {media_type:?} was accepted"
    );
    assert_eq!(image.layers.len(), 1);
    let mut sink = Sink {
        data: Vec::new(),
        chunks: Vec::new(),
        fail_at: fail_sink.then_some(usize::from(aux >> 5)),
        failed: false,
    };
    let streamed = backend.stream_layer(&image, 0, 64, &mut sink);
    assert!(
        backend.stream_layer(&image, 1, 64, &mut sink).is_err(),
        "layer 1 of a one-layer image"
    );
    let Ok(entries) = streamed else {
        return;
    };
    assert!(!sink.failed, "the sink failed but the layer was streamed");
    assert!(
        !wrong_blob_digest && !wrong_diff_id,
        "a layer with a wrong digest was streamed"
    );
    assert_eq!(
        digest(&sink.data),
        image.layers[0].diff_id,
        "the bytes streamed are not the layer's diff_id"
    );
    if raw_index.is_none() {
        assert_eq!(image.layers[0].diff_id, diff_id);
        assert!(
            sink.data == tar,
            "the layer streamed is not the tar written"
        );
    }
    // What the client does with it: read the chunks as a splitfdstream and compare counts.
    let mut w = Writer::new(Vec::new());
    let mut at = 0;
    for &n in &sink.chunks {
        w.write_inline(&sink.data[at..at + n])
            .expect("writing to a Vec");
        at += n;
    }
    let stream = w.into_inner().expect("writing to a Vec");
    let mut r = Reader::new(stream.as_slice());
    loop {
        match r.next_item() {
            Ok(Some(_)) => {}
            Ok(None) => {
                assert_eq!(
                    entries,
                    r.entries(),
                    "the helper counts {entries} entries, the client's reader {}",
                    r.entries()
                );
                break;
            }
            Err(_) => break,
        }
    }
});
