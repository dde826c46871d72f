//! Typed JSON-RPC 2.0 methods (spec: `proto/rpc.md`).
//!
//! A request is `{"jsonrpc":"2.0","id":N,"method":M,"params":P}`; [`Request`] is the typed
//! `method`/`params` pair. Results are the `*Result` structs; attached fds are listed per method.

use serde::{Deserialize, Deserializer, Serialize};

/// Protocol version spoken by this build (semver). A peer with another major version is refused.
pub const PROTOCOL_VERSION: &str = "1.0.0";

/// Most fds one `GetLayerFds` reply may carry. Kept at the `sendmsg` batch size so a reply is
/// usually one `recvmsg`, and small enough that a client at a low RLIMIT_NOFILE can ask for less.
pub const MAX_FDS_PER_REPLY: u32 = 253;

/// JSON-RPC error codes used by the helper.
pub mod code {
    /// Invalid JSON was received.
    pub const PARSE_ERROR: i64 = -32700;
    /// The JSON sent is not a valid request object.
    pub const INVALID_REQUEST: i64 = -32600;
    /// The method does not exist.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// Invalid method parameters.
    pub const INVALID_PARAMS: i64 = -32602;
    /// Internal error.
    pub const INTERNAL_ERROR: i64 = -32603;
    /// Framing or fd-count error of the transport (fatal, connection closed).
    pub const FRAMING: i64 = -32050;
    /// `Initialize` missing (any other method first) or repeated.
    pub const NOT_INITIALIZED: i64 = -32001;
    /// `Initialize` asked for another protocol major version.
    pub const VERSION_MISMATCH: i64 = -32002;
    /// The image reference does not resolve in the store.
    pub const IMAGE_NOT_FOUND: i64 = -32010;
    /// The layer index or diff_id is not part of the image.
    pub const LAYER_NOT_FOUND: i64 = -32011;
    /// Unknown image or stream handle.
    pub const BAD_HANDLE: i64 = -32012;
    /// The store could not be read (corrupt metadata, I/O error).
    pub const STORE_ERROR: i64 = -32013;
    /// The session already holds as many images or layer streams as the helper allows; the
    /// client must close one first.
    pub const LIMIT_EXCEEDED: i64 = -32014;

    /// Every code above with its constant's name, for tables and tests.
    pub const ALL: &[(&str, i64)] = &[
        ("PARSE_ERROR", PARSE_ERROR),
        ("INVALID_REQUEST", INVALID_REQUEST),
        ("METHOD_NOT_FOUND", METHOD_NOT_FOUND),
        ("INVALID_PARAMS", INVALID_PARAMS),
        ("INTERNAL_ERROR", INTERNAL_ERROR),
        ("FRAMING", FRAMING),
        ("NOT_INITIALIZED", NOT_INITIALIZED),
        ("VERSION_MISMATCH", VERSION_MISMATCH),
        ("IMAGE_NOT_FOUND", IMAGE_NOT_FOUND),
        ("LAYER_NOT_FOUND", LAYER_NOT_FOUND),
        ("BAD_HANDLE", BAD_HANDLE),
        ("STORE_ERROR", STORE_ERROR),
        ("LIMIT_EXCEEDED", LIMIT_EXCEEDED),
    ];
}

/// A typed request: JSON-RPC `method` plus `params`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", content = "params")]
pub enum Request {
    /// First call of a session, exactly once.
    Initialize(InitializeParams),
    /// Resolve an image reference in the helper's store.
    OpenImage(OpenImageParams),
    /// Start streaming one layer: the reply carries the read end of a pipe.
    GetLayer(GetLayerParams),
    /// Pull the next batch of content fds of a layer stream.
    GetLayerFds(GetLayerFdsParams),
    /// Abandon (or release after completion) a layer stream.
    CloseLayer(CloseLayerParams),
    /// Release an image handle.
    CloseImage(CloseImageParams),
    /// End the session; the helper replies and exits.
    Shutdown(ShutdownParams),
}

impl Request {
    /// Every method name, as sent in `method`.
    pub const METHODS: &[&str] = &[
        "Initialize",
        "OpenImage",
        "GetLayer",
        "GetLayerFds",
        "CloseLayer",
        "CloseImage",
        "Shutdown",
    ];

