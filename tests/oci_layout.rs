//! The OCI layout backend against layouts skopeo exported from the fixture store.

mod common;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use common::tools::Unmount;
use common::{Fixtures, TarSink, fixtures};
use oci_spec::image::{
    ANNOTATION_REF_NAME, Descriptor, Digest as OciDigest, ImageConfiguration, ImageIndex,
    ImageManifest, MediaType,
};
use ocidir::OciRead;
use ocidir::cap_std::{ambient_authority, fs::Dir};
use sha2::{Digest, Sha256};
use splitfdstream::helper::cstor::CstorBackend;
use splitfdstream::helper::oci_layout::{MAX_CHUNK, MAX_JSON_LEN, OciBackend};
use splitfdstream::helper::{Backend, BackendError, OpenedImage};

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
        // A new blob (the old one plus garbage) under its own digest and size, so that neither
        // the blob digest nor the size check can catch it: only the end of the stream can.
        let mut digest = String::new();
        edit_image(&layout, "basic", |layout, manifest, _| {
            let layer = &mut manifest.layers_mut()[1];
            let mut data = std::fs::read(blob_path(layout, layer.digest().as_ref())).unwrap();
            data.extend_from_slice(b"trailing garbage");
            digest = put_blob(layout, &data);
            layer.set_digest(OciDigest::from_str(&digest).unwrap());
            layer.set_size(data.len() as u64);
        });
        let b = OciBackend::open(&layout).unwrap();
        let err = stream_err(&b, "basic", 1);
        assert!(
            err.starts_with(&format!("layer blob {digest}: decompressing")),
            "{dir}: {err}"
        );
    }
}

#[test]
fn a_blob_of_another_size_than_its_descriptor_is_refused_before_streaming() {
    let Some(f) = fixtures() else { return };
    let (_tmp, layout) = copy_layout(f, "oci-plain");
    let digest = layout_blobs(f, "oci-plain", "basic")[2].clone();
    let path = blob_path(&layout, &digest);
    let mut data = std::fs::read(&path).unwrap();
    let size = data.len();
    data.truncate(size - 512);
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, &data).unwrap();
    let b = OciBackend::open(&layout).unwrap();
    let image = b.open_image("basic").unwrap();
    let mut sink = TarSink::default();
    let err = format!(
        "{:#}",
        b.stream_layer(&image, 2, 64, &mut sink).unwrap_err()
    );
    assert_eq!(
        err,
        format!(
            "layer blob {digest}: the blob is {} bytes, its descriptor says {size}",
            size - 512
        )
    );
    assert_eq!(sink.bytes, 0, "nothing was sent");
}

/// Write `data` as a blob of `layout`; its digest.
fn put_blob(layout: &Path, data: &[u8]) -> String {
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(data)));
    std::fs::write(blob_path(layout, &digest), data).unwrap();
    digest
}

/// The digests of `tag`'s layer blobs in fixture layout `dir`.
fn layout_blobs(f: &Fixtures, dir: &str, tag: &str) -> Vec<String> {
    f.layouts
        .iter()
        .find(|l| l.dir == dir && l.tag == tag)
        .unwrap_or_else(|| panic!("no fixture layout {dir}:{tag}"))
        .blobs
        .clone()
}

/// The descriptor of `tag` in the layout's index.json, and the index.
fn tagged(layout: &Path, tag: &str) -> (ImageIndex, usize) {
    let index: ImageIndex =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let at = index
        .manifests()
        .iter()
        .position(|d| {
            d.annotations()
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_REF_NAME))
                .is_some_and(|t| t == tag)
        })
        .unwrap_or_else(|| panic!("no tag {tag} in {}", layout.display()));
    (index, at)
}

/// Point `tag` of the layout at the manifest `manifest` (written as a blob), with `media_type`.
fn retag(layout: &Path, tag: &str, manifest: &[u8], media_type: MediaType) -> String {
    let digest = put_blob(layout, manifest);
    let (mut index, at) = tagged(layout, tag);
    let mut manifests = index.manifests().clone();
    let desc = &mut manifests[at];
    desc.set_digest(OciDigest::from_str(&digest).unwrap());
    desc.set_size(manifest.len() as u64);
    desc.set_media_type(media_type);
    index.set_manifests(manifests);
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    digest
}

