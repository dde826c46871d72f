//! `splitfdstream export`: OCI layouts that skopeo, podman's store and our own `pull` accept,
//! with layers that are the exact layer tars.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixtures;
use common::tools::{cfs, cfsctl};
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_splitfdstream");

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn export(source: &str, dest: &str, extra: &[&str]) -> String {
    run(Command::new(BIN).args(["export", source, dest]).args(extra))
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.strip_prefix("sha256:").unwrap())
}

/// The manifest tagged `tag` in `layout`.
fn manifest(layout: &Path, tag: &str) -> serde_json::Value {
    let index = json(&layout.join("index.json"));
    let desc = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no manifest tagged {tag}: {index}"));
    json(&blob(layout, desc["digest"].as_str().unwrap()))
}

fn sha256_hex(mut r: impl Read) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            return format!("sha256:{}", hex::encode(h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

/// Every blob is named by its digest.
fn assert_blobs_named_by_digest(layout: &Path) {
    for e in std::fs::read_dir(layout.join("blobs/sha256")).unwrap() {
        let e = e.unwrap();
        let digest = sha256_hex(std::fs::File::open(e.path()).unwrap());
        assert_eq!(
            digest,
            format!("sha256:{}", e.file_name().to_string_lossy()),
            "a blob not named by its digest"
        );
    }
}

/// `skopeo copy SOURCE` into a new, empty containers-storage store: the image id there.
fn copy_into_new_store(source: &str, parent: &Path) -> String {
    let graph = tempfile::TempDir::new_in(parent).unwrap();
    // podman refuses a run root longer than 50 bytes.
    let run_root = tempfile::TempDir::new().unwrap();
    let store = format!(
        "containers-storage:[overlay@{}+{}]",
        graph.path().display(),
        run_root.path().display()
    );
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        source,
        &format!("{store}localhost/exported:latest"),
    ]));
    let podman = |args: &[&str]| {
        let mut cmd = Command::new("podman");
        cmd.arg("--storage-driver=overlay")
            .arg("--root")
            .arg(graph.path())
            .arg("--runroot")
            .arg(run_root.path())
            .arg("--tmpdir")
            .arg(run_root.path().join("libpod-tmp"))
            .args(args);
        cmd
    };
    let id = run(&mut podman(&[
        "image",
        "inspect",
        "--format",
        "{{.Id}}",
        "localhost/exported:latest",
    ]));
    // The store's layers may be mounted by nothing, but its own bind mount must go.
    let _ = podman(&["rmi", "--all", "--force"]).output();
    let _ = Command::new("umount")
        .arg("-l")
        .arg(graph.path().join("overlay"))
        .output();
    id.trim().to_owned()
}

#[test]
fn uncompressed_layers_are_the_diff_ids_and_tools_accept_the_layout() {
    let Some(f) = fixtures() else { return };
    let work = tempfile::TempDir::new_in(&f.out).unwrap();
    let layout = work.path().join("layout");
    for name in ["basic", "odd", "times"] {
        let image = f.image(name);
        let source = format!("{}{}", f.store_arg(), image.reference);
        let dest = format!("oci:{}:{name}", layout.display());
        let printed = export(&source, &dest, &["--compress", "none"]);
        let m = manifest(&layout, name);
        let layers: Vec<&str> = m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap())
            .collect();
        assert_eq!(
            layers, image.diff_ids,
            "{name}: layer digests are not the diff_ids"
        );
        assert_eq!(
            m["config"]["digest"].as_str().unwrap(),
            format!("sha256:{}", image.id),
            "{name}: the config digest is not the image id"
        );
        assert!(
            m["layers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|l| l["mediaType"] == "application/vnd.oci.image.layer.v1.tar")
        );
        if name != "times" {
            // buildah stored an OCI manifest of these very blobs: it is kept byte for byte.
            assert_eq!(
                printed.trim(),
                image.manifest_digest,
                "{name}: a new manifest"
            );
        }
        let index = json(&layout.join("index.json"));
        assert!(
            index.to_string().contains(printed.trim()),
            "{name}: printed digest {printed} not in the index"
        );
        let inspected: serde_json::Value =
            serde_json::from_str(&run(Command::new("skopeo").args(["inspect", &dest]))).unwrap();
        assert_eq!(inspected["Layers"].as_array().unwrap().len(), layers.len());
    }
    assert_blobs_named_by_digest(&layout);

    // skopeo copies it into a store, and it is the same image there.
    let id = copy_into_new_store(&format!("oci:{}:basic", layout.display()), work.path());
    assert_eq!(id, f.image("basic").id);

    // A second export reads no layer again: the blobs stay the same files.
    let ino = |d: &str| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(blob(&layout, d)).unwrap().ino()
    };
    let before: Vec<u64> = f.image("basic").diff_ids.iter().map(|d| ino(d)).collect();
    export(
        &format!("{}{}", f.store_arg(), f.image("basic").reference),
        &format!("oci:{}:again", layout.display()),
        &[],
    );
    let after: Vec<u64> = f.image("basic").diff_ids.iter().map(|d| ino(d)).collect();
    assert_eq!(before, after, "existing layer blobs were rewritten");
}

