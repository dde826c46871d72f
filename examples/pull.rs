//! Pull an image into a composefs repository with the library API.
//!
//! ```sh
//! cargo run --example pull -- oci:examples/hello-oci:hello /tmp/repo
//! ```
//!
//! The program is its own helper: `Proxy::spawn` re-executes the current executable with
//! `helper …` arguments, which `main` hands to the library.

use std::path::PathBuf;

use splitfdstream::proto::source::ImageRef;
use splitfdstream::pull::{NoProgress, PullOptions, pull};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("helper") {
        return splitfdstream::helper::serve_stdin_from_args(&args[2..]);
    }
    let [_, source, repo] = args.as_slice() else {
        anyhow::bail!("usage: pull SOURCE REPO");
    };
    let source: ImageRef = source.parse()?;
    let summary = pull(
        &source,
        &PathBuf::from(repo),
        &PullOptions::default(),
        &NoProgress,
    )?;
    println!(
        "{} → tag {:?}, composefs image {:?}",
        summary.image_id, summary.tag, summary.erofs_image
    );
    Ok(())
}