/// Rewrite image `tag` of the layout: `edit` changes its manifest and config (it may add
/// blobs), which are then written as new blobs and tagged in index.json.
fn edit_image(
    layout: &Path,
    tag: &str,
    edit: impl FnOnce(&Path, &mut ImageManifest, &mut ImageConfiguration),
) {
    let (index, at) = tagged(layout, tag);
    let desc = &index.manifests()[at];
    let mut manifest: ImageManifest =
        serde_json::from_slice(&std::fs::read(blob_path(layout, desc.digest().as_ref())).unwrap())
            .unwrap();
    let mut config: ImageConfiguration = serde_json::from_slice(
        &std::fs::read(blob_path(layout, manifest.config().digest().as_ref())).unwrap(),
    )
    .unwrap();
    edit(layout, &mut manifest, &mut config);
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let mut config_desc = manifest.config().clone();
    config_desc.set_digest(OciDigest::from_str(&put_blob(layout, &config_bytes)).unwrap());
    config_desc.set_size(config_bytes.len() as u64);
    manifest.set_config(config_desc);
    let media_type = desc.media_type().clone();
    retag(
        layout,
        tag,
        &serde_json::to_vec(&manifest).unwrap(),
        media_type,
    );
}

#[test]
fn a_config_claiming_another_diff_id_is_caught() {
    let Some(f) = fixtures() else { return };
    let (_tmp, layout) = copy_layout(f, "oci-zstd");
    let b = OciBackend::open(&layout).unwrap();
    let image = b.open_image("basic").unwrap();
    // Rewrite the config (and so the manifest and index) to claim odd's base layer diff_id.
    let claimed = f.image("odd").diff_ids[0].clone();
    edit_image(&layout, "basic", |_, _, config| {
        config.rootfs_mut().diff_ids_mut()[0] = claimed.clone();
    });

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

/// Run `f` on another thread; panic if it takes longer than `secs` (a blocked open).
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what} did not return within {secs} s"))
}

fn mkfifo(path: &Path) {
    let _ = std::fs::remove_file(path);
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
}

#[test]
fn a_fifo_in_place_of_a_file_fails_without_blocking() {
    let Some(f) = fixtures() else { return };
    let (tmp, layout) = copy_layout(f, "oci-plain");
    let image = OciBackend::open(&layout)
        .unwrap()
        .open_image("basic")
        .unwrap();
    let blob = layout_blobs(f, "oci-plain", "basic")[0].clone();
    mkfifo(&blob_path(&layout, &blob));
    let (layout2, image2) = (layout.clone(), image.clone());
    let err = within(20, "streaming a FIFO blob", move || {
        let b = OciBackend::open(&layout2).unwrap();
        format!(
            "{:#}",
            b.stream_layer(&image2, 0, 64, &mut TarSink::default())
                .unwrap_err()
        )
    });
    assert_eq!(
        err,
        format!(
            "layer blob {blob}: {} is not a regular file",
            blob_path(&layout, &blob).display()
        )
    );

    // The manifest, and index.json itself.
    mkfifo(&blob_path(&layout, &image.manifest_digest));
    let layout2 = layout.clone();
    let err = within(20, "reading a FIFO manifest", move || {
        format!(
            "{:#}",
            OciBackend::open(&layout2)
                .unwrap()
                .open_image("basic")
                .unwrap_err()
        )
    });
    assert!(err.ends_with(" is not a regular file"), "{err}");
    assert!(err.contains(&image.manifest_digest[7..]), "{err}");
    mkfifo(&layout.join("index.json"));
    let layout2 = layout.clone();
    let err = within(20, "reading a FIFO index.json", move || {
        format!(
            "{:#}",
            OciBackend::open(&layout2)
                .unwrap()
                .open_image("basic")
                .unwrap_err()
        )
    });
    assert_eq!(
        err,
        format!(
            "{} is not a regular file",
            layout.join("index.json").display()
        )
    );
    drop(tmp);
}

