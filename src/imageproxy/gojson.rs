//! The documents skopeo's proxy re-serialises, byte for byte as Go's `encoding/json` writes them.
//!
//! skopeo never serves an image config as stored: `GetFullConfig` decodes it into the OCI
//! `v1.Image` struct (image-spec 1.1) and marshals that again, and `GetManifest` of a Docker
//! schema 2 image builds an OCI manifest whose config descriptor names those re-marshalled
//! bytes. A client comparing digests (composefs-rs, ostree-ext) sees the difference, so this
//! module reproduces Go's output: struct field order, `omitempty`/`omitzero`, maps with sorted
//! keys, HTML-safe string escaping, and `time.Time` as RFC 3339 with trimmed fractions.

use anyhow::{Context, bail};
use serde_json::{Map, Value};

/// Media type of an OCI image manifest.
pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an OCI image config.
pub(crate) const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// Append `s` as a JSON string the way Go's `json.Marshal` escapes it (HTML-safe).
pub(crate) fn write_string(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            // Go 1.22 and later write these two short forms.
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '<' | '>' | '&' | '\u{0}'..='\u{1f}' => {
                let b = c as u8;
                out.push_str("\\u00");
                out.push(HEX[usize::from(b >> 4)] as char);
                out.push(HEX[usize::from(b & 0xf)] as char);
            }
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A JSON object being written field by field, in Go struct order.
struct Obj<'a> {
    out: &'a mut String,
    first: bool,
}

impl<'a> Obj<'a> {
    fn new(out: &'a mut String) -> Self {
        out.push('{');
        Obj { out, first: true }
    }

    fn key(&mut self, k: &str) -> &mut String {
        if !self.first {
            self.out.push(',');
        }
        self.first = false;
        write_string(self.out, k);
        self.out.push(':');
        self.out
    }

    fn end(self) {
        self.out.push('}');
    }
}

/// Go decodes an object member into a struct field by exact name, else case-insensitively.
fn member<'v>(obj: &'v Map<String, Value>, name: &str) -> Option<&'v Value> {
    obj.get(name)
        .or_else(|| {
            obj.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
        })
        .filter(|v| !v.is_null())
}

fn string_field(obj: &Map<String, Value>, name: &str) -> anyhow::Result<Option<String>> {
    match member(obj, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => bail!("{name:?} is {other}, not a string"),
    }
}

fn bool_field(obj: &Map<String, Value>, name: &str) -> anyhow::Result<bool> {
    match member(obj, name) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => bail!("{name:?} is {other}, not a boolean"),
    }
}

/// A `[]string` field: `None` when Go leaves it nil (absent or null).
fn strings_field(obj: &Map<String, Value>, name: &str) -> anyhow::Result<Option<Vec<String>>> {
    let Some(v) = member(obj, name) else {
        return Ok(None);
    };
    let Value::Array(items) = v else {
        bail!("{name:?} is {v}, not an array");
    };
    items
        .iter()
        .map(|i| match i {
            Value::String(s) => Ok(s.clone()),
            // Go leaves a null element as the zero value.
            Value::Null => Ok(String::new()),
            other => bail!("an element of {name:?} is {other}, not a string"),
        })
        .collect::<anyhow::Result<Vec<_>>>()
        .map(Some)
}

/// A map field: `None` when nil. Values are kept only for `map[string]string`.
fn map_field(
    obj: &Map<String, Value>,
    name: &str,
    string_values: bool,
) -> anyhow::Result<Option<Vec<(String, String)>>> {
    let Some(v) = member(obj, name) else {
        return Ok(None);
    };
    let Value::Object(m) = v else {
        bail!("{name:?} is {v}, not an object");
    };
    let mut entries = Vec::with_capacity(m.len());
    for (k, v) in m {
        let value = match (string_values, v) {
            (true, Value::String(s)) => s.clone(),
            (true, Value::Null) | (false, Value::Object(_) | Value::Null) => String::new(),
            (_, other) => bail!("{name:?}[{k:?}] is {other}, of the wrong type"),
        };
        entries.push((k.clone(), value));
    }
    // Go writes map keys sorted (as strings, bytewise).
    entries.sort();
    Ok(Some(entries))
}

