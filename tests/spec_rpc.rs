//! `proto/rpc.md` against `src/proto/rpc.rs`: every annotated JSON example parses and
//! round-trips through the typed API, and the error-code table equals `rpc::code`.

use oci_spec::image::{ImageConfiguration, ImageManifest};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use splitfdstream::proto::rpc::{self, Request, RpcError, code};

const SPEC: &str = include_str!("../proto/rpc.md");

/// One fenced block preceded by `<!-- example: KIND NAME [FLAG] -->`.
#[derive(Debug)]
struct Example {
    kind: String,
    name: String,
    flag: Option<String>,
    lang: String,
    body: String,
    line: usize,
}

impl Example {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("example at rpc.md:{} is not JSON: {e}", self.line))
    }
}

/// All annotated examples; panics on a ```json block without annotation, so none goes unchecked.
fn examples() -> Vec<Example> {
    let mut out = Vec::new();
    let mut annotation: Option<(Vec<String>, usize)> = None;
    let mut lines = SPEC.lines().enumerate();
    while let Some((i, line)) = lines.next() {
        if let Some(rest) = line.strip_prefix("<!-- example:") {
            let words = rest.trim_end_matches("-->").split_whitespace();
            annotation = Some((words.map(str::to_owned).collect(), i + 1));
        } else if let Some(lang) = line.strip_prefix("```") {
            let mut body = String::new();
            for (_, l) in lines.by_ref() {
                if l == "```" {
                    break;
                }
                body.push_str(l);
                body.push('\n');
            }
            match annotation.take() {
                Some((words, at)) => {
                    assert!(words.len() >= 2, "rpc.md:{at}: annotation needs KIND NAME");
                    out.push(Example {
                        kind: words[0].clone(),
                        name: words[1].clone(),
                        flag: words.get(2).cloned(),
                        lang: lang.to_owned(),
                        body,
                        line: i + 2,
                    });
                }
                None => assert_ne!(lang, "json", "rpc.md:{}: unannotated JSON example", i + 1),
            }
        } else if !line.trim().is_empty() {
            assert!(
                annotation.is_none(),
                "rpc.md:{}: annotation not followed by a code block",
                i + 1
            );
        }
    }
    out
}

