//! Fetch every layer blob of images through an image proxy, with the reference client: the
//! driver of `bench/proxy.sh`.
//!
//! usage: proxy_fetch PROGRAM IMAGE…   (PROGRAM: `skopeo`, or `splitfdstream`; the client adds
//! `experimental-image-proxy`). Prints the bytes read per image on stdout.

use std::process::Command;

use containers_image_proxy::{ImageProxy, ImageProxyConfig};
use tokio::io::AsyncReadExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let program = args.next().ok_or("usage: proxy_fetch PROGRAM IMAGE…")?;
    let mut config = ImageProxyConfig::default();
    config.skopeo_cmd = Some(Command::new(program));
    let proxy = ImageProxy::new_with_config(config).await?;
    for name in args {
        let img = proxy.open_image(&name).await?;
        // Layer infos where the proxy has them (0.2.5); else the manifest's descriptors, which
        // for a containers-storage image committed by buildah are the uncompressed layers.
        let layers: Vec<(String, u64)> = match proxy.get_layer_info(&img).await? {
            Some(infos) => infos
                .into_iter()
                .map(|l| (l.digest.to_string(), l.size))
                .collect(),
            None => {
                let (_, manifest) = proxy.fetch_manifest(&img).await?;
                manifest
                    .layers()
                    .iter()
                    .map(|l| (l.digest().to_string(), l.size()))
                    .collect()
            }
        };
        let mut total = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        for (digest, size) in layers {
            let (mut reader, driver) = proxy.get_blob(&img, &digest.parse()?, size).await?;
            let read = async {
                let mut n = 0u64;
                loop {
                    let k = reader.read(&mut buf).await?;
                    if k == 0 {
                        return Ok::<u64, std::io::Error>(n);
                    }
                    n += k as u64;
                }
            };
            let (n, finished) = tokio::join!(read, driver);
            finished?;
            total += n?;
        }
        println!("{name}: {total} bytes");
        proxy.close_image(&img).await?;
    }
    proxy.finalize().await?;
    Ok(())
}
