//! Pull an image into a composefs repository with the library API.
//!
//! ```sh
//! cargo run --example pull -- oci:examples/hello-oci:hello /tmp/repo --insecure
//! ```
//!
//! (`--insecure` creates the repository without fs-verity, which `/tmp` rarely has.)
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
    let (source, repo, insecure) = match args.as_slice() {
        [_, source, repo] => (source, repo, false),
        [_, source, repo, flag] if flag == "--insecure" => (source, repo, true),
        _ => anyhow::bail!("usage: pull SOURCE REPO [--insecure]"),
    };
    let source: ImageRef = source.parse()?;
    let opts = PullOptions {
        insecure,
        ..PullOptions::default()
    };
    let summary = pull(&source, &PathBuf::from(repo), &opts, &NoProgress)?;
    println!(
        "{} → tag {:?}, composefs image {:?}",
        summary.image_id, summary.tag, summary.erofs_image
    );
    Ok(())
}
