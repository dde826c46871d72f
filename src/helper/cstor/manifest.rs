//! Which of an image's stored manifests is served, and whether it agrees with the layer records.
//!
//! containers/image keeps every manifest it stored an image under as the big-data item
//! `manifest-<digest>`, and the last one also as `manifest` (the item older readers and
//! `cfsctl` read). One image has several when it was pulled under several manifests: the same
//! config pushed with gzip and with zstd layers, or a manifest list and its instance. Its
//! layers are stored once, so `layers.json` records only the blob each layer was first made
//! from; a manifest naming another compression of the same tar is normal, while one naming a
//! blob that `layers.json` records for a *different* tar, or with another size, is not.

use std::collections::HashMap;

use anyhow::{Context, bail, ensure};
use serde::Deserialize;

use super::store::{ImageRecord, LayerRecord};
use super::{is_digest, sha256_digest};

/// The big-data key of the default manifest.
const DEFAULT_KEY: &str = "manifest";

/// The parts of a manifest (OCI or Docker schema 2), or of an index or list, used here.
#[derive(Debug, Default, Deserialize)]
pub(super) struct Manifest {
    #[serde(default, rename = "schemaVersion")]
    schema_version: Option<u64>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

#[derive(Debug, Deserialize)]
struct Descriptor {
    digest: String,
    #[serde(default)]
    size: Option<u64>,
}

impl Manifest {
    /// Docker schema 1: containers/image names it by the digest of its payload without the
    /// signatures, so its bytes do not hash to its recorded digest, and it names no config.
    fn is_schema1(&self) -> bool {
        self.schema_version == Some(1)
    }

    /// An OCI index or a Docker manifest list.
    fn is_index(&self) -> bool {
        self.manifests.is_some() && self.layers.is_none()
    }
}

/// A manifest read from the store.
#[derive(Debug)]
pub(super) struct StoredManifest {
    /// The bytes as stored.
    pub bytes: Vec<u8>,
    /// `sha256:…` of `bytes`.
    pub digest: String,
    pub parsed: Manifest,
}

/// Reads one big-data item of the image: `None` if it does not exist.
pub(super) type BigData<'a> = dyn Fn(&str) -> anyhow::Result<Option<Vec<u8>>> + 'a;

/// The manifest digest that `reference` asks for: the digest of a `name@sha256:…` reference,
/// unless it is the image id itself (`@ID`, `@sha256:ID`), which names no manifest.
pub(super) fn requested_digest<'r>(reference: &'r str, image_id: &str) -> Option<&'r str> {
    let (_, digest) = reference.split_once('@')?;
    (digest.strip_prefix("sha256:").unwrap_or(digest) != image_id).then_some(digest)
}

/// The manifest to serve, chosen as containers/image's storage source chooses it: for a
/// `name@DIGEST` reference the item stored under that digest (for an image stored before such
/// items existed, the default one, which must then have that digest), otherwise the default
/// item `manifest`. An index asked for by digest stands for the image's own manifest among
/// those it lists, as containers/image picks an instance from a list.
///
/// # Errors
/// The manifest is missing, unparsable, or does not have the digest the store recorded or the
/// reference asked for.
pub(super) fn select(
    image: &ImageRecord,
    wanted: Option<&str>,
    big_data: &BigData<'_>,
) -> anyhow::Result<StoredManifest> {
    let id = &image.id;
    let default = || {
        read(image, DEFAULT_KEY, big_data)?
            .with_context(|| format!("image {id} has no manifest (no big-data item {DEFAULT_KEY})"))
    };
    let Some(wanted) = wanted else {
        return default();
    };
    let key = format!("{DEFAULT_KEY}-{wanted}");
    let (key, manifest) = match read(image, &key, big_data)? {
        Some(m) => (key, m),
        None => (DEFAULT_KEY.to_owned(), default()?),
    };
    if manifest.parsed.is_schema1() {
        return Ok(manifest);
    }
    ensure!(
        manifest.digest == wanted,
        "image {id}: the manifest stored for {wanted} (big-data item {key}) has digest {}",
        manifest.digest
    );
    if !manifest.parsed.is_index() {
        return Ok(manifest);
    }
    instance(image, &manifest, big_data)
}

