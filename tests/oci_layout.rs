//! The OCI layout backend against layouts skopeo exported from the fixture store.

mod common;

use std::path::{Path, PathBuf};

use common::{Fixtures, TarSink, fixtures};
use sha2::{Digest, Sha256};
use splitfdstream::helper::cstor::CstorBackend;
use splitfdstream::helper::oci_layout::{MAX_CHUNK, OciBackend};
use splitfdstream::helper::{Backend, BackendError};

#[test]
fn every_layout_rebuilds_every_diff_id() {
    let Some(f) = fixtures() else { return };
    let cstor = CstorBackend::open(&f.store()).unwrap();
    for layout in &f.layouts {
        let b = OciBackend::open(&f.layout_dir(&layout.dir)).unwrap();
        let image = b.open_image(&layout.tag).unwrap();
        let what = format!("{}:{}", layout.dir, layout.tag);
        let diff_ids: Vec<&str> = image.layers.iter().map(|l| l.diff_id.as_str()).collect();
        assert_eq!(diff_ids, layout.diff_ids, "{what}");
        // skopeo keeps the store's diff_ids, whatever the compression.
        assert_eq!(diff_ids, f.image(&layout.tag).diff_ids, "{what}");
        let ids: Vec<&str> = image.layers.iter().map(|l| l.id.as_str()).collect();
        assert_eq!(ids, layout.blobs, "{what}");
        assert_eq!(
            image.config_digest,
            format!("sha256:{}", f.image(&layout.tag).id),
            "{what}"
        );
        let stored = cstor.open_image(&layout.tag).unwrap();
        for (i, layer) in image.layers.iter().enumerate() {
            let mut sink = TarSink::default();
            let entries = b.stream_layer(&image, i, 64, &mut sink).unwrap();
            assert_eq!(sink.digest(), layer.diff_id, "{what} layer {i}");
            assert!(sink.fd_sizes.is_empty(), "an OCI layout passes no fds");
            assert!(sink.max_inline <= MAX_CHUNK);
            // Two independent counts: tar-split records in the store, tar headers here.
            let stored_entries = cstor
                .stream_layer(&stored, i, 64, &mut TarSink::default())
                .unwrap();
            assert_eq!(entries, stored_entries, "{what} layer {i}");
        }
    }
}

