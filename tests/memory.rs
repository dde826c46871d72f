//! Peak RSS of `tar` on a layer of 100,000 tiny files stays under 32 MiB (helper included).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

/// Files in the layer.
const FILES: usize = 100_000;
/// The limit from the issue.
const LIMIT_KIB: u64 = 32 * 1024;

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn tar_of_100k_tiny_files_stays_small() {
    if !rustix::process::geteuid().is_root()
        || !have("buildah")
        || !Path::new("/usr/bin/time").exists()
    {
        println!("SKIP: needs root, buildah and /usr/bin/time");
        return;
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("memory-100k");
    let (graph, run) = (dir.join("graph"), dir.join("run"));
    if !dir.join("built").exists() {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let script = format!(
            r#"set -eu
b="buildah --root {g} --runroot {r} --storage-driver overlay"
c=$($b from scratch)
m=$($b mount "$c")
mkdir -p "$m/d"
cd "$m/d"
# 100,000 files of 1..40 bytes, in 100 directories.
i=0; while [ $i -lt 100 ]; do mkdir $i; i=$((i+1)); done
seq 0 {last} | awk '{{ printf "%s", substr("0123456789abcdefghijklmnopqrstuvwxyz0123", 1, 1 + $1 % 40) > (($1 % 100) "/f" $1); close(($1 % 100) "/f" $1) }}'
cd /
$b umount "$c" >/dev/null
$b commit -q "$c" localhost/many100k >/dev/null
$b rm "$c" >/dev/null
"#,
            g = graph.display(),
            r = run.display(),
            last = FILES - 1
        );
        let st = Command::new("sh").args(["-c", &script]).status().unwrap();
        assert!(st.success(), "building the 100k-file image");
        std::fs::write(dir.join("built"), b"").unwrap();
    }
    let source = format!(
        "containers-storage:[overlay@{}+{}]localhost/many100k",
        graph.display(),
        run.display()
    );
    let kib = common::tools::peak_rss_kib(
        Command::new(env!("CARGO_BIN_EXE_splitfdstream")).args(["tar", &source, "--layer", "0"]),
    );
    println!(
        "peak RSS of `splitfdstream tar` on {FILES} files: {:.1} MiB",
        kib as f64 / 1024.0
    );
    assert!(kib < LIMIT_KIB, "peak RSS {kib} KiB ≥ {LIMIT_KIB} KiB");
}
