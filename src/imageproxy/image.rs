//! Opened images and the metadata answers skopeo gives for them: the manifest (converted to
//! OCI), the re-marshalled config, and the layer infos (`proto/image-proxy.md` §3).

use crate::repo::SourceTrust;
use std::path::PathBuf;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::gojson;
use crate::proto::rpc::{LayerInfo, OpenImageResult};
use crate::proto::source::{ImageRef, Store};

/// Media type of a Docker schema 2 manifest.
const DOCKER_V2S2: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Media type of a Docker schema 2 config.
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Uncompressed layer type containers/image reports for Docker manifests.
const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
/// Uncompressed OCI layer type.
const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// What kind of manifest an image has (containers/image `GuessMIMEType`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ManifestType {
    /// OCI image manifest.
    Oci,
    /// Docker schema 2 manifest, served converted to OCI.
    DockerV2S2,
    /// Anything else (schema 1, lists): refused as skopeo refuses it.
    Other(String),
}

impl ManifestType {
    fn guess(manifest: &Value) -> Self {
        let mt = manifest.get("mediaType").and_then(Value::as_str);
        match mt {
            Some(gojson::OCI_MANIFEST) => return ManifestType::Oci,
            Some(DOCKER_V2S2) => return ManifestType::DockerV2S2,
            Some(other) if !other.is_empty() => return ManifestType::Other(other.to_owned()),
            _ => {}
        }
        let config_type = manifest
            .pointer("/config/mediaType")
            .and_then(Value::as_str);
        match manifest.get("schemaVersion").and_then(Value::as_i64) {
            Some(2) if config_type == Some(DOCKER_CONFIG) => ManifestType::DockerV2S2,
            Some(2) if manifest.get("manifests").is_some() => {
                ManifestType::Other("application/vnd.oci.image.index.v1+json".into())
            }
            Some(2) => ManifestType::Oci,
            _ => ManifestType::Other("an unrecognised manifest".into()),
        }
    }
}

/// One image opened by `OpenImage`.
#[derive(Debug)]
pub(crate) struct Image {
    /// The name the client opened, as given.
    pub(crate) name: String,
    /// Where it lives.
    pub(crate) source: ImageRef,
    /// The manifest as stored.
    pub(crate) manifest: Vec<u8>,
    /// Its parsed form.
    manifest_json: Value,
    /// Its kind.
    pub(crate) manifest_type: ManifestType,
    /// The config as stored.
    pub(crate) config: Vec<u8>,
    /// `sha256:…` of `config`.
    pub(crate) config_digest: String,
    /// The layers, base first, as the helper resolved them.
    pub(crate) layers: Vec<LayerInfo>,
    /// Whose diff files may be moved to the client unread (see [`store_trust`]).
    trust: SourceTrust,
}

/// Whose files of a store the proxy may move into a pipe with `splice` after hashing them by
/// a separate read: files owned by root or by this process's user, writable by nobody else,
/// when the store's root (as the helper reports it) is such a directory too. Nobody who could
/// change such a file between its hash and its splice could not have changed the proxy's
/// answers anyway (the same rule as `pull`'s, [`SourceTrust::Owners`]). Every other file —
/// a rootless store's, whose owners are subordinate ids — is copied through the buffer that
/// is hashed, so the client only ever gets bytes that were hashed.
fn store_trust(store_root: Option<&str>) -> SourceTrust {
    let uid = rustix::process::geteuid().as_raw();
    let trusted = store_root
        .and_then(|root| rustix::fs::stat(root).ok())
        .is_some_and(|st| SourceTrust::Owners { uid }.trusts(&st));
    if trusted {
        SourceTrust::Owners { uid }
    } else {
        SourceTrust::Untrusted
    }
}