#[test]
fn pulling_the_export_gives_the_same_composefs_image() {
    let Some(f) = fixtures() else { return };
    let Some(cfsctl) = cfsctl() else {
        println!("SKIP: cfsctl not found (set CFSCTL or install composefs-ctl 0.9.4)");
        return;
    };
    let work = tempfile::TempDir::new_in(&f.out).unwrap();
    let layout = work.path().join("layout");
    let gzipped = work.path().join("gzip");
    let image = f.image("basic");
    let source = format!("{}{}", f.store_arg(), image.reference);
    export(&source, &format!("oci:{}:basic", layout.display()), &[]);
    let gz_dest = format!("oci:{}:basic", gzipped.display());
    export(&source, &gz_dest, &["--compress", "gzip"]);
    let pull = |source: &str, repo: &Path| {
        run(Command::new(BIN)
            .args(["pull", source, "--repo"])
            .arg(repo)
            .args(["--tag", "t", "--insecure", "--json"]));
    };
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    pull(&source, &a);
    pull(&format!("oci:{}:basic", layout.display()), &b);
    let id_a = cfs(&cfsctl, &a, &["oci", "compute-id", "t"]);
    let id_b = cfs(&cfsctl, &b, &["oci", "compute-id", "t"]);
    assert_eq!(id_a.trim(), id_b.trim());
    // Multi-member gzip layers, decompressed by our own pull.
    let c = work.path().join("c");
    pull(&gz_dest, &c);
    let id_c = cfs(&cfsctl, &c, &["oci", "compute-id", "t"]);
    assert_eq!(id_a.trim(), id_c.trim());
}

#[test]
fn compressed_layers_decompress_to_the_diff_ids() {
    let Some(f) = fixtures() else { return };
    let work = tempfile::TempDir::new_in(&f.out).unwrap();
    let image = f.image("basic");
    let source = format!("{}{}", f.store_arg(), image.reference);
    for (compress, media_type) in [
        ("gzip", "application/vnd.oci.image.layer.v1.tar+gzip"),
        ("zstd", "application/vnd.oci.image.layer.v1.tar+zstd"),
    ] {
        let layout = work.path().join(compress);
        let dest = format!("oci:{}:basic", layout.display());
        export(&source, &dest, &["--compress", compress, "--jobs", "2"]);
        let m = manifest(&layout, "basic");
        let mut most_members = 0;
        for (l, diff_id) in m["layers"].as_array().unwrap().iter().zip(&image.diff_ids) {
            assert_eq!(l["mediaType"], media_type);
            let path = blob(&layout, l["digest"].as_str().unwrap());
            let file = std::fs::File::open(&path).unwrap();
            let uncompressed = match compress {
                "gzip" => {
                    run(Command::new("gzip").arg("-t").arg(&path));
                    let (hex, members) = gzip_members(file);
                    most_members = most_members.max(members);
                    hex
                }
                _ => sha256_hex(zstd::Decoder::new(file).unwrap()),
            };
            assert_eq!(&uncompressed, diff_id, "{compress}");
        }
        if compress == "gzip" {
            // The base layer holds a 3 MiB file: compressed in chunks, as several members.
            assert!(most_members > 1, "one gzip member per layer");
        }
        assert_blobs_named_by_digest(&layout);
        let id = copy_into_new_store(&dest, work.path());
        assert_eq!(id, image.id, "{compress}");
    }
}

/// The sha256 of a gzip file's content, read member by member, and how many members it has.
fn gzip_members(file: std::fs::File) -> (String, usize) {
    use std::io::BufRead;
    let mut reader = std::io::BufReader::new(file);
    let mut hasher = Sha256::new();
    let mut members = 0;
    while !reader.fill_buf().unwrap().is_empty() {
        // bufread's decoder stops at the end of its member.
        let mut member = flate2::bufread::GzDecoder::new(&mut reader);
        std::io::copy(&mut member, &mut hasher).unwrap();
        members += 1;
    }
    (
        format!("sha256:{}", hex::encode(hasher.finalize())),
        members,
    )
}

/// Killed part-way, an export leaves only blobs named by their digests, and no index entry.
#[test]
fn an_interrupted_export_leaves_no_misnamed_blob() {
    let Some(f) = fixtures() else { return };
    let work = tempfile::TempDir::new_in(&f.out).unwrap();
    let layout = work.path().join("layout");
    let source = format!("{}{}", f.store_arg(), f.image("big").reference);
    for delay_ms in [50, 150] {
        let mut child = Command::new(BIN)
            .args(["export", &source, &format!("oci:{}:big", layout.display())])
            .args(["--compress", "gzip"])
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        child.kill().unwrap();
        child.wait().unwrap();
        if layout.join("blobs/sha256").exists() {
            assert_blobs_named_by_digest(&layout);
        }
    }
}