#[test]
fn a_huge_index_json_or_json_blob_is_refused_before_it_is_read() {
    let Some(f) = fixtures() else { return };
    let (_tmp, layout) = copy_layout(f, "oci-plain");
    // Sparse: costs no disk, and reading it would cost 64 MiB of memory and time.
    let index = layout.join("index.json");
    let saved = std::fs::read(&index).unwrap();
    let file = std::fs::File::options().write(true).open(&index).unwrap();
    file.set_len(MAX_JSON_LEN + 1).unwrap();
    drop(file);
    let b = OciBackend::open(&layout).unwrap();
    let err = format!("{:#}", b.open_image("basic").unwrap_err());
    assert_eq!(
        err,
        format!(
            "{} is larger than {MAX_JSON_LEN} bytes",
            layout.join("index.json").display()
        )
    );
    std::fs::write(&index, &saved).unwrap();

    // A manifest whose descriptor claims more than the limit is not opened at all.
    let manifest = b.open_image("basic").unwrap().manifest;
    retag(
        &layout,
        "basic",
        manifest.as_bytes(),
        MediaType::ImageManifest,
    );
    let (mut idx, at) = tagged(&layout, "basic");
    let mut manifests = idx.manifests().clone();
    manifests[at].set_size(1 << 40);
    idx.set_manifests(manifests);
    std::fs::write(&index, serde_json::to_vec(&idx).unwrap()).unwrap();
    let err = format!("{:#}", b.open_image("basic").unwrap_err());
    let digest = idx.manifests()[at].digest().to_string();
    assert_eq!(
        err,
        format!("blob {digest} is 1099511627776 bytes, more than the {MAX_JSON_LEN} accepted")
    );

    // A config blob that is larger than the limit (its descriptor lying about it).
    let (_tmp, layout) = copy_layout(f, "oci-plain");
    let b = OciBackend::open(&layout).unwrap();
    let config_digest = b.open_image("basic").unwrap().config_digest;
    let path = blob_path(&layout, &config_digest);
    std::fs::remove_file(&path).unwrap();
    std::fs::File::create(&path)
        .unwrap()
        .set_len(MAX_JSON_LEN + 1)
        .unwrap();
    let err = format!("{:#}", b.open_image("basic").unwrap_err());
    assert_eq!(
        err,
        format!("{} is larger than {MAX_JSON_LEN} bytes", path.display())
    );
}

/// ocidir's own reader opens through cap-std, which follows symlinks that stay beneath the
/// directory it opens from; this backend follows none (see `helper::oci_layout`'s module doc).
#[test]
fn symlinked_blobs_are_refused_inside_and_outside_the_layout() {
    let Some(f) = fixtures() else { return };
    let (tmp, layout) = copy_layout(f, "oci-plain");
    let blob = layout_blobs(f, "oci-plain", "basic")[1].clone();
    let path = blob_path(&layout, &blob);
    let b = OciBackend::open(&layout).unwrap();
    let image = b.open_image("basic").unwrap();
    let manifest: ImageManifest = serde_json::from_str(&image.manifest).unwrap();
    let desc: &Descriptor = &manifest.layers()[1];
    let cap_std_reader = || {
        let dir = Dir::open_ambient_dir(&layout, ambient_authority()).unwrap();
        ocidir::OciDir::open(dir).unwrap().read_blob(desc).map(drop)
    };

    // ocidir opens blobs beneath `blobs/sha256`: a symlink that stays in there is followed by
    // cap-std, not by this backend.
    let moved = path.with_file_name("moved-blob");
    std::fs::rename(&path, &moved).unwrap();
    std::os::unix::fs::symlink("moved-blob", &path).unwrap();
    cap_std_reader().expect("cap-std follows a symlink that stays beneath its directory");
    let err = stream_err(&b, "basic", 1);
    assert!(
        err.starts_with(&format!("layer blob {blob}: opening {}: ", path.display())),
        "{err}"
    );

    // One that leaves `blobs/sha256` (here for the layout's top) or the layout: both refuse.
    std::fs::remove_file(&path).unwrap();
    std::fs::rename(&moved, layout.join("moved-blob")).unwrap();
    std::os::unix::fs::symlink("../../moved-blob", &path).unwrap();
    assert!(
        cap_std_reader().is_err(),
        "cap-std let a symlink leave blobs/sha256"
    );
    let err = stream_err(&b, "basic", 1);
    assert!(
        err.starts_with(&format!("layer blob {blob}: opening {}: ", path.display())),
        "{err}"
    );
    let moved = layout.join("moved-blob");
    let outside = tmp.path().join("outside-blob");
    std::fs::rename(&moved, &outside).unwrap();
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink(&outside, &path).unwrap();
    assert!(cap_std_reader().is_err(), "cap-std let a symlink escape");
    let err = stream_err(&b, "basic", 1);
    assert!(
        err.starts_with(&format!("layer blob {blob}: opening {}: ", path.display())),
        "{err}"
    );

    // A symlinked manifest, and a symlinked blobs directory.
    let manifest_path = blob_path(&layout, &image.manifest_digest);
    let kept = tmp.path().join("manifest");
    std::fs::rename(&manifest_path, &kept).unwrap();
    std::os::unix::fs::symlink(&kept, &manifest_path).unwrap();
    let err = format!("{:#}", b.open_image("basic").unwrap_err());
    assert!(
        err.starts_with(&format!("opening {}: ", manifest_path.display())),
        "{err}"
    );
    let blobs = layout.join("blobs/sha256");
    std::fs::rename(&blobs, layout.join("blobs/real")).unwrap();
    std::os::unix::fs::symlink("real", &blobs).unwrap();
    let err = format!("{:#}", OciBackend::open(&layout).unwrap_err());
    assert!(
        err.starts_with(&format!(
            "{} is not an OCI layout: opening {}: ",
            layout.display(),
            blobs.display()
        )),
        "{err}"
    );
}