/// Where `GetBlob` finds a digest of an image.
#[derive(Debug)]
pub(crate) enum BlobSource {
    /// Bytes already in memory (a containers-storage image's config).
    Bytes(std::sync::Arc<[u8]>),
    /// A file of an OCI layout's `blobs/`.
    File(PathBuf),
    /// A containers-storage layer, rebuilt as its uncompressed tar.
    Layer {
        /// The store.
        store: Store,
        /// The reference that opened the image in it.
        reference: String,
        /// The layer's diff_id.
        diff_id: String,
        /// Which bodies may be spliced rather than copied.
        trust: SourceTrust,
    },
}

/// `sha256:…` of `bytes`.
pub(crate) fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Parse a name the client opens: skopeo's transports we serve, or a clear error.
///
/// # Errors
/// Another transport, or a malformed name.
pub(crate) fn parse_name(name: &str) -> anyhow::Result<ImageRef> {
    if !name.starts_with("containers-storage:") && !name.starts_with("oci:") {
        let transport = name.split_once(':').map_or(name, |(t, _)| t);
        bail!(
            "image {name:?}: transport {transport:?} is not served by this proxy (only \
             containers-storage: and oci:; use skopeo for the others)"
        );
    }
    Ok(name.parse()?)
}

impl Image {
    /// Build from the helper's answer for `source`.
    ///
    /// # Errors
    /// The manifest is not JSON.
    pub(crate) fn new(
        name: &str,
        source: ImageRef,
        opened: OpenImageResult,
    ) -> anyhow::Result<Self> {
        let manifest = opened.manifest.into_bytes();
        let manifest_json: Value = serde_json::from_slice(&manifest)
            .with_context(|| format!("parsing the manifest of image {name:?}"))?;
        let manifest_type = ManifestType::guess(&manifest_json);
        let config = opened.config.into_bytes();
        let trust = store_trust(opened.store_root.as_deref());
        Ok(Image {
            trust,
            name: name.to_owned(),
            source,
            config_digest: sha256_digest(&config),
            manifest,
            manifest_json,
            manifest_type,
            config,
            layers: opened.layers,
        })
    }

    /// `GetManifest`: the digest of the manifest as stored, and the manifest as served (OCI).
    ///
    /// # Errors
    /// A manifest type skopeo refuses, or one that does not convert.
    pub(crate) fn manifest(&self) -> anyhow::Result<(String, Vec<u8>)> {
        let digest = sha256_digest(&self.manifest);
        let served = match &self.manifest_type {
            ManifestType::Oci => self.manifest.clone(),
            ManifestType::DockerV2S2 => {
                let config = self.full_config()?;
                gojson::oci_manifest_from_docker(&self.manifest, &config)
                    .with_context(|| format!("converting the manifest of {:?} to OCI", self.name))?
            }
            ManifestType::Other(t) => bail!("unsupported manifest MIME type: {t}"),
        };
        Ok((digest, served))
    }

    fn check_image_config(&self) -> anyhow::Result<()> {
        if self.manifest_type == ManifestType::Oci {
            let ct = self
                .manifest_json
                .pointer("/config/mediaType")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if ct != gojson::OCI_CONFIG {
                bail!(
                    "image {:?} is an artifact (config media type {ct:?}), not a container image",
                    self.name
                );
            }
        }
        Ok(())
    }

    /// `GetFullConfig`: the config as Go re-marshals it.
    ///
    /// # Errors
    /// Not an image config, or one Go would refuse.
    pub(crate) fn full_config(&self) -> anyhow::Result<Vec<u8>> {
        self.check_image_config()?;
        gojson::oci_config(&self.config)
            .with_context(|| format!("the config {} of {:?}", self.config_digest, self.name))
    }

    /// `GetConfig`: the config's `config` member as Go re-marshals it.
    ///
    /// # Errors
    /// As [`full_config`](Self::full_config).
    pub(crate) fn runtime_config(&self) -> anyhow::Result<Vec<u8>> {
        self.check_image_config()?;
        gojson::oci_runtime_config(&self.config)
            .with_context(|| format!("the config {} of {:?}", self.config_digest, self.name))
    }

