//! Shared test support: the fixtures, and a sink that rebuilds and checks a layer.
// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

pub mod fixtures;
pub mod proxy_client;
pub mod tools;
pub mod tree;

use std::io::Read;
use std::os::fd::OwnedFd;

use sha2::{Digest, Sha256};
use splitfdstream::helper::LayerSink;
use splitfdstream::helper::tarsplit::crc64_iso;

#[allow(unused_imports)]
pub use fixtures::{Fixtures, fixtures};

/// Rebuilds the layer tar from a backend's output: hashes inline bytes and the full content of
/// each fd, and checks every fd as it arrives (a regular, close-on-exec file of the announced
/// size) and counts bodies that do not match their CRC-64.
#[derive(Debug, Default)]
pub struct TarSink {
    hasher: Sha256,
    /// Bytes of the rebuilt tar.
    pub bytes: u64,
    /// Size of each body received as an fd, in order.
    pub fd_sizes: Vec<u64>,
    /// How many fds came with a CRC-64.
    pub fds_with_crc: usize,
    /// How many fd bodies did not match their CRC-64.
    pub crc_mismatches: usize,
    /// Length of the longest inline piece.
    pub max_inline: usize,
    /// Keep the rebuilt tar too (for small layers).
    pub keep: Option<Vec<u8>>,
}

impl TarSink {
    /// A sink that also keeps the rebuilt bytes.
    pub fn keeping() -> Self {
        TarSink {
            keep: Some(Vec::new()),
            ..TarSink::default()
        }
    }

    fn take(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.bytes += data.len() as u64;
        if let Some(k) = &mut self.keep {
            k.extend_from_slice(data);
        }
    }

    /// `sha256:…` of the rebuilt tar.
    pub fn digest(&self) -> String {
        format!("sha256:{}", hex::encode(self.hasher.clone().finalize()))
    }
}

impl LayerSink for TarSink {
    fn inline(&mut self, data: &[u8]) -> std::io::Result<()> {
        assert!(!data.is_empty(), "an empty inline piece");
        self.max_inline = self.max_inline.max(data.len());
        self.take(data);
        Ok(())
    }

    fn file(&mut self, fd: OwnedFd, size: u64, crc64: Option<u64>) -> std::io::Result<()> {
        let st = rustix::fs::fstat(&fd)?;
        assert_eq!(
            rustix::fs::FileType::from_raw_mode(st.st_mode),
            rustix::fs::FileType::RegularFile,
            "a content fd that is not a regular file"
        );
        assert_eq!(st.st_size as u64, size, "a content fd of the wrong size");
        assert!(
            rustix::io::fcntl_getfd(&fd)?.contains(rustix::io::FdFlags::CLOEXEC),
            "a content fd without FD_CLOEXEC"
        );
        let mut content = Vec::with_capacity(size as usize);
        std::fs::File::from(fd).read_to_end(&mut content)?;
        assert_eq!(content.len() as u64, size, "a content fd that read short");
        if let Some(crc) = crc64 {
            self.fds_with_crc += 1;
            if crc64_iso(0, &content) != crc {
                self.crc_mismatches += 1;
            }
        }
        self.take(&content);
        self.fd_sizes.push(size);
        Ok(())
    }
}

/// Names of the regular-file bodies (size > 0) in a tar, with their sizes, from GNU tar's
/// listing of `tar` bytes (an independent parser to check the sink against).
pub fn gnu_tar_regular_sizes(tar: &[u8]) -> Vec<u64> {
    use std::io::Write;
    let mut child = std::process::Command::new("tar")
        .args(["-tv", "--numeric-owner", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("running tar");
    let mut stdin = child.stdin.take().unwrap();
    let data = tar.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "tar -tv failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('-'))
        .map(|l| {
            l.split_whitespace()
                .nth(2)
                .and_then(|s| s.parse().ok())
                .expect("a size in tar's listing")
        })
        .filter(|&s| s > 0)
        .collect()
}