/// Go's `time.Time` round trip: RFC 3339 in, RFC 3339 with nanoseconds (trailing zeros
/// trimmed, `Z` for a zero offset) out.
fn go_time(s: &str) -> anyhow::Result<String> {
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    let ok = b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && (b[10] == b'T' || b[10] == b't')
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    if !ok {
        bail!("time {s:?} is not RFC 3339");
    }
    let mut rest = &s[19..];
    let mut frac = "";
    if let Some(r) = rest.strip_prefix('.') {
        let n = r.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            bail!("time {s:?} is not RFC 3339");
        }
        frac = &r[..n.min(9)];
        rest = &r[n..];
    }
    let zone = match rest {
        "Z" | "z" | "+00:00" | "-00:00" => "Z",
        z if z.len() == 6
            && (z.starts_with('+') || z.starts_with('-'))
            && z.as_bytes()[3] == b':'
            && z[1..3]
                .bytes()
                .chain(z[4..].bytes())
                .all(|c| c.is_ascii_digit()) =>
        {
            z
        }
        _ => bail!("time {s:?} has no valid zone"),
    };
    let frac = frac.trim_end_matches('0');
    let mut out = format!("{}T{}", &s[..10], &s[11..19]);
    if !frac.is_empty() {
        out.push('.');
        out.push_str(frac);
    }
    out.push_str(zone);
    Ok(out)
}

fn time_field(obj: &Map<String, Value>, name: &str) -> anyhow::Result<Option<String>> {
    string_field(obj, name)?
        .map(|s| go_time(&s))
        .transpose()
        .with_context(|| format!("field {name:?}"))
}

fn write_strings(out: &mut String, items: &[String]) {
    out.push('[');
    for (i, s) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_string(out, s);
    }
    out.push(']');
}

fn write_map(out: &mut String, entries: &[(String, String)], string_values: bool) {
    out.push('{');
    for (i, (k, v)) in entries.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_string(out, k);
        out.push(':');
        if string_values {
            write_string(out, v);
        } else {
            out.push_str("{}");
        }
    }
    out.push('}');
}

/// The OCI `ImageConfig` (the `config` member), decoded as Go decodes it.
#[derive(Debug, Default)]
struct RuntimeConfig {
    user: Option<String>,
    exposed_ports: Option<Vec<(String, String)>>,
    env: Option<Vec<String>>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    volumes: Option<Vec<(String, String)>>,
    working_dir: Option<String>,
    labels: Option<Vec<(String, String)>>,
    stop_signal: Option<String>,
    args_escaped: bool,
}

impl RuntimeConfig {
    fn decode(v: Option<&Value>) -> anyhow::Result<Self> {
        let Some(v) = v else {
            return Ok(Self::default());
        };
        let Value::Object(o) = v else {
            bail!("\"config\" is {v}, not an object");
        };
        Ok(Self {
            user: string_field(o, "User")?,
            exposed_ports: map_field(o, "ExposedPorts", false)?,
            env: strings_field(o, "Env")?,
            entrypoint: strings_field(o, "Entrypoint")?,
            cmd: strings_field(o, "Cmd")?,
            volumes: map_field(o, "Volumes", false)?,
            working_dir: string_field(o, "WorkingDir")?,
            labels: map_field(o, "Labels", true)?,
            stop_signal: string_field(o, "StopSignal")?,
            args_escaped: bool_field(o, "ArgsEscaped")?,
        })
    }

    fn write(&self, out: &mut String) {
        let mut o = Obj::new(out);
        let s = |v: &Option<String>| v.as_deref().filter(|s| !s.is_empty()).map(str::to_owned);
        let l = |v: &Option<Vec<String>>| v.as_ref().filter(|l| !l.is_empty()).cloned();
        let m = |v: &Option<Vec<(String, String)>>| v.as_ref().filter(|m| !m.is_empty()).cloned();
        if let Some(v) = s(&self.user) {
            write_string(o.key("User"), &v);
        }
        if let Some(v) = m(&self.exposed_ports) {
            write_map(o.key("ExposedPorts"), &v, false);
        }
        for (name, list) in [
            ("Env", &self.env),
            ("Entrypoint", &self.entrypoint),
            ("Cmd", &self.cmd),
        ] {
            if let Some(v) = l(list) {
                write_strings(o.key(name), &v);
            }
        }
        if let Some(v) = m(&self.volumes) {
            write_map(o.key("Volumes"), &v, false);
        }
        if let Some(v) = s(&self.working_dir) {
            write_string(o.key("WorkingDir"), &v);
        }
        if let Some(v) = m(&self.labels) {
            write_map(o.key("Labels"), &v, true);
        }
        if let Some(v) = s(&self.stop_signal) {
            write_string(o.key("StopSignal"), &v);
        }
        if self.args_escaped {
            o.key("ArgsEscaped").push_str("true");
        }
        o.end();
    }
}