#[test]
fn a_blob_behind_a_mount_point_is_refused() {
    let Some(f) = fixtures() else { return };
    let (tmp, layout) = copy_layout(f, "oci-plain");
    let blob = layout_blobs(f, "oci-plain", "basic")[1].clone();
    let path = blob_path(&layout, &blob);
    // The same bytes, bind-mounted over the blob from outside the layout.
    let outside = tmp.path().join("outside-blob");
    std::fs::copy(&path, &outside).unwrap();
    let mounted = std::process::Command::new("mount")
        .arg("--bind")
        .arg(&outside)
        .arg(&path)
        .status()
        .unwrap();
    if !mounted.success() {
        println!("SKIP: cannot bind-mount (not root?)");
        return;
    }
    let _u = Unmount(path.clone());
    let b = OciBackend::open(&layout).unwrap();
    let err = stream_err(&b, "basic", 1);
    assert!(
        err.starts_with(&format!("layer blob {blob}: opening {}: ", path.display())),
        "{err}"
    );
}

#[test]
fn image_indexes_are_not_descended_into() {
    let Some(f) = fixtures() else { return };
    let (_tmp, layout) = copy_layout(f, "oci-plain");
    let b = OciBackend::open(&layout).unwrap();
    let manifest_digest = b.open_image("basic").unwrap().manifest_digest;
    // An index blob holding the image's manifest, as a multi-arch image would.
    let (index, at) = tagged(&layout, "basic");
    let nested = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [index.manifests()[at]],
    });
    let nested = serde_json::to_vec(&nested).unwrap();
    for (media_type, says) in [
        (
            MediaType::ImageIndex,
            "application/vnd.oci.image.index.v1+json",
        ),
        (
            MediaType::Other(
                "application/vnd.docker.distribution.manifest.list.v2+json".to_owned(),
            ),
            "application/vnd.docker.distribution.manifest.list.v2+json",
        ),
        // The descriptor says manifest: the blob's content is an index all the same.
        (
            MediaType::ImageManifest,
            "application/vnd.oci.image.index.v1+json",
        ),
    ] {
        let digest = retag(&layout, "basic", &nested, media_type);
        let err = format!("{:#}", b.open_image("basic").unwrap_err());
        assert_eq!(
            err,
            format!("{digest} is an image index ({says}); nested indexes are not supported")
        );
    }
    assert_ne!(manifest_digest, "");
}

