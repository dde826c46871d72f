//! Image source names: `containers-storage:[DRIVER@GRAPHROOT+RUNROOT]REF` and `oci:DIR[:TAG]`.
//!
//! A source splits into the **store** (which the helper is started for, `--store`) and the
//! **reference** inside it (sent with `OpenImage`). A helper serves exactly one store.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// A store a helper can serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Store {
    /// containers-storage; `None` fields come from `storage.conf` or the built-in defaults.
    ContainersStorage {
        /// Graph driver (only `overlay` is supported).
        driver: Option<String>,
        /// Graph root.
        graphroot: Option<PathBuf>,
        /// Run root.
        runroot: Option<PathBuf>,
    },
    /// An OCI image layout directory.
    OciLayout {
        /// The layout's directory.
        dir: PathBuf,
    },
}

/// A parsed SOURCE argument: a store and a reference within it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Where the image lives.
    pub store: Store,
    /// Image reference inside the store (may be empty for an OCI layout with one image).
    pub reference: String,
}

/// A SOURCE that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image source {source_arg:?}: {reason}")]
pub struct SourceError {
    /// The argument as given.
    pub source_arg: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl FromStr for ImageRef {
    type Err = SourceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| SourceError {
            source_arg: s.to_owned(),
            reason,
        };
        if s.contains('\0') {
            return Err(err("contains a NUL byte"));
        }
        if let Some(rest) = s.strip_prefix("containers-storage:") {
            let (store, reference) = match rest.strip_prefix('[') {
                Some(inner) => {
                    let (spec, reference) = inner
                        .split_once(']')
                        .ok_or_else(|| err("unterminated '['"))?;
                    (
                        parse_cstor_spec(spec)
                            .ok_or_else(|| err("bad [DRIVER@GRAPHROOT+RUNROOT]"))?,
                        reference,
                    )
                }
                None => (
                    Store::ContainersStorage {
                        driver: None,
                        graphroot: None,
                        runroot: None,
                    },
                    rest,
                ),
            };
            if reference.is_empty() {
                return Err(err("no image reference"));
            }
            return Ok(ImageRef {
                store,
                reference: reference.to_owned(),
            });
        }
        if let Some(rest) = s.strip_prefix("oci:") {
            // The tag follows the last ':' unless that ':' is part of the directory (a '/' after it).
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((dir, tag)) if !tag.contains('/') && !dir.is_empty() => (dir, tag),
                _ => (rest, ""),
            };
            if dir.is_empty() {
                return Err(err("no OCI layout directory"));
            }
            return Ok(ImageRef {
                store: Store::OciLayout {
                    dir: PathBuf::from(dir),
                },
                reference: tag.to_owned(),
            });
        }
        Err(err("expected containers-storage: or oci:"))
    }
}

/// Parse `DRIVER@GRAPHROOT+RUNROOT` (driver and runroot optional, as in containers/image).
fn parse_cstor_spec(spec: &str) -> Option<Store> {
    let (driver, roots) = match spec.split_once('@') {
        Some((d, r)) => (Some(d.to_owned()).filter(|d| !d.is_empty()), r),
        None => (None, spec),
    };
    let (graphroot, runroot) = match roots.split_once('+') {
        Some((g, r)) => (g, Some(r)),
        None => (roots, None),
    };
    if graphroot.is_empty() || !graphroot.starts_with('/') {
        return None;
    }
    let runroot = runroot.filter(|r| !r.is_empty());
    if runroot.is_some_and(|r| !r.starts_with('/')) {
        return None;
    }
    Some(Store::ContainersStorage {
        driver,
        graphroot: Some(PathBuf::from(graphroot)),
        runroot: runroot.map(PathBuf::from),
    })
}

impl Store {
    /// Parse the helper's `--store` argument (the [`Display`](fmt::Display) form).
    pub fn parse_arg(s: &str) -> Result<Store, SourceError> {
        let err = |reason| SourceError {
            source_arg: s.to_owned(),
            reason,
        };
        if s == "containers-storage:" {
            return Ok(Store::ContainersStorage {
                driver: None,
                graphroot: None,
                runroot: None,
            });
        }
        if let Some(inner) = s
            .strip_prefix("containers-storage:[")
            .and_then(|r| r.strip_suffix(']'))
        {
            return parse_cstor_spec(inner).ok_or_else(|| err("bad [DRIVER@GRAPHROOT+RUNROOT]"));
        }
        if let Some(dir) = s.strip_prefix("oci:") {
            if dir.is_empty() || s.contains('\0') {
                return Err(err("no OCI layout directory"));
            }
            return Ok(Store::OciLayout {
                dir: PathBuf::from(dir),
            });
        }
        Err(err("expected containers-storage: or oci:"))
    }
}

impl fmt::Display for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Store::ContainersStorage {
                driver,
                graphroot,
                runroot,
            } => {
                f.write_str("containers-storage:")?;
                if let Some(g) = graphroot {
                    f.write_str("[")?;
                    if let Some(d) = driver {
                        write!(f, "{d}@")?;
                    }
                    write!(f, "{}", g.display())?;
                    if let Some(r) = runroot {
                        write!(f, "+{}", r.display())?;
                    }
                    f.write_str("]")?;
                }
                Ok(())
            }
            Store::OciLayout { dir } => write!(f, "oci:{}", dir.display()),
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.store {
            Store::OciLayout { .. } if self.reference.is_empty() => write!(f, "{}", self.store),
            Store::OciLayout { .. } => write!(f, "{}:{}", self.store, self.reference),
            Store::ContainersStorage { .. } => write!(f, "{}{}", self.store, self.reference),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_sources() {
        for (s, store) in [
            (
                "containers-storage:[overlay@/g+/r]foo:1",
                "containers-storage:[overlay@/g+/r]",
            ),
            ("containers-storage:[/g]foo", "containers-storage:[/g]"),
            ("containers-storage:busybox", "containers-storage:"),
            ("oci:/tmp/x:latest", "oci:/tmp/x"),
            ("oci:rel/dir", "oci:rel/dir"),
        ] {
            let r: ImageRef = s.parse().unwrap();
            assert_eq!(r.to_string(), s);
            assert_eq!(r.store.to_string(), store);
            assert_eq!(Store::parse_arg(store).unwrap(), r.store);
        }
        for bad in [
            "docker://x",
            "containers-storage:",
            "containers-storage:[g]x",
            "oci:",
            "containers-storage:[/g",
        ] {
            assert!(bad.parse::<ImageRef>().is_err(), "{bad}");
        }
    }
}