fn parse_object(raw: &[u8]) -> anyhow::Result<Map<String, Value>> {
    match serde_json::from_slice(raw).context("parsing the image config")? {
        Value::Object(o) => Ok(o),
        other => bail!("the image config is {}, not an object", kind(&other)),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `GetFullConfig`: the config decoded into OCI `v1.Image` and marshalled again.
///
/// # Errors
/// The config is not JSON or a member has a type Go would refuse.
pub(crate) fn oci_config(raw: &[u8]) -> anyhow::Result<Vec<u8>> {
    let o = parse_object(raw)?;
    let mut out = String::with_capacity(raw.len());
    let mut w = Obj::new(&mut out);
    if let Some(t) = time_field(&o, "created")? {
        write_string(w.key("created"), &t);
    }
    for (name, always) in [
        ("author", false),
        ("architecture", true),
        ("os", true),
        ("os.version", false),
    ] {
        let v = string_field(&o, name)?.unwrap_or_default();
        if always || !v.is_empty() {
            write_string(w.key(name), &v);
        }
    }
    if let Some(f) = strings_field(&o, "os.features")?.filter(|f| !f.is_empty()) {
        write_strings(w.key("os.features"), &f);
    }
    if let Some(v) = string_field(&o, "variant")?.filter(|v| !v.is_empty()) {
        write_string(w.key("variant"), &v);
    }
    // `config` is always written, as by skopeo built with image-spec before 1.1.1 (Debian's
    // 1.9.3, which the differential test runs). Later image-spec tags it `omitzero`, so newer
    // skopeo leaves out an empty one (`proto/image-proxy.md` §5).
    RuntimeConfig::decode(member(&o, "config"))?.write(w.key("config"));
    write_rootfs(w.key("rootfs"), member(&o, "rootfs"))?;
    write_history(&mut w, member(&o, "history"))?;
    w.end();
    Ok(out.into_bytes())
}

fn write_rootfs(out: &mut String, v: Option<&Value>) -> anyhow::Result<()> {
    let empty = Map::new();
    let o = match v {
        None => &empty,
        Some(Value::Object(o)) => o,
        Some(other) => bail!("\"rootfs\" is {other}, not an object"),
    };
    let mut w = Obj::new(out);
    write_string(w.key("type"), &string_field(o, "type")?.unwrap_or_default());
    match strings_field(o, "diff_ids")? {
        Some(ids) => write_strings(w.key("diff_ids"), &ids),
        None => w.key("diff_ids").push_str("null"),
    }
    w.end();
    Ok(())
}

fn write_history(w: &mut Obj<'_>, v: Option<&Value>) -> anyhow::Result<()> {
    let entries = match v {
        None => return Ok(()),
        Some(Value::Array(a)) if a.is_empty() => return Ok(()),
        Some(Value::Array(a)) => a,
        Some(other) => bail!("\"history\" is {other}, not an array"),
    };
    let out = w.key("history");
    out.push('[');
    let empty = Map::new();
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let h = match e {
            Value::Object(h) => h,
            Value::Null => &empty,
            other => bail!("history entry {i} is {other}, not an object"),
        };
        let mut o = Obj::new(out);
        if let Some(t) = time_field(h, "created")? {
            write_string(o.key("created"), &t);
        }
        for name in ["created_by", "author", "comment"] {
            if let Some(v) = string_field(h, name)?.filter(|v| !v.is_empty()) {
                write_string(o.key(name), &v);
            }
        }
        if bool_field(h, "empty_layer")? {
            o.key("empty_layer").push_str("true");
        }
        o.end();
    }
    out.push(']');
    Ok(())
}

/// `GetConfig`: only the `config` member, as Go marshals `v1.ImageConfig` (`{}` when empty).
///
/// # Errors
/// As [`oci_config`].
pub(crate) fn oci_runtime_config(raw: &[u8]) -> anyhow::Result<Vec<u8>> {
    let o = parse_object(raw)?;
    let mut out = String::new();
    RuntimeConfig::decode(member(&o, "config"))?.write(&mut out);
    Ok(out.into_bytes())
}

/// Media types of Docker schema 2 layers and their OCI equivalents (containers/image
/// `convertToManifestOCI1`).
const LAYER_TYPES: &[(&str, &str)] = &[
    (
        "application/vnd.docker.image.rootfs.foreign.diff.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
    ),
    (
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    ),
    (
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.oci.image.layer.v1.tar",
    ),
    (
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.oci.image.layer.v1.tar+gzip",
    ),
    (
        "application/vnd.docker.image.rootfs.diff.tar.zstd",
        "application/vnd.oci.image.layer.v1.tar+zstd",
    ),
];

fn write_descriptor(
    out: &mut String,
    media_type: &str,
    digest: &str,
    size: i64,
    urls: Option<&[String]>,
) {
    let mut o = Obj::new(out);
    write_string(o.key("mediaType"), media_type);
    write_string(o.key("digest"), digest);
    o.key("size").push_str(&size.to_string());
    if let Some(urls) = urls.filter(|u| !u.is_empty()) {
        write_strings(o.key("urls"), urls);
    }
    o.end();
}

/// `GetManifest` of a Docker schema 2 image: the OCI manifest containers/image converts it to,
/// whose config descriptor names `oci_config` (the output of [`oci_config`]).
///
/// # Errors
/// The manifest is malformed or has a layer type without an OCI equivalent.
pub(crate) fn oci_manifest_from_docker(raw: &[u8], oci_config: &[u8]) -> anyhow::Result<Vec<u8>> {
    use sha2::Digest;
    let m: Value = serde_json::from_slice(raw).context("parsing the manifest")?;
    let layers = m
        .get("layers")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut out = String::new();
    let mut w = Obj::new(&mut out);
    w.key("schemaVersion").push('2');
    write_string(w.key("mediaType"), OCI_MANIFEST);
    let config_digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(oci_config)));
    write_descriptor(
        w.key("config"),
        OCI_CONFIG,
        &config_digest,
        oci_config.len() as i64,
        None,
    );
    let list = w.key("layers");
    list.push('[');
    for (i, l) in layers.iter().enumerate() {
        if i > 0 {
            list.push(',');
        }
        let field = |k: &str| l.get(k).and_then(Value::as_str).unwrap_or_default();
        let docker_type = field("mediaType");
        let Some((_, oci_type)) = LAYER_TYPES.iter().find(|(d, _)| *d == docker_type) else {
            bail!("Unknown media type during manifest conversion: {docker_type:?}");
        };
        let size = l.get("size").and_then(Value::as_i64).unwrap_or_default();
        let urls: Option<Vec<String>> = l.get("urls").and_then(Value::as_array).map(|u| {
            u.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        });
        write_descriptor(list, oci_type, field("digest"), size, urls.as_deref());
    }
    list.push(']');
    w.end();
    Ok(out.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_as_go_does() {
        let mut out = String::new();
        write_string(&mut out, "a<b>&\"\\\n\u{1}\u{2028}é");
        assert_eq!(out, r#""a\u003cb\u003e\u0026\"\\\n\u0001\u2028é""#);
    }

    #[test]
    fn times_round_trip_as_go_does() {
        for (input, go) in [
            ("2023-11-14T22:13:20Z", "2023-11-14T22:13:20Z"),
            ("2023-11-14T22:13:20.120000Z", "2023-11-14T22:13:20.12Z"),
            ("2023-11-14T22:13:20.000Z", "2023-11-14T22:13:20Z"),
            ("2023-11-14T22:13:20+00:00", "2023-11-14T22:13:20Z"),
            ("2023-11-14T22:13:20.5+02:00", "2023-11-14T22:13:20.5+02:00"),
        ] {
            assert_eq!(go_time(input).unwrap(), go, "{input}");
        }
        assert!(go_time("yesterday").is_err());
    }

    #[test]
    fn configs_lose_unknown_members_and_gain_go_order() {
        let raw = br#"{"os":"linux","architecture":"amd64","container_config":{"Hostname":"x"},
            "config":{"Labels":{"b":"2","a":"1"},"Env":["PATH=/bin"],"Hostname":"h","ExposedPorts":{"80/tcp":{}}},
            "rootfs":{"diff_ids":["sha256:00"],"type":"layers"},"history":[{"created_by":"x","empty_layer":true}],
            "created":"2024-01-01T00:00:00.000000001Z"}"#;
        assert_eq!(
            String::from_utf8(oci_config(raw).unwrap()).unwrap(),
            r#"{"created":"2024-01-01T00:00:00.000000001Z","architecture":"amd64","os":"linux","config":{"ExposedPorts":{"80/tcp":{}},"Env":["PATH=/bin"],"Labels":{"a":"1","b":"2"}},"rootfs":{"type":"layers","diff_ids":["sha256:00"]},"history":[{"created_by":"x","empty_layer":true}]}"#
        );
        assert_eq!(
            String::from_utf8(oci_runtime_config(raw).unwrap()).unwrap(),
            r#"{"ExposedPorts":{"80/tcp":{}},"Env":["PATH=/bin"],"Labels":{"a":"1","b":"2"}}"#
        );
        // An empty runtime config is written as `{}`.
        let bare = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers"}}"#;
        assert_eq!(
            String::from_utf8(oci_config(bare).unwrap()).unwrap(),
            r#"{"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":null}}"#
        );
        assert_eq!(oci_runtime_config(bare).unwrap(), b"{}");
        assert!(oci_config(br#"{"config":{"Env":"x"}}"#).is_err());
    }

    #[test]
    fn docker_manifests_convert_to_oci() {
        let raw = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",
            "config":{"mediaType":"application/vnd.docker.container.image.v1+json","size":1,"digest":"sha256:aa"},
            "layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":5,"digest":"sha256:bb"}]}"#;
        let m = String::from_utf8(oci_manifest_from_docker(raw, b"{}").unwrap()).unwrap();
        assert_eq!(
            m,
            format!(
                r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"{OCI_CONFIG}","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:bb","size":5}}]}}"#
            )
        );
    }
}