#[test]
fn docker_and_non_distributable_media_types_stream_and_others_are_refused() {
    let Some(f) = fixtures() else { return };
    let diff_ids = &f.image("basic").diff_ids;
    for (dir, layer_type) in [
        (
            "oci-gzip",
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
        ),
        (
            "oci-gzip",
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        ),
        ("oci-plain", "application/vnd.docker.image.rootfs.diff.tar"),
        (
            "oci-plain",
            "application/vnd.oci.image.layer.nondistributable.v1.tar",
        ),
        (
            "oci-zstd",
            "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        ),
    ] {
        let (_tmp, layout) = copy_layout(f, dir);
        edit_image(&layout, "basic", |_, manifest, _| {
            manifest.set_media_type(Some(MediaType::Other(
                "application/vnd.docker.distribution.manifest.v2+json".to_owned(),
            )));
            for layer in manifest.layers_mut() {
                layer.set_media_type(MediaType::from(layer_type));
            }
        });
        let b = OciBackend::open(&layout).unwrap();
        let image = b.open_image("basic").unwrap();
        for (i, layer) in image.layers.iter().enumerate() {
            let mut sink = TarSink::default();
            b.stream_layer(&image, i, 64, &mut sink)
                .unwrap_or_else(|e| panic!("{dir} {layer_type} layer {i}: {e:#}"));
            assert_eq!(&sink.digest(), &diff_ids[i], "{dir} {layer_type} layer {i}");
            assert_eq!(&layer.diff_id, &diff_ids[i]);
        }
    }
    let (_tmp, layout) = copy_layout(f, "oci-plain");
    edit_image(&layout, "basic", |_, manifest, _| {
        manifest.layers_mut()[0].set_media_type(MediaType::from("application/x-tar"));
    });
    let err = format!(
        "{:#}",
        OciBackend::open(&layout)
            .unwrap()
            .open_image("basic")
            .unwrap_err()
    );
    let blob = &layout_blobs(f, "oci-plain", "basic")[0];
    assert_eq!(
        err,
        format!("layer {blob} has unsupported media type \"application/x-tar\"")
    );
}

/// Parsed for validation only: what the backend serves are the bytes as stored, whatever
/// their formatting or the fields `oci-spec` does not know.
#[test]
fn manifest_and_config_bytes_are_served_as_stored() {
    let Some(f) = fixtures() else { return };
    let (_tmp, layout) = copy_layout(f, "oci-plain");
    let b = OciBackend::open(&layout).unwrap();
    let image = b.open_image("odd").unwrap();
    let odd = |json: &str| {
        let mut v: serde_json::Value = serde_json::from_str(json).unwrap();
        v.as_object_mut().unwrap().insert(
            "x-unknown".to_owned(),
            serde_json::json!({"kept": [1, 2.50, "é"]}),
        );
        // Pretty, with a trailing newline: nothing like what a serializer would write back.
        let mut bytes = serde_json::to_vec_pretty(&v).unwrap();
        bytes.extend_from_slice(b"\n\n");
        bytes
    };
    let config = odd(&image.config);
    let config_digest = put_blob(&layout, &config);
    let mut manifest: ImageManifest = serde_json::from_str(&image.manifest).unwrap();
    let mut config_desc = manifest.config().clone();
    config_desc.set_digest(OciDigest::from_str(&config_digest).unwrap());
    config_desc.set_size(config.len() as u64);
    manifest.set_config(config_desc);
    let manifest = odd(&serde_json::to_string(&manifest).unwrap());
    let manifest_digest = retag(&layout, "odd", &manifest, MediaType::ImageManifest);

    let served: OpenedImage = b.open_image("odd").unwrap();
    assert_eq!(served.manifest.as_bytes(), manifest.as_slice());
    assert_eq!(served.config.as_bytes(), config.as_slice());
    assert_eq!(served.manifest_digest, manifest_digest);
    assert_eq!(served.config_digest, config_digest);
    assert_eq!(served.image_id, config_digest["sha256:".len()..]);
    let diff_ids: Vec<&str> = served.layers.iter().map(|l| l.diff_id.as_str()).collect();
    assert_eq!(diff_ids, f.image("odd").diff_ids);
}