/// The image's own manifest among those `index` lists: the default item if it is one of them,
/// else the first listed one stored with the image. Each must name the image's config.
fn instance(
    image: &ImageRecord,
    index: &StoredManifest,
    big_data: &BigData<'_>,
) -> anyhow::Result<StoredManifest> {
    let config = format!("sha256:{}", image.id);
    let listed: Vec<&str> = index
        .parsed
        .manifests
        .iter()
        .flatten()
        .map(|d| d.digest.as_str())
        .filter(|d| is_digest(d))
        .collect();
    let fits = |m: &StoredManifest| {
        !m.parsed.is_index()
            && listed.contains(&m.digest.as_str())
            && m.parsed.config.as_ref().is_some_and(|c| c.digest == config)
    };
    if let Some(m) = read(image, DEFAULT_KEY, big_data)?
        && fits(&m)
    {
        return Ok(m);
    }
    for digest in &listed {
        if let Some(m) = read(image, &format!("{DEFAULT_KEY}-{digest}"), big_data)?
            && fits(&m)
        {
            return Ok(m);
        }
    }
    bail!(
        "image {}: {} is an image index, and none of the {} manifests it lists is stored with \
         the image for config {config}",
        image.id,
        index.digest,
        listed.len()
    )
}

/// Read and parse big-data item `key`, checking the digest the store recorded for it.
fn read(
    image: &ImageRecord,
    key: &str,
    big_data: &BigData<'_>,
) -> anyhow::Result<Option<StoredManifest>> {
    let Some(bytes) = big_data(key)? else {
        return Ok(None);
    };
    let parsed: Manifest = serde_json::from_slice(&bytes)
        .with_context(|| format!("image {}: parsing big-data item {key}", image.id))?;
    let digest = sha256_digest(&bytes);
    if !parsed.is_schema1()
        && let Some(recorded) = image.big_data_digests.get(key)
    {
        ensure!(
            *recorded == digest,
            "image {}: big-data item {key} has digest {digest}, the store recorded {recorded}",
            image.id
        );
    }
    Ok(Some(StoredManifest {
        bytes,
        digest,
        parsed,
    }))
}