    /// The JSON-RPC method name.
    pub fn method(&self) -> &'static str {
        match self {
            Self::Initialize(_) => "Initialize",
            Self::OpenImage(_) => "OpenImage",
            Self::GetLayer(_) => "GetLayer",
            Self::GetLayerFds(_) => "GetLayerFds",
            Self::CloseLayer(_) => "CloseLayer",
            Self::CloseImage(_) => "CloseImage",
            Self::Shutdown(_) => "Shutdown",
        }
    }
}

/// Check a received request envelope and type its method and params (the id is the caller's
/// to echo: `msg["id"]`, or null when this fails with [`code::INVALID_REQUEST`]).
///
/// # Errors
/// [`code::INVALID_REQUEST`] for a message that is not a JSON-RPC 2.0 request with an id,
/// [`code::METHOD_NOT_FOUND`] for an unknown method, [`code::INVALID_PARAMS`] for params that
/// do not fit the method.
pub fn parse_request(msg: &serde_json::Value) -> Result<Request, RpcError> {
    let invalid =
        |why: &str| RpcError::new(code::INVALID_REQUEST, format!("invalid request: {why}"));
    if msg.get("jsonrpc").and_then(|v| v.as_str()) != Some("2.0") {
        return Err(invalid("\"jsonrpc\" must be \"2.0\""));
    }
    if !msg
        .get("id")
        .is_some_and(|id| id.is_u64() || id.is_i64() || id.is_string())
    {
        return Err(invalid("\"id\" must be an integer or a string"));
    }
    let Some(method) = msg.get("method").and_then(|v| v.as_str()) else {
        return Err(invalid("\"method\" must be a string"));
    };
    if !Request::METHODS.contains(&method) {
        return Err(RpcError::new(
            code::METHOD_NOT_FOUND,
            format!("unknown method {method:?}"),
        ));
    }
    let mut typed = serde_json::Map::new();
    typed.insert("method".into(), method.into());
    if let Some(params) = msg.get("params") {
        typed.insert("params".into(), params.clone());
    }
    serde_json::from_value(typed.into()).map_err(|e| {
        RpcError::new(
            code::INVALID_PARAMS,
            format!("invalid params for {method}: {e}"),
        )
    })
}

/// `Initialize` params (all optional; `{}`, `null` and absent params are valid).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InitializeParams {
    /// The client's protocol version; the helper refuses another major version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<String>,
}

impl<'de> Deserialize<'de> for InitializeParams {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        struct Object {
            #[serde(default)]
            protocol_version: Option<String>,
        }
        // Going through `Option` makes serde accept `null` and, in `Request`, an absent
        // `params` (an adjacently tagged enum hands a missing content to `deserialize_option`).
        Ok(Option::<Object>::deserialize(deserializer)?
            .map(|o| Self {
                protocol_version: o.protocol_version,
            })
            .unwrap_or_default())
    }
}

/// `Initialize` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitializeResult {
    /// Protocol version of the helper (semver).
    pub protocol_version: String,
    /// Version of the helper program.
    pub helper_version: String,
    /// Optional features the helper supports.
    pub capabilities: Vec<String>,
}

/// `OpenImage` params.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OpenImageParams {
    /// Image reference within the helper's store (name\[:tag\], name@digest, id or id prefix, or
    /// for an OCI layout a tag or empty for its only image).
    pub reference: String,
}

/// One layer of an image, base first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerInfo {
    /// Store-specific layer id (containers-storage layer id, or blob digest for OCI layouts).
    pub id: String,
    /// `sha256:…` digest of the uncompressed layer tar.
    pub diff_id: String,
    /// Uncompressed size in bytes, where the store records it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Number of tar entries, where known without reading the layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<u64>,
}

/// `OpenImage` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OpenImageResult {
    /// Handle for later calls.
    pub image: u64,
    /// Image id (hex sha256 of the config).
    pub image_id: String,
    /// The manifest, exactly as stored.
    pub manifest: String,
    /// `sha256:…` of the manifest bytes.
    pub manifest_digest: String,
    /// The config, exactly as stored.
    pub config: String,
    /// `sha256:…` of the config bytes.
    pub config_digest: String,
    /// Layers, base first.
    pub layers: Vec<LayerInfo>,
    /// The directory the helper serves this image from, as it resolved it: the OCI layout, or
    /// the root of the containers-storage store the image was found in (the graph root, the
    /// image store, or an additional image store). Absent when not valid UTF-8. Clients use it to judge who could
    /// change the files they receive, and MUST NOT rely on it beyond what they check
    /// themselves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_root: Option<String>,
}