    /// `GetLayerInfo`: for containers-storage the uncompressed digests and sizes (what the
    /// store can produce), for an OCI layout the manifest's layer descriptors.
    pub(crate) fn layer_infos(&self) -> Value {
        match self.source.store {
            Store::ContainersStorage { .. } => {
                let media_type = match self.manifest_type {
                    ManifestType::Oci => OCI_LAYER_TAR,
                    ManifestType::DockerV2S2 => DOCKER_LAYER_TAR,
                    ManifestType::Other(_) => "",
                };
                self.layers
                    .iter()
                    .map(|l| {
                        let size = l.size.map_or(-1, |s| i64::try_from(s).unwrap_or(-1));
                        json!({"digest": l.diff_id, "size": size, "media_type": media_type})
                    })
                    .collect()
            }
            Store::OciLayout { .. } => self
                .manifest_json
                .get("layers")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|l| {
                    json!({
                        "digest": l.get("digest").and_then(Value::as_str).unwrap_or_default(),
                        "size": l.get("size").and_then(Value::as_i64).unwrap_or(-1),
                        "media_type": l.get("mediaType").and_then(Value::as_str).unwrap_or_default(),
                    })
                })
                .collect(),
        }
    }

    /// Where `GetBlob` finds `digest`, and its size (-1 when unknown).
    ///
    /// # Errors
    /// A malformed digest, or one the image does not have.
    pub(crate) fn blob(&self, digest: &str) -> anyhow::Result<(BlobSource, i64)> {
        let (alg, hex) = digest
            .split_once(':')
            .with_context(|| format!("invalid digest {digest:?}"))?;
        let hex_len = match alg {
            "sha256" => 64,
            "sha512" => 128,
            _ => bail!("invalid digest {digest:?}: unsupported algorithm {alg:?}"),
        };
        if hex.len() != hex_len || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            bail!("invalid digest {digest:?}");
        }
        match &self.source.store {
            Store::OciLayout { dir } => {
                let path = dir.join("blobs").join(alg).join(hex);
                let md = std::fs::metadata(&path).with_context(|| {
                    format!("blob {digest} of {:?}: {}", self.name, path.display())
                })?;
                Ok((BlobSource::File(path), md.len() as i64))
            }
            Store::ContainersStorage { .. } => {
                if digest == self.config_digest {
                    return Ok((
                        BlobSource::Bytes(self.config.clone().into()),
                        self.config.len() as i64,
                    ));
                }
                let Some(layer) = self.layers.iter().find(|l| l.diff_id == digest) else {
                    bail!(
                        "blob {digest} is not the config or a layer diff_id of image {:?} \
                         (containers-storage keeps layers uncompressed: GetLayerInfoPiped \
                         lists the digests it serves)",
                        self.name
                    );
                };
                let size = layer.size.map_or(-1, |s| i64::try_from(s).unwrap_or(-1));
                Ok((
                    BlobSource::Layer {
                        store: self.source.store.clone(),
                        reference: self.source.reference.clone(),
                        diff_id: layer.diff_id.clone(),
                        trust: self.trust,
                    },
                    size,
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_types_are_guessed_as_containers_image_does() {
        let g = |v: Value| ManifestType::guess(&v);
        assert_eq!(
            g(json!({"schemaVersion": 2, "mediaType": gojson::OCI_MANIFEST})),
            ManifestType::Oci
        );
        assert_eq!(
            g(json!({"schemaVersion": 2, "config": {"mediaType": gojson::OCI_CONFIG}})),
            ManifestType::Oci
        );
        assert_eq!(
            g(json!({"schemaVersion": 2, "config": {"mediaType": DOCKER_CONFIG}})),
            ManifestType::DockerV2S2
        );
        assert!(matches!(
            g(json!({"schemaVersion": 1})),
            ManifestType::Other(_)
        ));
    }

    #[test]
    fn other_transports_are_refused_by_name() {
        let e = parse_name("docker://quay.io/x").unwrap_err().to_string();
        assert!(e.contains("\"docker\"") && e.contains("not served"), "{e}");
        assert!(parse_name("oci:/tmp/x:tag").is_ok());
    }
}