/// Check the manifest against the image and the layer records: it must name the image's
/// config and one blob per layer, and every layer record that knows a blob it names (as the
/// blob the layer was made from, or as the layer's uncompressed tar) must record it for the
/// same diff_id and with the same size. A blob no record knows is another compression of a
/// layer that was stored from a different one: containers/image then reuses the layer and
/// `layers.json` keeps the first blob.
///
/// `chain` and `diff_ids` are the image's layers and its config's diff_ids, base first.
///
/// # Errors
/// Any disagreement, naming the layer.
pub(super) fn check_layers(
    image_id: &str,
    manifest: &Manifest,
    chain: &[&LayerRecord],
    diff_ids: &[String],
    records: &HashMap<String, LayerRecord>,
) -> anyhow::Result<()> {
    if manifest.is_schema1() {
        return Ok(());
    }
    let config = format!("sha256:{image_id}");
    let named = manifest.config.as_ref().map(|c| c.digest.as_str());
    ensure!(
        named == Some(config.as_str()),
        "image {image_id}: its manifest names config {}",
        named.unwrap_or("(none)")
    );
    let blobs = manifest.layers.as_deref().unwrap_or_default();
    ensure!(
        blobs.len() == chain.len(),
        "image {image_id}: its manifest lists {} layers, its config {}",
        blobs.len(),
        chain.len()
    );
    for (i, ((layer, diff_id), blob)) in chain.iter().zip(diff_ids).zip(blobs).enumerate() {
        let at = || {
            format!(
                "image {image_id}: layer {i} ({}, diff_id {diff_id})",
                layer.id
            )
        };
        for record in records.values() {
            for (made_from, digest, size) in [
                (true, &record.compressed_digest, record.compressed_size),
                (false, &record.diff_digest, record.diff_size),
            ] {
                if digest.as_deref() != Some(blob.digest.as_str()) {
                    continue;
                }
                if let Some(of) = record.diff_digest.as_deref().filter(|d| !d.is_empty())
                    && of != diff_id
                {
                    let what = if made_from {
                        format!("the blob layer {} was made from", record.id)
                    } else {
                        format!("the tar of layer {}", record.id)
                    };
                    bail!(
                        "{}: the manifest names blob {}, which layers.json records as {what} \
                         (diff_id {of})",
                        at(),
                        blob.digest
                    );
                }
                if let (Some(expected), Some(recorded)) =
                    (blob.size, size.and_then(|s| u64::try_from(s).ok()))
                    && expected != recorded
                {
                    bail!(
                        "{}: the manifest gives blob {} {expected} bytes, layers.json records \
                         {recorded} (layer {})",
                        at(),
                        blob.digest,
                        record.id
                    );
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn digest(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn layer(id: char, made_from: char, size: i64, diff: char) -> LayerRecord {
        serde_json::from_value(json!({
            "id": id.to_string().repeat(64),
            "compressed-diff-digest": digest(made_from),
            "compressed-size": size,
            "diff-digest": digest(diff),
            "diff-size": 10240,
        }))
        .unwrap()
    }

    fn manifest(config: &str, blobs: &[(char, u64)]) -> Vec<u8> {
        let layers: Vec<_> = blobs
            .iter()
            .map(|(d, size)| json!({"mediaType": "x", "digest": digest(*d), "size": size}))
            .collect();
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "config": {"mediaType": "x", "digest": config, "size": 1},
            "layers": layers,
        }))
        .unwrap()
    }

    /// Two layers made from gzip blobs `1` and `2`, of tars `a` and `b`.
    fn check(blobs: &[(char, u64)]) -> anyhow::Result<()> {
        let records: HashMap<String, LayerRecord> = [layer('c', '1', 100, 'a'), {
            let mut l = layer('d', '2', 200, 'b');
            l.parent = Some("c".repeat(64));
            l
        }]
        .into_iter()
        .map(|l| (l.id.clone(), l))
        .collect();
        let chain: Vec<&LayerRecord> = [&"c".repeat(64), &"d".repeat(64)]
            .iter()
            .map(|id| &records[*id])
            .collect();
        let image_id = "f".repeat(64);
        let parsed: Manifest =
            serde_json::from_slice(&manifest(&format!("sha256:{image_id}"), blobs)).unwrap();
        check_layers(
            &image_id,
            &parsed,
            &chain,
            &[digest('a'), digest('b')],
            &records,
        )
    }

    #[test]
    fn layer_checks() {
        // The blobs the layers were made from, or their tars.
        check(&[('1', 100), ('2', 200)]).unwrap();
        check(&[('a', 10240), ('2', 200)]).unwrap();
        // Other compressions of the same tars, unknown to layers.json: the layers were reused.
        check(&[('7', 90), ('8', 180)]).unwrap();
        let err = |blobs| format!("{:#}", check(blobs).unwrap_err());
        let e = err(&[('1', 101), ('2', 200)]);
        assert!(
            e.contains("layer 0") && e.contains("gives blob") && e.contains("100"),
            "{e}"
        );
        let e = err(&[('2', 200), ('1', 100)]);
        assert!(e.contains("layer 0") && e.contains("was made from"), "{e}");
        let e = err(&[('1', 100), ('a', 10240)]);
        assert!(
            e.contains("layer 1") && e.contains("the tar of layer"),
            "{e}"
        );
        let e = err(&[('1', 100)]);
        assert!(e.contains("lists 1 layers, its config 2"), "{e}");
    }

    #[test]
    fn manifests_are_chosen_by_digest() {
        let id = "f".repeat(64);
        let config = format!("sha256:{id}");
        let gzip = manifest(&config, &[('1', 100)]);
        let zstd = manifest(&config, &[('7', 90)]);
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": "x", "digest": sha256_digest(&gzip), "size": 1}],
        }))
        .unwrap();
        let items: HashMap<String, Vec<u8>> = [
            ("manifest".to_owned(), zstd.clone()),
            (format!("manifest-{}", sha256_digest(&zstd)), zstd.clone()),
            (format!("manifest-{}", sha256_digest(&gzip)), gzip.clone()),
            (format!("manifest-{}", sha256_digest(&index)), index.clone()),
        ]
        .into_iter()
        .collect();
        let mut image: ImageRecord = serde_json::from_value(json!({"id": id})).unwrap();
        for (key, bytes) in &items {
            image
                .big_data_digests
                .insert(key.clone(), sha256_digest(bytes));
        }
        let big_data = |key: &str| Ok(items.get(key).cloned());
        let chosen = |image: &ImageRecord, wanted: Option<&str>| {
            select(image, wanted, &big_data).map(|m| m.bytes)
        };
        assert_eq!(chosen(&image, None).unwrap(), zstd);
        assert_eq!(chosen(&image, Some(&sha256_digest(&gzip))).unwrap(), gzip);
        // An index stands for the instance stored with the image.
        assert_eq!(chosen(&image, Some(&sha256_digest(&index))).unwrap(), gzip);
        let e = format!("{:#}", chosen(&image, Some(&digest('9'))).unwrap_err());
        assert!(e.contains("the manifest stored for"), "{e}");
        // A manifest that no longer has the digest the store recorded.
        image
            .big_data_digests
            .insert("manifest".into(), digest('9'));
        let e = format!("{:#}", chosen(&image, None).unwrap_err());
        assert!(e.contains("the store recorded"), "{e}");
    }

    #[test]
    fn digests_asked_for() {
        let id = "a".repeat(64);
        let d = format!("sha256:{}", "b".repeat(64));
        assert_eq!(
            requested_digest(&format!("x/app@{d}"), &id),
            Some(d.as_str())
        );
        assert_eq!(requested_digest(&format!("@{d}"), &id), Some(d.as_str()));
        assert_eq!(requested_digest(&format!("@{id}"), &id), None);
        assert_eq!(requested_digest(&format!("@sha256:{id}"), &id), None);
        assert_eq!(requested_digest("x/app:1", &id), None);
    }
}