/// `GetLayer` params.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GetLayerParams {
    /// Image handle from `OpenImage`.
    pub image: u64,
    /// Layer index (0 = base) or its diff_id.
    pub layer: LayerSelector,
    /// Bodies of at most this many bytes travel inline (default 64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline_threshold: Option<u64>,
}

/// Which layer of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayerSelector {
    /// Position, 0 = base layer.
    Index(u64),
    /// `sha256:…` diff_id.
    DiffId(String),
}

/// Default `inlineThreshold`: composefs keeps bodies of ≤64 bytes inline in its splitstreams.
pub const DEFAULT_INLINE_THRESHOLD: u64 = 64;
/// Largest accepted `inlineThreshold` (one inline chunk).
pub const MAX_INLINE_THRESHOLD: u64 = 1 << 20;

/// `GetLayer` result; fds: `[stream]`, the read end of a pipe carrying the splitfdstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GetLayerResult {
    /// Stream handle for `GetLayerFds` / `CloseLayer`.
    pub stream: u64,
    /// The layer served.
    pub layer: LayerInfo,
}

/// `GetLayerFds` params.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GetLayerFdsParams {
    /// Stream handle.
    pub stream: u64,
    /// Most fds wanted in this reply (1..=253).
    pub max: u32,
}

/// `GetLayerFds` result; fds: `count` content fds, in stream order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GetLayerFdsResult {
    /// Number of fds attached.
    pub count: u32,
    /// tar-split CRC-64/ISO of each attached body, 16 hex digits, or null where unknown.
    pub crc64: Vec<Option<String>>,
    /// Present once the producer has finished and every fd was handed out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<StreamEnd>,
}

/// How a layer stream ended. A stream without `Complete` is never a whole layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "camelCase")]
pub enum StreamEnd {
    /// Every entry was written.
    #[serde(rename_all = "camelCase")]
    Complete {
        /// tar entries written.
        entries: u64,
        /// Content fds sent.
        fds: u64,
        /// Bytes of the reconstructed tar.
        bytes: u64,
    },
    /// The producer stopped early.
    #[serde(rename_all = "camelCase")]
    Failed {
        /// Why, naming the file or layer.
        message: String,
    },
}

/// `CloseLayer` params.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CloseLayerParams {
    /// Stream handle.
    pub stream: u64,
}

/// `CloseImage` params.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CloseImageParams {
    /// Image handle.
    pub image: u64,
}

/// `Shutdown` params (none: `{}`, `null` or absent).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ShutdownParams {}

impl<'de> Deserialize<'de> for ShutdownParams {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Object {}
        // See `InitializeParams`: `Option` admits `null` and absent params.
        Option::<Object>::deserialize(deserializer)?;
        Ok(Self {})
    }
}

/// Result of `CloseLayer`, `CloseImage` and `Shutdown`: `{}` (an object, so later versions
/// can add fields).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmptyResult {}

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} (code {code})")]
pub struct RpcError {
    /// Error code, see [`code`].
    pub code: i64,
    /// Human-readable message naming the object.
    pub message: String,
    /// Optional structured detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

impl RpcError {
    /// An error with no data.
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            data: None,
        }
    }
}

/// Build a request envelope.
pub fn request_message(id: u64, req: &Request) -> serde_json::Value {
    let mut v = serde_json::to_value(req).expect("requests always serialise");
    let obj = v
        .as_object_mut()
        .expect("tagged enum serialises to an object");
    obj.insert("jsonrpc".into(), "2.0".into());
    obj.insert("id".into(), id.into());
    v
}

/// Build a success response envelope.
pub fn result_message(id: &serde_json::Value, result: &impl Serialize) -> serde_json::Value {
    serde_json::json!({"jsonrpc": "2.0", "id": id, "result": result})
}

/// Build an error response envelope (`id` is null when the request's id could not be read).
pub fn error_message(id: &serde_json::Value, err: &RpcError) -> serde_json::Value {
    serde_json::json!({"jsonrpc": "2.0", "id": id, "error": err})
}

/// Is `theirs` (semver) compatible with [`PROTOCOL_VERSION`]? Same major version.
pub fn version_compatible(theirs: &str) -> bool {
    let major = |v: &str| v.split('.').next().and_then(|m| m.parse::<u64>().ok());
    major(theirs).is_some() && major(theirs) == major(PROTOCOL_VERSION)
}
