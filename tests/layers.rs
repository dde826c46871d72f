//! `splitfdstream tar` and `inspect` through the real binary, helper included: every layer of
//! every fixture from containers-storage and OCI layouts, hostile stores, a killed helper, and a
//! 20,000-file layer under `ulimit -n 64`.

mod common;

use std::io::Read;
use std::os::unix::fs::symlink;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fixtures;
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_splitfdstream");

/// Longest any single CLI run may take here; a hang fails the test instead of CI.
const HANG_GUARD: Duration = Duration::from_secs(120);

struct Run {
    ok: bool,
    stdout_sha: String,
    stdout_len: u64,
    stderr: String,
}

/// Run the CLI, hashing stdout as it streams (layers can be large), with a hang guard.
fn run(args: &[&str]) -> Run {
    run_cmd(Command::new(BIN).args(args))
}

fn run_cmd(cmd: &mut Command) -> Run {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).unwrap();
        s
    });
    let pid = child.id();
    let guard = std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < HANG_GUARD {
            std::thread::sleep(Duration::from_millis(100));
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                return;
            }
        }
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    });
    let mut sha = Sha256::new();
    let mut len = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = stdout.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
        len += n as u64;
    }
    let status = child.wait().unwrap();
    let _ = guard.join();
    Run {
        ok: status.success(),
        stdout_sha: format!("sha256:{}", hex::encode(sha.finalize())),
        stdout_len: len,
        stderr: err_thread.join().unwrap(),
    }
}

#[test]
fn every_layer_of_every_fixture_from_containers_storage() {
    let Some(f) = fixtures() else { return };
    for image in &f.images {
        let source = format!("{}{}", f.store_arg(), image.reference);
        for (i, diff_id) in image.diff_ids.iter().enumerate() {
            let r = run(&["tar", &source, "--layer", &i.to_string(), "--verify-crc"]);
            assert!(r.ok, "{} layer {i}: {}", image.name, r.stderr);
            assert_eq!(&r.stdout_sha, diff_id, "{} layer {i}", image.name);
            assert_eq!(
                r.stdout_len, image.layer_sizes[i],
                "{} layer {i}",
                image.name
            );
        }
        // By diff_id too.
        let r = run(&["tar", &source, "--layer", &image.diff_ids[0]]);
        assert!(
            r.ok && r.stdout_sha == image.diff_ids[0],
            "{}: {}",
            image.name,
            r.stderr
        );
    }
}

#[test]
fn every_layer_of_every_oci_layout() {
    let Some(f) = fixtures() else { return };
    for layout in &f.layouts {
        let source = format!("oci:{}:{}", f.layout_dir(&layout.dir).display(), layout.tag);
        for (i, diff_id) in layout.diff_ids.iter().enumerate() {
            let r = run(&["tar", &source, "--layer", &i.to_string()]);
            assert!(r.ok, "{source} layer {i}: {}", r.stderr);
            assert_eq!(&r.stdout_sha, diff_id, "{source} layer {i}");
        }
    }
}