#[test]
fn references_select_the_manifest() {
    let Some(f) = fixtures() else { return };
    // oci-zstd holds one image: the empty reference picks it.
    let zstd = OciBackend::open(&f.layout_dir("oci-zstd")).unwrap();
    let only = zstd.open_image("").unwrap();
    assert_eq!(only.image_id, f.image("basic").id);
    assert_eq!(zstd.open_image("basic").unwrap().image_id, only.image_id);

    let plain = OciBackend::open(&f.layout_dir("oci-plain")).unwrap();
    match plain.open_image("") {
        Err(BackendError::ImageNotFound(msg)) => {
            assert!(
                msg.contains("no reference given but 2 images (tags: basic, odd)"),
                "{msg}"
            )
        }
        other => panic!("{other:?}"),
    }
    match plain.open_image("latest") {
        Err(BackendError::ImageNotFound(msg)) => {
            assert!(
                msg.contains("image \"latest\" not found (tags: basic, odd)"),
                "{msg}"
            );
            assert!(msg.contains("oci-plain"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
    let odd = plain.open_image("odd").unwrap();
    assert_eq!(odd.image_id, f.image("odd").id);
    let by_digest = plain.open_image(&odd.manifest_digest).unwrap();
    assert_eq!(by_digest.image_id, odd.image_id);
    assert_eq!(
        odd.manifest_digest,
        format!(
            "sha256:{}",
            hex::encode(Sha256::digest(odd.manifest.as_bytes()))
        )
    );
}

/// A private copy of layout `dir`.
fn copy_layout(f: &Fixtures, dir: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::TempDir::new_in(&f.out).unwrap();
    let status = std::process::Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(f.layout_dir(dir))
        .arg(tmp.path())
        .status()
        .unwrap();
    assert!(status.success());
    let path = tmp.path().join(dir);
    (tmp, path)
}

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.strip_prefix("sha256:").unwrap())
}

fn stream_err(b: &OciBackend, reference: &str, index: usize) -> String {
    let image = b.open_image(reference).unwrap();
    match b.stream_layer(&image, index, 64, &mut TarSink::default()) {
        Ok(_) => panic!("layer {index} streamed despite the damage"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn a_corrupted_blob_byte_is_an_error_naming_the_blob() {
    let Some(f) = fixtures() else { return };
    for dir in ["oci-plain", "oci-gzip", "oci-zstd"] {
        let (_tmp, layout) = copy_layout(f, dir);
        let digest = f
            .layouts
            .iter()
            .find(|l| l.dir == dir && l.tag == "basic")
            .unwrap()
            .blobs[0]
            .clone();
        let path = blob_path(&layout, &digest);
        let mut data = std::fs::read(&path).unwrap();
        let middle = data.len() / 2;
        data[middle] ^= 0x40;
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, &data).unwrap();
        let b = OciBackend::open(&layout).unwrap();
        let err = stream_err(&b, "basic", 0);
        assert!(
            err.starts_with(&format!("layer blob {digest}: ")),
            "{dir}: {err}"
        );
        if dir == "oci-plain" {
            assert!(err.contains(": the blob has digest sha256:"), "{err}");
        }
    }
}

#[test]
fn trailing_garbage_after_the_compressed_stream_is_an_error() {
    let Some(f) = fixtures() else { return };
    for dir in ["oci-gzip", "oci-zstd"] {
        let (_tmp, layout) = copy_layout(f, dir);
        let digest = f
            .layouts
            .iter()
            .find(|l| l.dir == dir && l.tag == "basic")
            .unwrap()
            .blobs[1]
            .clone();
        let path = blob_path(&layout, &digest);
        let mut data = std::fs::read(&path).unwrap();
        data.extend_from_slice(b"trailing garbage");
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, &data).unwrap();
        let b = OciBackend::open(&layout).unwrap();
        let err = stream_err(&b, "basic", 1);
        assert!(
            err.starts_with(&format!("layer blob {digest}: ")),
            "{dir}: {err}"
        );
    }
}

/// Write `data` as a blob of `layout`; its digest.
fn put_blob(layout: &Path, data: &[u8]) -> String {
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(data)));
    std::fs::write(blob_path(layout, &digest), data).unwrap();
    digest
}

#[test]
fn a_config_claiming_another_diff_id_is_caught() {
    let Some(f) = fixtures() else { return };
    let (_tmp, layout) = copy_layout(f, "oci-zstd");
    let b = OciBackend::open(&layout).unwrap();
    let image = b.open_image("basic").unwrap();
    // Rewrite the config (and so the manifest and index) to claim odd's base layer diff_id.
    let claimed = f.image("odd").diff_ids[0].clone();
    let mut config: serde_json::Value = serde_json::from_str(&image.config).unwrap();
    config["rootfs"]["diff_ids"][0] = claimed.as_str().into();
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let config_digest = put_blob(&layout, &config_bytes);
    let mut manifest: serde_json::Value = serde_json::from_str(&image.manifest).unwrap();
    manifest["config"]["digest"] = config_digest.as_str().into();
    manifest["config"]["size"] = config_bytes.len().into();
    let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
    let manifest_digest = put_blob(&layout, &manifest_bytes);
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    index["manifests"][0]["digest"] = manifest_digest.as_str().into();
    index["manifests"][0]["size"] = manifest_bytes.len().into();
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();

    let b = OciBackend::open(&layout).unwrap();
    let err = stream_err(&b, "basic", 0);
    assert!(
        err.contains(&format!(
            "the uncompressed layer has digest {}, the config says {claimed}",
            image.layers[0].diff_id
        )),
        "{err}"
    );
    // The other layers are untouched.
    let image = b.open_image("basic").unwrap();
    let mut sink = TarSink::default();
    b.stream_layer(&image, 1, 64, &mut sink).unwrap();
    assert_eq!(sink.digest(), image.layers[1].diff_id);
}

#[test]
fn a_manifest_blob_that_does_not_match_its_digest_is_refused() {
    let Some(f) = fixtures() else { return };
    let (_tmp, layout) = copy_layout(f, "oci-plain");
    let b = OciBackend::open(&layout).unwrap();
    let digest = b.open_image("odd").unwrap().manifest_digest;
    let path = blob_path(&layout, &digest);
    let mut data = std::fs::read(&path).unwrap();
    data.push(b'\n');
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, &data).unwrap();
    let err = format!("{:#}", b.open_image("odd").unwrap_err());
    assert!(
        err.starts_with(&format!("blob {digest} has digest sha256:")),
        "{err}"
    );
}

#[test]
fn not_a_layout() {
    let Some(f) = fixtures() else { return };
    let err = format!("{:#}", OciBackend::open(&f.graphroot).unwrap_err());
    assert!(err.contains("is not an OCI layout"), "{err}");
}
