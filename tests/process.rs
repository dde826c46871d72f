//! The parent/helper process model and the protocol rules of the server, on the real binary.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use splitfdstream::client::{Proxy, ProxyConfig};
use splitfdstream::proto::fdpass::Transport;
use splitfdstream::proto::rpc;
use splitfdstream::proto::source::Store;

mod common;

fn example_store() -> Store {
    Store::OciLayout {
        dir: concat!(env!("CARGO_MANIFEST_DIR"), "/examples/hello-oci").into(),
    }
}

fn config(store: Store) -> ProxyConfig {
    ProxyConfig {
        helper_exe: Some(env!("CARGO_BIN_EXE_splitfdstream").into()),
        ..ProxyConfig::new(store)
    }
}

/// A helper on a raw transport, for speaking the protocol byte by byte.
fn raw_helper(store: &Store) -> (Transport, std::process::Child) {
    use rustix::net::{AddressFamily, SocketFlags, SocketType, socketpair};
    let (ours, theirs) = socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_splitfdstream"))
        .args(["helper", "--socket-fd", "0", "--store", &store.to_string()])
        .stdin(Stdio::from(theirs))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (Transport::new(ours), child)
}

fn call(t: &mut Transport, msg: Value, fds: &[std::os::fd::BorrowedFd<'_>]) -> Value {
    t.send(&msg, fds).unwrap();
    t.recv().unwrap().expect("a reply").0
}

#[test]
fn initialize_reports_version_and_capabilities() {
    let proxy = Proxy::spawn(&config(example_store())).unwrap();
    let info = proxy.helper_info();
    assert_eq!(info.protocol_version, rpc::PROTOCOL_VERSION);
    assert_eq!(info.helper_version, env!("CARGO_PKG_VERSION"));
    assert!(
        info.capabilities.iter().any(|c| c == "oci-layout"),
        "{:?}",
        info.capabilities
    );
    proxy.shutdown().unwrap();
}

#[test]
fn protocol_rules_on_a_raw_connection() {
    let (mut t, mut child) = raw_helper(&example_store());
    // Before Initialize everything but Initialize/Shutdown is refused.
    let r = call(
        &mut t,
        json!({"jsonrpc":"2.0","id":1,"method":"OpenImage","params":{"reference":""}}),
        &[],
    );
    assert_eq!(r["error"]["code"], rpc::code::NOT_INITIALIZED, "{r}");
    // Another major version is refused, and the session stays uninitialised.
    let r = call(
        &mut t,
        json!({"jsonrpc":"2.0","id":2,"method":"Initialize","params":{"protocolVersion":"2.0.0"}}),
        &[],
    );
    assert_eq!(r["error"]["code"], rpc::code::VERSION_MISMATCH, "{r}");
    // `{}` and absent params are both valid for Initialize.
    let r = call(
        &mut t,
        json!({"jsonrpc":"2.0","id":3,"method":"Initialize","params":{}}),
        &[],
    );
    assert_eq!(r["result"]["protocolVersion"], rpc::PROTOCOL_VERSION, "{r}");
    let r = call(
        &mut t,
        json!({"jsonrpc":"2.0","id":4,"method":"Initialize"}),
        &[],
    );
    assert_eq!(
        r["error"]["code"],
        rpc::code::NOT_INITIALIZED,
        "second Initialize: {r}"
    );

    // An unknown method with an fd attached: -32601, and the helper closes its copy of the fd.
    let (pipe_r, pipe_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
    let r = call(
        &mut t,
        json!({"jsonrpc":"2.0","id":5,"method":"NoSuchMethod","params":{}}),
        &[pipe_w.as_fd()],
    );
    assert_eq!(r["error"]["code"], rpc::code::METHOD_NOT_FOUND, "{r}");
    assert_eq!(r["id"], 5);
    drop(pipe_w);
    let mut buf = [0u8; 1];
    // EOF proves no copy of the write end is left anywhere (the helper would hold one otherwise).
    assert_eq!(File::from(pipe_r).read(&mut buf).unwrap(), 0);

    // Bad params name the method; the connection stays usable.
    let r = call(
        &mut t,
        json!({"jsonrpc":"2.0","id":6,"method":"OpenImage","params":{"ref":1}}),
        &[],
    );
    assert_eq!(r["error"]["code"], rpc::code::INVALID_PARAMS, "{r}");
    let r = call(
        &mut t,
        json!({"jsonrpc":"2.0","id":7,"method":"GetLayerFds","params":{"stream":99,"max":1}}),
        &[],
    );
    assert_eq!(r["error"]["code"], rpc::code::BAD_HANDLE, "{r}");
    let r = call(
        &mut t,
        json!({"jsonrpc":"2.0","id":8,"method":"OpenImage","params":{"reference":"hello"}}),
        &[],
    );
    assert!(
        r["result"]["imageId"]
            .as_str()
            .is_some_and(|s| s.len() == 64),
        "{r}"
    );
    let r = call(
        &mut t,
        json!({"jsonrpc":"2.0","id":9,"method":"OpenImage","params":{"reference":"nope"}}),
        &[],
    );
    assert_eq!(r["error"]["code"], rpc::code::IMAGE_NOT_FOUND, "{r}");

    let r = call(
        &mut t,
        json!({"jsonrpc":"2.0","id":10,"method":"Shutdown"}),
        &[],
    );
    assert!(r["result"].is_object(), "{r}");
    assert!(
        t.recv().unwrap().is_none(),
        "helper closes the connection after Shutdown"
    );
    assert!(child.wait().unwrap().success());
}

#[test]
fn framing_garbage_is_fatal_with_32050() {
    let (mut t, mut child) = raw_helper(&example_store());
    rustix::io::write(t.as_fd(), b"]]]").unwrap();
    let (r, _) = t.recv().unwrap().expect("an error reply before closing");
    assert_eq!(r["error"]["code"], rpc::code::FRAMING, "{r}");
    assert!(
        t.recv().map(|m| m.is_none()).unwrap_or(true),
        "connection closed"
    );
    assert!(!child.wait().unwrap().success());
}

#[test]
fn sigkill_mid_request_is_reported_within_a_second() {
    // A writer's lock on the store's image list (as podman takes while it writes) makes the
    // helper wait inside OpenImage; it is killed there.
    let Some(f) = common::fixtures() else { return };
    let private = f.private_store(&["basic"]);
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(private.graphroot.join("overlay-images/images.lock"))
        .unwrap();
    rustix::fs::fcntl_lock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
    let mut proxy = Proxy::spawn(&config(private.store())).unwrap();
    let pid = proxy.helper_pid().expect("a spawned helper");
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
        Instant::now()
    });
    let reference = f.image("basic").reference.clone();
    let err = proxy
        .open_image(&reference)
        .expect_err("the helper was killed");
    let latency = killer.join().unwrap().elapsed();
    let text = format!("{err:#}");
    assert!(
        text.contains("helper exited") && text.contains("signal: 9"),
        "{text}"
    );
    assert!(latency < Duration::from_secs(1), "error after {latency:?}");
    drop(lock);
}