#[test]
fn inspect_lists_layers_as_json() {
    let Some(f) = fixtures() else { return };
    let image = f.image("basic");
    let out = Command::new(BIN)
        .args([
            "inspect",
            &format!("{}{}", f.store_arg(), image.reference),
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["imageId"], image.id.as_str());
    let diff_ids: Vec<&str> = v["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["diffId"].as_str().unwrap())
        .collect();
    assert_eq!(diff_ids, image.diff_ids);
}

#[test]
fn hostile_stores_fail_clearly() {
    let Some(f) = fixtures() else { return };
    let image = f.image("basic");
    let top = image.layer_ids.len() - 1;
    // (what, how to damage the copy, text the error must contain)
    type Damage = fn(&std::path::Path);
    let cases: [(&str, Damage, &str); 3] = [
        (
            "symlink",
            |p| {
                std::fs::remove_file(p).unwrap();
                symlink("/etc/passwd", p).unwrap();
            },
            "new-65",
        ),
        (
            "fifo",
            |p| {
                std::fs::remove_file(p).unwrap();
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    p,
                    rustix::fs::FileType::Fifo,
                    rustix::fs::Mode::from_raw_mode(0o644),
                    0,
                )
                .unwrap();
            },
            "new-65",
        ),
        ("size", |p| std::fs::write(p, b"short").unwrap(), "new-65"),
    ];
    let _ = top;
    for (what, damage, needle) in cases {
        let private = f.private_store(&["basic"]);
        let Some(victim) = find_body_over_64(&private, image) else {
            panic!("basic has no body over 64 bytes to damage");
        };
        damage(&victim);
        let store = format!(
            "containers-storage:[overlay@{}+{}]",
            private.graphroot.display(),
            private.runroot.display()
        );
        let layer = image
            .layer_ids
            .iter()
            .position(|id| victim.starts_with(private.diff_dir(id)))
            .unwrap();
        let r = run(&[
            "tar",
            &format!("{store}{}", image.reference),
            "--layer",
            &layer.to_string(),
        ]);
        assert!(!r.ok, "{what}: damaged layer streamed");
        let name = victim.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            r.stderr.contains(&name) || r.stderr.contains(needle),
            "{what}: {}",
            r.stderr
        );
        assert!(
            r.stderr.contains(&image.diff_ids[layer]) || r.stderr.contains(&image.layer_ids[layer]),
            "{what}: {}",
            r.stderr
        );
    }
}

/// A regular file of more than 64 bytes in one of the image's diff dirs (so it travels as an fd).
fn find_body_over_64(
    private: &common::fixtures::PrivateStore,
    image: &common::fixtures::FixtureImage,
) -> Option<std::path::PathBuf> {
    for id in image.layer_ids.iter().rev() {
        let mut stack = vec![private.diff_dir(id)];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).ok()? {
                let e = e.ok()?;
                let md = std::fs::symlink_metadata(e.path()).ok()?;
                if md.is_dir() {
                    stack.push(e.path());
                } else if md.is_file()
                    && md.len() > 64
                    && md.len() < 1 << 20
                    && !e.file_name().to_string_lossy().starts_with(".wh.")
                {
                    use std::os::unix::fs::MetadataExt;
                    if md.nlink() == 1 {
                        return Some(e.path());
                    }
                }
            }
        }
    }
    None
}

#[test]
fn bad_references_fail_clearly() {
    let Some(f) = fixtures() else { return };
    let r = run(&[
        "tar",
        &format!("{}localhost/does-not-exist:latest", f.store_arg()),
        "--layer",
        "0",
    ]);
    assert!(!r.ok && r.stderr.contains("does-not-exist"), "{}", r.stderr);
    let basic = f.image("basic");
    let source = format!("{}{}", f.store_arg(), basic.reference);
    let r = run(&["tar", &source, "--layer", "99"]);
    assert!(!r.ok && r.stderr.contains("99"), "{}", r.stderr);
    let r = run(&[
        "tar",
        &source,
        "--layer",
        "sha256:0000000000000000000000000000000000000000000000000000000000000000",
    ]);
    assert!(!r.ok && r.stderr.contains("no layer"), "{}", r.stderr);
    // A layer id that walks out of the store, planted in a private copy's images.json.
    let private = f.private_store(&["basic"]);
    let images_json = private.graphroot.join("overlay-images/images.json");
    let text = std::fs::read_to_string(&images_json).unwrap();
    let top = basic.layer_ids.last().unwrap();
    std::fs::write(&images_json, text.replace(top.as_str(), "../../../../etc")).unwrap();
    let store = format!(
        "containers-storage:[overlay@{}+{}]",
        private.graphroot.display(),
        private.runroot.display()
    );
    let r = run(&[
        "tar",
        &format!("{store}{}", basic.reference),
        "--layer",
        "0",
    ]);
    assert!(
        !r.ok && r.stderr.contains("../../../../etc"),
        "{}",
        r.stderr
    );
}

