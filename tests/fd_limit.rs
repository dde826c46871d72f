//! RLIMIT_NOFILE 64 on both sides: 10,000 fds through one library session.
//!
//! One test only: it lowers this process's fd limit, which every other test in the binary would
//! feel.

mod common;

use std::io::Read;

use sha2::{Digest, Sha256};
use splitfdstream::client::{LayerItem, Proxy, ProxyConfig};
use splitfdstream::proto::rpc::LayerSelector;

#[test]
fn ten_thousand_fds_at_rlimit_64() {
    let Some(f) = common::fixtures() else { return };
    let many = f.image("many");
    let (layer, _) = many
        .layer_sizes
        .iter()
        .enumerate()
        .max_by_key(|(_, s)| **s)
        .unwrap();
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let old = getrlimit(Resource::Nofile);
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(64),
            maximum: old.maximum,
        },
    )
    .unwrap();
    // The helper inherits the limit; both sides size their windows and batches from it.
    let config = ProxyConfig {
        helper_exe: Some(env!("CARGO_BIN_EXE_splitfdstream").into()),
        ..ProxyConfig::new(f.store())
    };
    let mut proxy = Proxy::spawn(&config).unwrap();
    assert!(
        proxy.fd_batch() < 64,
        "batch {} not sized from the limit",
        proxy.fd_batch()
    );
    let image = proxy.open_image(&many.reference).unwrap();
    // Threshold 0: every non-empty body travels as an fd.
    let mut stream = proxy
        .get_layer(image.image, LayerSelector::Index(layer as u64), Some(0))
        .unwrap();
    let mut sha = Sha256::new();
    let mut fds = 0u64;
    let mut body = Vec::new();
    while let Some(item) = stream.next_item().unwrap() {
        match item {
            LayerItem::Inline(b) => sha.update(b),
            LayerItem::File { fd, .. } => {
                fds += 1;
                body.clear();
                std::fs::File::from(fd).read_to_end(&mut body).unwrap();
                sha.update(&body);
            }
        }
    }
    drop(stream);
    proxy.shutdown().unwrap();
    setrlimit(Resource::Nofile, old).unwrap();
    assert!(fds >= 10_000, "only {fds} fds passed");
    assert_eq!(
        format!("sha256:{}", hex::encode(sha.finalize())),
        many.diff_ids[layer]
    );
}
