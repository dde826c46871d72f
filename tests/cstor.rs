//! The containers-storage backend against real podman/buildah stores (library API, no RPC).

mod common;

use std::os::unix::fs::symlink;
use std::path::Path;

use common::fixtures::PrivateStore;
use common::{Fixtures, TarSink, fixtures, gnu_tar_regular_sizes};
use splitfdstream::helper::cstor::CstorBackend;
use splitfdstream::helper::{Backend, BackendError, OpenedImage};
use splitfdstream::proto::rpc::{DEFAULT_INLINE_THRESHOLD, MAX_INLINE_THRESHOLD};

fn backend(f: &Fixtures) -> CstorBackend {
    CstorBackend::open(&f.store()).expect("opening the fixture store")
}

/// Stream layer `index` of `image` into a fresh sink.
fn stream(b: &dyn Backend, image: &OpenedImage, index: usize, threshold: u64) -> TarSink {
    let mut sink = TarSink::default();
    b.stream_layer(image, index, threshold, &mut sink)
        .unwrap_or_else(|e| panic!("layer {index} of {}: {e:#}", image.image_id));
    sink
}

/// The error text of streaming layer `index`.
fn stream_error(b: &dyn Backend, image: &OpenedImage, index: usize, threshold: u64) -> String {
    let mut sink = TarSink::default();
    match b.stream_layer(image, index, threshold, &mut sink) {
        Ok(_) => panic!("layer {index} streamed despite the damage"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn every_layer_rebuilds_to_its_diff_id() {
    let Some(f) = fixtures() else { return };
    let b = backend(f);
    for fixture in &f.images {
        let image = b.open_image(&fixture.reference).unwrap();
        assert_eq!(image.image_id, fixture.id);
        assert_eq!(image.config_digest, format!("sha256:{}", fixture.id));
        assert_eq!(image.manifest_digest, fixture.manifest_digest);
        let diff_ids: Vec<&str> = image.layers.iter().map(|l| l.diff_id.as_str()).collect();
        assert_eq!(diff_ids, fixture.diff_ids, "{}", fixture.name);
        let ids: Vec<&str> = image.layers.iter().map(|l| l.id.as_str()).collect();
        assert_eq!(ids, fixture.layer_ids, "{}", fixture.name);
        for (i, layer) in image.layers.iter().enumerate() {
            let sink = stream(&b, &image, i, DEFAULT_INLINE_THRESHOLD);
            assert_eq!(sink.digest(), layer.diff_id, "{} layer {i}", fixture.name);
            assert_eq!(Some(sink.bytes), layer.size, "{} layer {i}", fixture.name);
            assert!(sink.fd_sizes.iter().all(|&s| s > DEFAULT_INLINE_THRESHOLD));
            assert_eq!(
                sink.fds_with_crc,
                sink.fd_sizes.len(),
                "tar-split records CRCs"
            );
            assert_eq!(sink.crc_mismatches, 0);
        }
    }
}

#[test]
fn threshold_splits_inline_and_fd_bodies() {
    let Some(f) = fixtures() else { return };
    let b = backend(f);
    for name in ["basic", "odd", "old"] {
        let image = b.open_image(name).unwrap();
        for (i, layer) in image.layers.iter().enumerate() {
            let mut sink = TarSink::keeping();
            let entries = b.stream_layer(&image, i, 64, &mut sink).unwrap();
            assert_eq!(sink.digest(), layer.diff_id);
            let tar = sink.keep.take().unwrap();
            // GNU tar's view of the rebuilt layer: every body over 64 bytes came as an fd.
            let mut expected: Vec<u64> = gnu_tar_regular_sizes(&tar)
                .into_iter()
                .filter(|&s| s > 64)
                .collect();
            let mut got = sink.fd_sizes.clone();
            expected.sort_unstable();
            got.sort_unstable();
            assert_eq!(got, expected, "{name} layer {i}");
            assert!(entries > 0 || layer.size == Some(1024), "{name} layer {i}");

            // Everything inline, and everything as fds, rebuild the same tar.
            let all_fds = stream(&b, &image, i, 0);
            assert_eq!(all_fds.digest(), layer.diff_id);
            assert!(all_fds.fd_sizes.len() >= sink.fd_sizes.len());
            let all_inline = stream(&b, &image, i, MAX_INLINE_THRESHOLD);
            assert_eq!(all_inline.digest(), layer.diff_id);
        }
    }
}

#[test]
fn the_empty_layer_and_the_65_byte_file() {
    let Some(f) = fixtures() else { return };
    let b = backend(f);
    let odd = b.open_image("odd").unwrap();
    assert_eq!(odd.layers[1].size, Some(1024));
    let mut sink = TarSink::keeping();
    let entries = b.stream_layer(&odd, 1, 64, &mut sink).unwrap();
    assert_eq!(entries, 0);
    assert_eq!(sink.keep.as_deref(), Some(&[0u8; 1024][..]));
    assert_eq!(
        sink.digest(),
        "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"
    );

    // basic's base layer holds files of exactly 64 and 65 bytes: only the latter is an fd.
    let basic = b.open_image("basic").unwrap();
    let sink = stream(&b, &basic, 0, 64);
    assert!(sink.fd_sizes.contains(&65));
    assert!(!sink.fd_sizes.contains(&64));
    let sink = stream(&b, &basic, 0, 65);
    assert!(!sink.fd_sizes.contains(&65));
}

#[test]
fn references_resolve_like_podman() {
    let Some(f) = fixtures() else { return };
    let b = backend(f);
    let basic = f.image("basic");
    for reference in [
        "basic".to_owned(),
        "basic:latest".to_owned(),
        "localhost/basic".to_owned(),
        "localhost/basic:latest".to_owned(),
        basic.id.clone(),
        format!("sha256:{}", basic.id),
        format!("@{}", basic.id),
        basic.id[..12].to_owned(),
        format!("localhost/basic@{}", basic.manifest_digest),
        format!("basic@{}", basic.manifest_digest),
    ] {
        let image = b
            .open_image(&reference)
            .unwrap_or_else(|e| panic!("{reference}: {e:#}"));
        assert_eq!(image.image_id, basic.id, "{reference}");
    }
    for missing in [
        "nonexistent",
        "basic:other-tag",
        "quay.io/basic:latest",
        "odd@sha256:0000000000000000000000000000000000000000000000000000000000000000",
    ] {
        match b.open_image(missing) {
            Err(BackendError::ImageNotFound(msg)) => {
                assert!(msg.contains(missing), "{msg}");
                assert!(msg.contains(&f.graphroot.display().to_string()), "{msg}");
            }
            other => panic!("{missing}: {other:?}"),
        }
    }
    // Too short to be an id prefix.
    assert!(matches!(
        b.open_image(&basic.id[..2]),
        Err(BackendError::ImageNotFound(_))
    ));
    let odd = f.image("odd");
    assert!(matches!(
        b.open_image(&format!("basic@{}", odd.manifest_digest)),
        Err(BackendError::ImageNotFound(_))
    ));
}

fn private(f: &Fixtures) -> PrivateStore {
    f.private_store(&["basic"])
}

/// Replace `rel` in the diff dir of layer `index` of basic with what `make` creates there.
fn damage(store: &PrivateStore, f: &Fixtures, index: usize, rel: &str, make: impl FnOnce(&Path)) {
    let path = store.diff_dir(&f.image("basic").layer_ids[index]).join(rel);
    std::fs::remove_file(&path).unwrap();
    make(&path);
}

#[test]
fn a_symlink_in_the_diff_dir_is_refused() {
    let Some(f) = fixtures() else { return };
    let store = private(f);
    let b = CstorBackend::open(&store.store()).unwrap();
    let image = b.open_image("basic").unwrap();
    // A small body, read inline.
    damage(&store, f, 0, "data/sixty-four", |p| {
        symlink("/etc/hostname", p).unwrap()
    });
    let err = stream_error(&b, &image, 0, 64);
    assert!(err.contains("data/sixty-four: is a symlink"), "{err}");
    assert!(err.contains(&image.layers[0].id), "{err}");
    let original = f
        .graphroot
        .join("overlay")
        .join(&image.layers[0].id)
        .join("diff/data/sixty-four");
    damage(&store, f, 0, "data/sixty-four", |p| {
        std::fs::copy(&original, p).unwrap();
    });
    assert_eq!(stream(&b, &image, 0, 64).digest(), image.layers[0].diff_id);
    // A body passed as an fd.
    damage(&store, f, 0, "data/three-mb", |p| {
        symlink("/etc/passwd", p).unwrap()
    });
    let err = stream_error(&b, &image, 0, 64);
    assert!(err.contains("data/three-mb: is a symlink"), "{err}");
}

#[test]
fn a_symlinked_directory_in_the_diff_dir_is_refused() {
    let Some(f) = fixtures() else { return };
    let store = private(f);
    let diff = store.diff_dir(&f.image("basic").layer_ids[2]);
    std::fs::rename(diff.join("usr/bin"), diff.join("usr/bin.real")).unwrap();
    symlink("bin.real", diff.join("usr/bin")).unwrap();
    let b = CstorBackend::open(&store.store()).unwrap();
    let image = b.open_image("basic").unwrap();
    let err = stream_error(&b, &image, 2, 64);
    assert!(
        err.contains("usr/bin/third: is a symlink or lies beneath one"),
        "{err}"
    );
}

#[test]
fn a_fifo_in_the_diff_dir_is_refused_without_blocking() {
    let Some(f) = fixtures() else { return };
    let store = private(f);
    damage(&store, f, 0, "data/hundred-k", |p| {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            p,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap()
    });
    let b = CstorBackend::open(&store.store()).unwrap();
    let image = b.open_image("basic").unwrap();
    let err = stream_error(&b, &image, 0, 64);
    assert!(
        err.contains("data/hundred-k: is a FIFO, not a regular file"),
        "{err}"
    );
}

#[test]
fn a_file_of_another_size_is_refused() {
    let Some(f) = fixtures() else { return };
    let store = private(f);
    damage(&store, f, 0, "data/page", |p| {
        std::fs::write(p, [1u8; 4095]).unwrap()
    });
    let b = CstorBackend::open(&store.store()).unwrap();
    let image = b.open_image("basic").unwrap();
    let err = stream_error(&b, &image, 0, 64);
    assert!(
        err.contains("data/page: is 4095 bytes, the layer's tar-split says 4096"),
        "{err}"
    );
}

#[test]
fn changed_content_fails_the_crc_inline_and_the_diff_id_as_fd() {
    let Some(f) = fixtures() else { return };
    let store = private(f);
    damage(&store, f, 0, "data/sixty-four", |p| {
        std::fs::write(p, [b'x'; 64]).unwrap()
    });
    let b = CstorBackend::open(&store.store()).unwrap();
    let image = b.open_image("basic").unwrap();
    let err = stream_error(&b, &image, 0, 64);
    assert!(err.contains("data/sixty-four: content has CRC-64"), "{err}");
    // As an fd the helper does not read it; the rebuilt tar no longer matches.
    let sink = stream(&b, &image, 0, 0);
    assert_ne!(sink.digest(), image.layers[0].diff_id);
    assert_eq!(sink.crc_mismatches, 1);
}

#[test]
fn a_missing_file_is_named() {
    let Some(f) = fixtures() else { return };
    let store = private(f);
    let diff = store.diff_dir(&f.image("basic").layer_ids[1]);
    std::fs::remove_file(diff.join("usr/bin/second")).unwrap();
    let b = CstorBackend::open(&store.store()).unwrap();
    let image = b.open_image("basic").unwrap();
    let err = stream_error(&b, &image, 1, 64);
    assert!(
        err.contains("usr/bin/second: missing from the diff dir of layer"),
        "{err}"
    );
}

#[test]
fn a_metacopy_stub_reads_from_the_lower_layer() {
    let Some(f) = fixtures() else { return };
    let store = private(f);
    let ids = &f.image("basic").layer_ids;
    // Layer 2 copied data/copied-up up from layer 0 (a chmod). Hollow the copy out into the stub
    // overlayfs would leave with metacopy=on: same size, no data, the metacopy xattr.
    let path = store.diff_dir(&ids[2]).join("data/copied-up");
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::write(&path, b"").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len)
        .unwrap();
    rustix::fs::setxattr(
        &path,
        "trusted.overlay.metacopy",
        b"",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let b = CstorBackend::open(&store.store()).unwrap();
    let image = b.open_image("basic").unwrap();
    let sink = stream(&b, &image, 2, 64);
    assert_eq!(sink.digest(), image.layers[2].diff_id);

    // With the lower copy gone too, the stub has nowhere to read from.
    std::fs::remove_file(store.diff_dir(&ids[0]).join("data/copied-up")).unwrap();
    let err = stream_error(&b, &image, 2, 64);
    assert!(
        err.contains("data/copied-up: a metacopy stub whose data is in no lower layer"),
        "{err}"
    );
}

/// Rewrite a JSON file of the private store with `edit`.
fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[test]
fn a_hostile_layer_id_in_images_json_is_refused() {
    let Some(f) = fixtures() else { return };
    let store = private(f);
    let id = &f.image("basic").id;
    edit_json(&store.graphroot.join("overlay-images/images.json"), |v| {
        for image in v.as_array_mut().unwrap() {
            if image["id"] == id.as_str() {
                image["layer"] = "../../../../etc".into();
            }
        }
    });
    let b = CstorBackend::open(&store.store()).unwrap();
    let err = format!("{:#}", b.open_image("basic").unwrap_err());
    assert!(
        err.contains("layer id \"../../../../etc\" in the store is not 64 lowercase hex digits"),
        "{err}"
    );
    assert!(err.contains(id.as_str()), "{err}");
}

#[test]
fn a_hostile_layer_id_in_layers_json_is_refused() {
    let Some(f) = fixtures() else { return };
    let store = private(f);
    let top = &f.image("basic").layer_ids[2];
    edit_json(&store.graphroot.join("overlay-layers/layers.json"), |v| {
        for layer in v.as_array_mut().unwrap() {
            if layer["id"] == top.as_str() {
                layer["parent"] = "../../../../etc".into();
            }
        }
    });
    let b = CstorBackend::open(&store.store()).unwrap();
    let err = format!("{:#}", b.open_image("basic").unwrap_err());
    assert!(err.contains("\"../../../../etc\""), "{err}");
    assert!(err.contains("not 64 lowercase hex digits"), "{err}");
}

#[test]
fn a_diff_id_that_disagrees_with_the_config_is_refused() {
    let Some(f) = fixtures() else { return };
    let store = private(f);
    let top = &f.image("basic").layer_ids[2];
    let other = &f.image("odd").diff_ids[0];
    edit_json(&store.graphroot.join("overlay-layers/layers.json"), |v| {
        for layer in v.as_array_mut().unwrap() {
            if layer["id"] == top.as_str() {
                layer["diff-digest"] = other.as_str().into();
            }
        }
    });
    let b = CstorBackend::open(&store.store()).unwrap();
    let err = format!("{:#}", b.open_image("basic").unwrap_err());
    assert!(
        err.contains(&format!("layer {top} has diff digest {other}")),
        "{err}"
    );
}

#[test]
fn works_while_podman_has_the_image_mounted() {
    let Some(f) = fixtures() else { return };
    let store = private(f);
    let out = store.podman(&["image", "mount", "localhost/basic:latest"]);
    let merged = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    struct Unmount<'a>(&'a PrivateStore);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            self.0
                .podman(&["image", "unmount", "localhost/basic:latest"]);
        }
    }
    let _unmount = Unmount(&store);
    assert!(
        Path::new(&merged).join("usr/bin/third").exists(),
        "podman mounted {merged}"
    );
    // containers-storage bind-mounts graphroot/overlay onto itself while anything is mounted.
    let overlay = store.graphroot.join("overlay");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        mountinfo
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(overlay.to_str().unwrap())),
        "{} is not a mount point while an image is mounted",
        overlay.display()
    );
    let b = CstorBackend::open(&store.store()).unwrap();
    let image = b.open_image("basic").unwrap();
    for (i, layer) in image.layers.iter().enumerate() {
        assert_eq!(stream(&b, &image, i, 64).digest(), layer.diff_id);
    }
}