#[test]
fn helper_stderr_tail_is_in_the_error() {
    // A helper that cannot start its store still answers; one that dies at once is reported with
    // its stderr. `--store` garbage makes the helper exit with a message before serving.
    let cfg = ProxyConfig {
        helper_exe: Some(env!("CARGO_BIN_EXE_splitfdstream").into()),
        command_prefix: vec![
            "sh".into(),
            "-c".into(),
            "echo 'boom: no store here' >&2; exit 3".into(),
            "sh".into(),
        ],
        ..ProxyConfig::new(example_store())
    };
    let err = Proxy::spawn(&cfg).expect_err("helper exits at once");
    let text = format!("{err:#}");
    assert!(
        text.contains("exit status: 3") && text.contains("boom: no store here"),
        "{text}"
    );
}

#[test]
fn layer_of_the_example_streams_completely() {
    let mut proxy = Proxy::spawn(&config(example_store())).unwrap();
    let image = proxy.open_image("hello").unwrap();
    assert_eq!(image.layers.len(), 2);
    let mut tar = Vec::new();
    let mut stream = proxy
        .get_layer(image.image, rpc::LayerSelector::Index(0), None)
        .unwrap();
    while let Some(item) = stream.next_item().unwrap() {
        match item {
            splitfdstream::client::LayerItem::Inline(b) => tar.extend_from_slice(b),
            splitfdstream::client::LayerItem::File { fd, .. } => {
                File::from(fd).read_to_end(&mut tar).unwrap();
            }
        }
    }
    drop(stream);
    use sha2::Digest;
    assert_eq!(
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&tar))),
        image.layers[0].diff_id
    );
    proxy.shutdown().unwrap();
}