fn of_kind(kind: &str) -> impl Iterator<Item = Example> {
    examples().into_iter().filter(move |e| e.kind == kind)
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// CRC-64/ISO as Go's `hash/crc64` computes it (what tar-split stores).
fn crc64_iso(data: &[u8]) -> u64 {
    const POLY_REFLECTED: u64 = 0xD800_0000_0000_0000;
    let mut crc = !0u64;
    for &b in data {
        crc ^= u64::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ POLY_REFLECTED
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn every_example_is_valid_and_every_method_is_shown() {
    let all = examples();
    assert!(all.len() > 30, "found only {} examples", all.len());
    for e in &all {
        match e.kind.as_str() {
            "request" | "response" | "error" | "invalid-request" => {
                assert_eq!(e.lang, "json", "rpc.md:{}", e.line);
                let v = e.json();
                assert_eq!(v["jsonrpc"], "2.0", "rpc.md:{}", e.line);
            }
            "framing" | "transport-ok" | "transport-fatal" => {
                assert_eq!(e.lang, "text", "rpc.md:{}", e.line)
            }
            other => panic!("rpc.md:{}: unknown example kind {other}", e.line),
        }
    }
    for method in Request::METHODS {
        for kind in ["request", "response", "error"] {
            assert!(
                all.iter().any(|e| e.kind == kind && e.name == *method),
                "no {kind} example for {method}"
            );
        }
    }
}

#[test]
fn requests_round_trip() {
    let mut seen = 0;
    for e in of_kind("request") {
        let v = e.json();
        assert!(
            v.get("fds").is_none(),
            "rpc.md:{}: requests carry no fds",
            e.line
        );
        let req = rpc::parse_request(&v).unwrap_or_else(|err| panic!("rpc.md:{}: {err}", e.line));
        assert_eq!(req.method(), e.name, "rpc.md:{}", e.line);
        let id = v["id"].as_u64().expect("examples use integer ids");
        match e.flag.as_deref() {
            None => assert_eq!(rpc::request_message(id, &req), v, "rpc.md:{}", e.line),
            Some("lenient") => {
                // Omitted or null params mean the defaults.
                let canonical: Request =
                    serde_json::from_value(json!({"method": e.name, "params": {}})).unwrap();
                assert_eq!(req, canonical, "rpc.md:{}", e.line);
            }
            Some(other) => panic!("rpc.md:{}: unknown flag {other}", e.line),
        }
        seen += 1;
    }
    assert!(seen >= 12, "{seen} request examples");
}

/// Round-trip `result` through `T` and rebuild the whole envelope.
fn round_trip<T>(e: &Example, envelope: &Value) -> T
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let typed: T = serde_json::from_value(envelope["result"].clone())
        .unwrap_or_else(|err| panic!("rpc.md:{}: result of {}: {err}", e.line, e.name));
    assert_eq!(
        &rpc::result_message(&envelope["id"], &typed),
        envelope,
        "rpc.md:{}",
        e.line
    );
    typed
}

#[test]
fn responses_round_trip_with_their_fds() {
    let mut seen = 0;
    for e in of_kind("response") {
        let mut v = e.json();
        let fds = v
            .as_object_mut()
            .unwrap()
            .remove("fds")
            .map_or(0, |n| n.as_u64().expect("fds is a count"));
        let expected_fds = match e.name.as_str() {
            "Initialize" => {
                let r: rpc::InitializeResult = round_trip(&e, &v);
                assert!(rpc::version_compatible(&r.protocol_version));
                0
            }
            "OpenImage" => {
                check_open_image(&round_trip(&e, &v));
                0
            }
            "GetLayer" => {
                let _: rpc::GetLayerResult = round_trip(&e, &v);
                1
            }
            "GetLayerFds" => {
                let r: rpc::GetLayerFdsResult = round_trip(&e, &v);
                assert_eq!(r.crc64.len(), r.count as usize, "rpc.md:{}", e.line);
                assert!(r.count > 0 || r.end.is_some(), "rpc.md:{}", e.line);
                assert!(r.count <= rpc::MAX_FDS_PER_REPLY);
                u64::from(r.count)
            }
            "CloseLayer" | "CloseImage" | "Shutdown" => {
                let _: rpc::EmptyResult = round_trip(&e, &v);
                0
            }
            other => panic!("rpc.md:{}: response to unknown method {other}", e.line),
        };
        assert_eq!(fds, expected_fds, "rpc.md:{}: fds of {}", e.line, e.name);
        seen += 1;
    }
    assert!(seen >= 9, "{seen} response examples");
}

/// The OpenImage example is real data: digests, ids and diff_ids agree with each other.
fn check_open_image(r: &rpc::OpenImageResult) {
    assert_eq!(
        r.manifest_digest,
        format!("sha256:{}", sha256_hex(r.manifest.as_bytes()))
    );
    assert_eq!(
        r.config_digest,
        format!("sha256:{}", sha256_hex(r.config.as_bytes()))
    );
    assert_eq!(format!("sha256:{}", r.image_id), r.config_digest);
    let config: ImageConfiguration = serde_json::from_str(&r.config).unwrap();
    let manifest: ImageManifest = serde_json::from_str(&r.manifest).unwrap();
    assert_eq!(manifest.config().digest().as_ref(), r.config_digest);
    assert_eq!(manifest.config().size(), r.config.len() as u64);
    let diff_ids: Vec<&str> = r.layers.iter().map(|l| l.diff_id.as_str()).collect();
    assert_eq!(config.rootfs().diff_ids(), &diff_ids);
    let blob_digests: Vec<&str> = manifest
        .layers()
        .iter()
        .map(|l| l.digest().as_ref())
        .collect();
    assert_eq!(blob_digests, diff_ids);
    // The base layer is the empty tar: 10,240 zero bytes.
    assert_eq!(
        r.layers[0].diff_id,
        format!("sha256:{}", sha256_hex(&[0; 10240]))
    );
    // containers-storage ids: base = diff_id hex, then sha256(parent + "+" + diff_id hex).
    let mut parent: Option<&str> = None;
    for layer in &r.layers {
        let diff_hex = layer.diff_id.strip_prefix("sha256:").unwrap();
        let expected = match parent {
            None => diff_hex.to_owned(),
            Some(p) => sha256_hex(format!("{p}+{diff_hex}").as_bytes()),
        };
        assert_eq!(layer.id, expected);
        parent = Some(&layer.id);
    }
}

#[test]
fn crc64_examples_are_tar_split_crcs() {
    // The bodies of the §4.5 layer: the README travels as an fd, hello.txt (inline) is used in
    // the failed example.
    let readme =
        b"This file is longer than the 64-byte inline threshold, so its body travels as an fd.\n";
    assert_eq!(readme.len(), 85);
    assert_eq!(
        crc64_iso(b"123456789"),
        0xb909_56c7_75a4_1001,
        "CRC-64/GO-ISO check value"
    );
    let crcs: Vec<String> = of_kind("response")
        .filter(|e| e.name == "GetLayerFds")
        .flat_map(|e| {
            let r: rpc::GetLayerFdsResult =
                serde_json::from_value(e.json()["result"].clone()).unwrap();
            r.crc64.into_iter().flatten()
        })
        .collect();
    assert_eq!(
        crcs,
        [
            format!("{:016x}", crc64_iso(readme)),
            format!("{:016x}", crc64_iso(b"hello\n"))
        ]
    );
}

#[test]
fn errors_round_trip() {
    let known: Vec<i64> = code::ALL.iter().map(|&(_, c)| c).collect();
    let mut seen = 0;
    for e in of_kind("error") {
        let v = e.json();
        let err: RpcError = serde_json::from_value(v["error"].clone())
            .unwrap_or_else(|err| panic!("rpc.md:{}: {err}", e.line));
        assert!(
            known.contains(&err.code),
            "rpc.md:{}: code {}",
            e.line,
            err.code
        );
        assert_eq!(rpc::error_message(&v["id"], &err), v, "rpc.md:{}", e.line);
        assert!(v.get("result").is_none());
        seen += 1;
    }
    assert!(seen >= 12, "{seen} error examples");
}

#[test]
fn invalid_requests_get_the_documented_errors() {
    let all = examples();
    let mut seen = 0;
    for (i, e) in all.iter().enumerate() {
        if e.kind != "invalid-request" {
            continue;
        }
        let want: i64 = e.name.parse().expect("annotation names the code");
        let err = rpc::parse_request(&e.json()).expect_err("example must be refused");
        assert_eq!(err.code, want, "rpc.md:{}: {err}", e.line);
        // The error example right after it is the helper's exact answer.
        let answer = all
            .get(i + 1)
            .filter(|n| n.kind == "error")
            .map(Example::json);
        let answer = answer.unwrap_or_else(|| panic!("rpc.md:{}: no answer follows", e.line));
        assert_eq!(answer["error"]["code"], want);
        assert_eq!(
            answer["error"]["message"],
            err.message.as_str(),
            "rpc.md:{}",
            e.line
        );
        seen += 1;
    }
    assert_eq!(seen, 3);
}

#[test]
fn error_code_table_matches_rpc_code() {
    let table = SPEC
        .split_once("<!-- error-codes -->")
        .expect("rpc.md has the error-code table")
        .1;
    let mut rows = Vec::new();
    for line in table.lines().skip_while(|l| l.trim().is_empty()) {
        if !line.starts_with('|') {
            break;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let Ok(code) = cells[1].parse::<i64>() else {
            continue; // header and separator rows
        };
        rows.push((cells[2].trim_matches('`').to_owned(), code));
    }
    let mut want: Vec<(String, i64)> = code::ALL
        .iter()
        .map(|&(name, c)| (name.to_owned(), c))
        .collect();
    rows.sort();
    want.sort();
    assert_eq!(rows, want);
    // And `ALL` lists what the constants say.
    assert!(code::ALL.contains(&("FRAMING", -32050)));
    assert!(code::ALL.contains(&("METHOD_NOT_FOUND", -32601)));
}
