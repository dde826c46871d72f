//! The reference client of skopeo's image proxy protocol (`containers-image-proxy`) reading a
//! whole image through our `experimental-image-proxy`, every digest checked on this side too.

use std::path::Path;
use std::process::Command;

use containers_image_proxy::{ImageProxy, ImageProxyConfig, oci_spec::image::Digest as OciDigest};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

/// What one image read through the proxy gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRead {
    /// The manifest digest the proxy reported (checked against the manifest's bytes).
    pub manifest_digest: String,
    /// The layer infos: (digest, size), each blob checked against both.
    pub layers: Vec<(String, u64)>,
    /// The config's `rootfs.diff_ids`.
    pub diff_ids: Vec<String>,
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A multi-threaded runtime for the reference client.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Start `program experimental-image-proxy` through the reference client.
pub async fn start(program: &Path) -> ImageProxy {
    let mut config = ImageProxyConfig::default();
    config.skopeo_cmd = Some(Command::new(program));
    ImageProxy::new_with_config(config)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "starting {} experimental-image-proxy: {e}",
                program.display()
            )
        })
}

/// `GetBlob` + `FinishPipe` of `digest`, checked here against `digest` and `size`.
async fn checked_blob(
    proxy: &ImageProxy,
    img: &containers_image_proxy::OpenedImage,
    digest: &str,
    size: u64,
) {
    let d: OciDigest = digest.parse().expect("a digest");
    let (mut reader, driver) = proxy
        .get_blob(img, &d, size)
        .await
        .unwrap_or_else(|e| panic!("GetBlob {digest}: {e}"));
    let mut data = Vec::new();
    let (read, finished) = tokio::join!(reader.read_to_end(&mut data), driver);
    read.unwrap_or_else(|e| panic!("reading blob {digest}: {e}"));
    finished.unwrap_or_else(|e| panic!("FinishPipe of {digest}: {e}"));
    assert_eq!(sha256(&data), digest, "blob {digest}: bytes served");
    assert_eq!(data.len() as u64, size, "blob {digest}: size");
}

/// Open `name`, read manifest, full config, layer infos, every layer blob and the config blob,
/// checking each digest and size; `finalize` must see exit status 0.
pub async fn read_image(program: &Path, name: &str) -> ImageRead {
    let proxy = start(program).await;
    let img = proxy
        .open_image(name)
        .await
        .unwrap_or_else(|e| panic!("opening {name}: {e}"));
    let (manifest_digest, manifest) = proxy
        .fetch_manifest_raw_oci(&img)
        .await
        .unwrap_or_else(|e| panic!("GetManifest {name}: {e}"));
    assert_eq!(
        sha256(&manifest),
        manifest_digest,
        "{name}: manifest digest"
    );
    let config = proxy
        .fetch_config_raw(&img)
        .await
        .unwrap_or_else(|e| panic!("GetFullConfig {name}: {e}"));
    let config: serde_json::Value = serde_json::from_slice(&config).expect("config JSON");
    let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .expect("rootfs.diff_ids")
        .iter()
        .map(|d| d.as_str().expect("a diff_id").to_owned())
        .collect();
    let layers: Vec<(String, u64)> = proxy
        .get_layer_info(&img)
        .await
        .unwrap_or_else(|e| panic!("GetLayerInfo {name}: {e}"))
        .expect("protocol 0.2.8 has layer infos")
        .into_iter()
        .map(|l| (l.digest.to_string(), l.size))
        .collect();
    for (digest, size) in &layers {
        checked_blob(&proxy, &img, digest, *size).await;
    }
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).expect("manifest JSON");
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .expect("config digest");
    let config_size = manifest["config"]["size"].as_u64().expect("config size");
    checked_blob(&proxy, &img, config_digest, config_size).await;
    proxy.close_image(&img).await.expect("CloseImage");
    proxy
        .finalize()
        .await
        .expect("exit status 0 after Shutdown");
    ImageRead {
        manifest_digest,
        layers,
        diff_ids,
    }
}