#[test]
fn helper_killed_mid_layer_is_an_incomplete_layer() {
    let Some(f) = fixtures() else { return };
    // 20,000 files: the helper cannot finish before the client took most of its fds, so a kill
    // after the first output is really mid-layer.
    let big = f.image("many");
    let (layer, _) = big
        .layer_sizes
        .iter()
        .enumerate()
        .max_by_key(|(_, s)| **s)
        .unwrap();
    let source = format!("{}{}", f.store_arg(), big.reference);
    let mut child = Command::new(BIN)
        .args(["tar", &source, "--layer", &layer.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    // Read a little, so the layer is mid-stream, then kill the helper (the CLI's child).
    let mut buf = vec![0u8; 64 << 10];
    stdout.read_exact(&mut buf).unwrap();
    // Let the helper fill its window and block on the full pipe before it dies.
    std::thread::sleep(Duration::from_millis(300));
    let helper = loop {
        let children =
            std::fs::read_to_string(format!("/proc/{}/task/{}/children", child.id(), child.id()))
                .unwrap();
        if let Some(pid) = children.split_whitespace().next() {
            break pid.to_owned();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        Command::new("kill")
            .args(["-9", &helper])
            .status()
            .unwrap()
            .success()
    );
    let killed = Instant::now();
    let drain = std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = stdout.read_to_end(&mut sink);
    });
    let status = child.wait().unwrap();
    let took = killed.elapsed();
    drain.join().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        !status.success(),
        "a killed helper's layer was reported as success"
    );
    assert!(
        stderr.contains("signal: 9") && stderr.contains("incomplete"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn twenty_thousand_files_under_ulimit_64() {
    let Some(f) = fixtures() else { return };
    let many = f.image("many");
    let (layer, _) = many
        .layer_sizes
        .iter()
        .enumerate()
        .max_by_key(|(_, s)| **s)
        .unwrap();
    let source = format!("{}{}", f.store_arg(), many.reference);
    // Both sides: the helper inherits the CLI's limit.
    let r = run_cmd(Command::new("sh").args([
        "-c",
        "ulimit -n 64 && exec \"$0\" tar \"$1\" --layer \"$2\"",
        BIN,
        &source,
        &layer.to_string(),
    ]));
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.stdout_sha, many.diff_ids[layer]);
}

/// `tar -o FILE`: the file appears only when the layer verified; a body changed in the store
/// (same size, other bytes) makes the tar hash to something else, and then neither a new file
/// appears nor an existing one changes; to stdout the same failure is the exit status.
#[test]
fn tar_output_file_appears_only_when_verified() {
    let Some(f) = fixtures() else { return };
    let image = f.image("basic");
    let source = format!("{}{}", f.store_arg(), image.reference);
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("layer0.tar");
    let r = run(&["tar", &source, "--layer", "0", "-o", out.to_str().unwrap()]);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.stdout_len, 0, "with -o nothing goes to stdout");
    let written = std::fs::read(&out).unwrap();
    assert_eq!(
        format!("sha256:{}", hex::encode(Sha256::digest(&written))),
        image.diff_ids[0]
    );

    let private = f.private_store(&["basic"]);
    let victim = find_body_over_64(&private, image).expect("a body over 64 bytes");
    let layer = image
        .layer_ids
        .iter()
        .position(|id| victim.starts_with(private.diff_dir(id)))
        .unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&victim, &bytes).unwrap();
    let damaged = format!(
        "containers-storage:[overlay@{}+{}]{}",
        private.graphroot.display(),
        private.runroot.display(),
        image.reference
    );
    let fresh = out_dir.path().join("fresh.tar");
    for target in [&fresh, &out] {
        let r = run(&[
            "tar",
            &damaged,
            "--layer",
            &layer.to_string(),
            "-o",
            target.to_str().unwrap(),
        ]);
        assert!(!r.ok, "a damaged layer verified");
        assert!(
            r.stderr.contains(&format!(
                "layer {}: the stream hashes to",
                image.diff_ids[layer]
            )),
            "{}",
            r.stderr
        );
    }
    assert!(!fresh.exists(), "a file appeared for an unverified layer");
    assert_eq!(
        std::fs::read(&out).unwrap(),
        written,
        "the existing file changed"
    );
    let left: Vec<_> = std::fs::read_dir(out_dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["layer0.tar"], "temporary files left behind");

    let r = run(&["tar", &damaged, "--layer", &layer.to_string()]);
    assert!(
        !r.ok && r.stderr.contains("the stream hashes to"),
        "{}",
        r.stderr
    );
}
