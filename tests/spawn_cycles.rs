//! 200 spawn/drop cycles leave no zombie and no leaked fd.
//!
//! This binary holds exactly ONE test: it counts the process's open fds, which any other test
//! running in parallel in the same process would disturb.

use splitfdstream::client::{Proxy, ProxyConfig};
use splitfdstream::proto::source::Store;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Children of this process that exist in any state (a zombie included).
fn children() -> Vec<String> {
    let mut all = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let path = task.unwrap().path().join("children");
        let text = std::fs::read_to_string(path).unwrap_or_default();
        all.extend(text.split_whitespace().map(str::to_owned));
    }
    all
}

#[test]
fn two_hundred_spawn_drop_cycles_leak_nothing() {
    let store = Store::OciLayout {
        dir: concat!(env!("CARGO_MANIFEST_DIR"), "/examples/hello-oci").into(),
    };
    let config = ProxyConfig {
        helper_exe: Some(env!("CARGO_BIN_EXE_splitfdstream").into()),
        ..ProxyConfig::new(store)
    };
    // Warm up once so lazily-opened process-wide fds (if any) exist before the baseline.
    drop(Proxy::spawn(&config).unwrap());
    let before = open_fds();
    for i in 0..200 {
        let mut proxy = Proxy::spawn(&config).unwrap();
        // Half the cycles do real work and drop mid-session; half shut down cleanly.
        if i % 2 == 0 {
            let image = proxy.open_image("hello").unwrap();
            let stream = proxy.get_layer(
                image.image,
                splitfdstream::proto::rpc::LayerSelector::Index(0),
                None,
            );
            drop(stream);
            drop(proxy);
        } else {
            proxy.shutdown().unwrap();
        }
    }
    // The stderr reader threads end when the helpers' stderr closes; give them a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while open_fds() != before && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(open_fds(), before, "fds leaked over 200 cycles");
    assert_eq!(children(), Vec::<String>::new(), "children left behind");
}