#[test]
fn a_locator_of_another_backend_is_refused() {
    let Some(f) = fixtures() else { return };
    let b = backend(f);
    let mut image = b.open_image("basic").unwrap();
    assert!(stream_error(&b, &image, 3, 64).contains("has no containers-storage layer 3"));
    image.locators[0] = splitfdstream::helper::LayerLocator::Cstor {
        layer_id: "../../../../etc".into(),
        parents: vec![],
    };
    let err = stream_error(&b, &image, 0, 64);
    assert!(err.contains("not 64 lowercase hex digits"), "{err}");
}

#[test]
fn a_read_only_store_is_served_without_writes() {
    let Some(f) = fixtures() else { return };
    // A read-only bind mount of the shared store: any create, write or O_RDWR open would fail.
    let dir = tempfile::TempDir::new_in(&f.out).unwrap();
    let ro = dir.path().join("graph");
    std::fs::create_dir(&ro).unwrap();
    let mount = |args: &[&str]| {
        let status = std::process::Command::new("mount")
            .args(args)
            .status()
            .unwrap();
        assert!(status.success(), "mount {args:?}");
    };
    let ro_str = ro.to_str().unwrap();
    mount(&["--bind", f.graphroot.to_str().unwrap(), ro_str]);
    struct Unmount<'a>(&'a str);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(ro_str);
    mount(&["-o", "remount,bind,ro", ro_str]);
    let store = splitfdstream::proto::source::Store::ContainersStorage {
        driver: None,
        graphroot: Some(ro.clone()),
        runroot: Some(dir.path().join("run")),
    };
    let b = CstorBackend::open(&store).unwrap();
    let image = b.open_image("odd").unwrap();
    for (i, layer) in image.layers.iter().enumerate() {
        assert_eq!(stream(&b, &image, i, 64).digest(), layer.diff_id);
    }
}
