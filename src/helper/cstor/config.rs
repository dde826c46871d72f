//! Where a containers-storage store lives: `storage.conf`, the built-in defaults and the
//! `[DRIVER@GRAPHROOT+RUNROOT]` overrides of a source name.
//!
//! Lookup as containers/storage does it: `$CONTAINERS_STORAGE_CONF`, else for root
//! `/etc/containers/storage.conf` (then `/usr/share/containers/storage.conf`), for other users
//! `$XDG_CONFIG_HOME/containers/storage.conf` (`~/.config/...`), whose absence falls back to the
//! system file's `driver` and `rootless_storage_path`. Only the `[storage]` table's `driver`,
//! `graphroot`, `runroot` and `rootless_storage_path` keys are read.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};

use crate::proto::source::Store;

/// The system-wide configuration file.
const SYSTEM_CONF: &str = "/etc/containers/storage.conf";
/// The distribution's default configuration, read when [`SYSTEM_CONF`] is absent.
const VENDOR_CONF: &str = "/usr/share/containers/storage.conf";
/// Graph root of root's store when nothing configures one.
const ROOT_GRAPHROOT: &str = "/var/lib/containers/storage";
/// Run root of root's store when nothing configures one.
const ROOT_RUNROOT: &str = "/run/containers/storage";
/// Largest `storage.conf` read; the real ones are a few KiB of mostly comments.
const MAX_CONF_LEN: u64 = 1 << 20;

/// The process environment that decides where the default store is. Gathered once by the
/// caller, so resolution itself is a pure function that tests can drive.
#[derive(Debug, Clone, Default)]
pub struct StorageEnv {
    /// Effective user id; anything but 0 selects the rootless defaults.
    pub uid: u32,
    /// `$CONTAINERS_STORAGE_CONF`.
    pub conf_override: Option<PathBuf>,
    /// `$HOME`.
    pub home: Option<PathBuf>,
    /// `$XDG_CONFIG_HOME`.
    pub xdg_config_home: Option<PathBuf>,
    /// `$XDG_DATA_HOME`.
    pub xdg_data_home: Option<PathBuf>,
    /// `$XDG_RUNTIME_DIR`.
    pub xdg_runtime_dir: Option<PathBuf>,
}

impl StorageEnv {
    /// Read the variables of the running process.
    ///
    /// Inside a rootless user namespace that podman made (`podman unshare`: it sets
    /// `_CONTAINERS_USERNS_CONFIGURED` and `_CONTAINERS_ROOTLESS_UID`), the process is uid 0
    /// but its store is still the user's: the user's uid picks the defaults, as
    /// containers/storage does there.
    pub fn from_process() -> Self {
        let var = |name| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let rootless_uid = std::env::var_os("_CONTAINERS_USERNS_CONFIGURED")
            .and_then(|_| std::env::var("_CONTAINERS_ROOTLESS_UID").ok())
            .and_then(|u| u.parse::<u32>().ok());
        StorageEnv {
            uid: rootless_uid.unwrap_or_else(|| rustix::process::geteuid().as_raw()),
            conf_override: var("CONTAINERS_STORAGE_CONF"),
            home: var("HOME"),
            xdg_config_home: var("XDG_CONFIG_HOME"),
            xdg_data_home: var("XDG_DATA_HOME"),
            xdg_runtime_dir: var("XDG_RUNTIME_DIR"),
        }
    }
}

/// A resolved store location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreLocation {
    /// Graph driver (always `overlay` once resolved).
    pub driver: String,
    /// Graph root.
    pub graphroot: PathBuf,
    /// Run root.
    pub runroot: PathBuf,
}

/// The keys of `storage.conf`'s `[storage]` table that matter here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StorageConf {
    /// `driver`.
    pub driver: Option<String>,
    /// `graphroot`.
    pub graphroot: Option<String>,
    /// `runroot`.
    pub runroot: Option<String>,
    /// `rootless_storage_path`.
    pub rootless_storage_path: Option<String>,
}

/// Resolve `store` (whose fields override the configuration) to a location.
///
/// # Errors
/// An unreadable or malformed configuration file, a driver other than overlay, or no way to
/// find a rootless user's home.
pub fn resolve(store: &Store, env: &StorageEnv) -> anyhow::Result<StoreLocation> {
    let Store::ContainersStorage {
        driver,
        graphroot,
        runroot,
    } = store
    else {
        bail!("{store} is not a containers-storage store");
    };
    let conf = load_conf(env)?;
    let driver = driver
        .clone()
        .or(conf.driver.clone())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "overlay".to_owned());
    // containers/storage accepts `overlay2` as an alias.
    ensure!(
        driver == "overlay" || driver == "overlay2",
        "storage driver {driver:?} is not supported (only overlay)"
    );
    let graphroot = match graphroot {
        Some(g) => g.clone(),
        None => default_graphroot(&conf, env)?,
    };
    let runroot = match runroot {
        Some(r) => r.clone(),
        None => default_runroot(&conf, env)?,
    };
    Ok(StoreLocation {
        driver: "overlay".to_owned(),
        graphroot,
        runroot,
    })
}

fn default_graphroot(conf: &StorageConf, env: &StorageEnv) -> anyhow::Result<PathBuf> {
    if env.uid == 0 {
        return Ok(conf
            .graphroot
            .as_deref()
            .map_or_else(|| PathBuf::from(ROOT_GRAPHROOT), PathBuf::from));
    }
    if let Some(g) = &conf.graphroot {
        return Ok(PathBuf::from(expand_vars(g, env)));
    }
    if let Some(p) = &conf.rootless_storage_path {
        return Ok(PathBuf::from(expand_vars(p, env)));
    }
    let data = match (&env.xdg_data_home, &env.home) {
        (Some(d), _) => d.clone(),
        (None, Some(h)) => h.join(".local/share"),
        (None, None) => bail!("neither $XDG_DATA_HOME nor $HOME is set: no rootless graph root"),
    };
    Ok(data.join("containers/storage"))
}

fn default_runroot(conf: &StorageConf, env: &StorageEnv) -> anyhow::Result<PathBuf> {
    if env.uid == 0 {
        return Ok(conf
            .runroot
            .as_deref()
            .map_or_else(|| PathBuf::from(ROOT_RUNROOT), PathBuf::from));
    }
    if let Some(r) = &conf.runroot {
        return Ok(PathBuf::from(expand_vars(r, env)));
    }
    let run = env
        .xdg_runtime_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/run/user/{}", env.uid)));
    Ok(run.join("containers"))
}

/// `$HOME` and `$UID` in rootless paths, as containers/storage expands them.
fn expand_vars(s: &str, env: &StorageEnv) -> String {
    let home = env
        .home
        .as_deref()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    s.replace("$HOME", &home)
        .replace("$UID", &env.uid.to_string())
}

fn load_conf(env: &StorageEnv) -> anyhow::Result<StorageConf> {
    if let Some(path) = &env.conf_override {
        // An explicit file must exist: silently using defaults would pick another store.
        return read_conf(path)?.with_context(|| format!("{} does not exist", path.display()));
    }
    let system = || -> anyhow::Result<StorageConf> {
        for path in [SYSTEM_CONF, VENDOR_CONF] {
            if let Some(conf) = read_conf(Path::new(path))? {
                return Ok(conf);
            }
        }
        Ok(StorageConf::default())
    };
    if env.uid == 0 {
        return system();
    }
    let user_conf = env
        .xdg_config_home
        .clone()
        .or_else(|| env.home.as_ref().map(|h| h.join(".config")))
        .map(|c| c.join("containers/storage.conf"));
    if let Some(conf) = user_conf.map(|p| read_conf(&p)).transpose()?.flatten() {
        return Ok(conf);
    }
    // Without a user file, rootless stores take only these two keys from the system file.
    let sys = system()?;
    Ok(StorageConf {
        driver: sys.driver,
        rootless_storage_path: sys.rootless_storage_path,
        ..StorageConf::default()
    })
}

fn read_conf(path: &Path) -> anyhow::Result<Option<StorageConf>> {
    use std::io::Read;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    let mut text = String::new();
    file.take(MAX_CONF_LEN + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("reading {}", path.display()))?;
    ensure!(
        text.len() as u64 <= MAX_CONF_LEN,
        "{} is larger than {MAX_CONF_LEN} bytes",
        path.display()
    );
    parse_storage_conf(&text)
        .with_context(|| format!("parsing {}", path.display()))
        .map(Some)
}

/// Parse the `[storage]` table of a `storage.conf` (TOML). Other tables, and other keys of
/// `[storage]`, are skipped without being interpreted.
///
/// # Errors
/// A key that matters whose value is not a single-line TOML string.
pub fn parse_storage_conf(text: &str) -> anyhow::Result<StorageConf> {
    let mut conf = StorageConf::default();
    let mut in_storage = false;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('[') {
            // `[storage]` only; `[storage.options]` and friends are other tables.
            let header = line.split('#').next().unwrap_or_default().trim();
            in_storage = header
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .is_some_and(|h| h.trim() == "storage");
            continue;
        }
        if !in_storage {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim().trim_matches('"');
        let slot = match key {
            "driver" => &mut conf.driver,
            "graphroot" => &mut conf.graphroot,
            "runroot" => &mut conf.runroot,
            "rootless_storage_path" => &mut conf.rootless_storage_path,
            _ => continue,
        };
        let value = parse_toml_string(value.trim())
            .with_context(|| format!("line {}: value of {key}", i + 1))?;
        *slot = Some(value);
    }
    Ok(conf)
}

/// A TOML basic ("...") or literal ('...') string, optionally followed by a comment.
fn parse_toml_string(s: &str) -> anyhow::Result<String> {
    let mut chars = s.chars();
    let quote = chars.next();
    let mut out = String::new();
    let rest = match quote {
        Some('\'') => {
            let body = chars.as_str();
            let end = body.find('\'').context("unterminated literal string")?;
            out.push_str(&body[..end]);
            &body[end + 1..]
        }
        Some('"') => loop {
            match chars.next().context("unterminated string")? {
                '"' => break chars.as_str(),
                '\\' => match chars.next().context("unterminated escape")? {
                    '"' => out.push('"'),
                    '\\' => out.push('\\'),
                    'n' => out.push('\n'),
                    't' => out.push('\t'),
                    'r' => out.push('\r'),
                    'b' => out.push('\u{8}'),
                    'f' => out.push('\u{c}'),
                    c @ ('u' | 'U') => {
                        let n = if c == 'u' { 4 } else { 8 };
                        let hex: String = chars.by_ref().take(n).collect();
                        let code = u32::from_str_radix(&hex, 16)
                            .ok()
                            .and_then(char::from_u32)
                            .with_context(|| format!("bad escape \\{c}{hex}"))?;
                        out.push(code);
                    }
                    c => bail!("bad escape \\{c}"),
                },
                c => out.push(c),
            }
        },
        _ => bail!("expected a quoted string, found {s:?}"),
    };
    let rest = rest.trim();
    ensure!(
        rest.is_empty() || rest.starts_with('#'),
        "unexpected {rest:?} after the string"
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONF: &str = r#"
# comment with [storage] in it
[storage]
driver = "overlay" # trailing comment
graphroot = '/srv/graph#not-a-comment'
runroot = "/run/\u0063s"
unrelated = [ "a",
  "b" ]

[storage.options]
driver = "vfs"
additionalimagestores = [
  "/x",
]
[storage.options.overlay]
mountopt = "nodev"
"#;

    #[test]
    fn parses_the_storage_table_only() {
        assert_eq!(
            parse_storage_conf(CONF).unwrap(),
            StorageConf {
                driver: Some("overlay".into()),
                graphroot: Some("/srv/graph#not-a-comment".into()),
                runroot: Some("/run/cs".into()),
                rootless_storage_path: None,
            }
        );
        let err = parse_storage_conf("[storage]\ngraphroot = /x\n").unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            "line 2: value of graphroot: expected a quoted string, found \"/x\""
        );
        assert!(parse_storage_conf("[storage]\ndriver = \"x\" y\n").is_err());
    }

    fn write_conf(text: &str) -> tempfile::NamedTempFile {
        use std::io::Write;
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn resolves_with_overrides_and_defaults() {
        let conf = write_conf(CONF);
        let env = StorageEnv {
            uid: 0,
            conf_override: Some(conf.path().to_owned()),
            ..StorageEnv::default()
        };
        let default_store = Store::ContainersStorage {
            driver: None,
            graphroot: None,
            runroot: None,
        };
        assert_eq!(
            resolve(&default_store, &env).unwrap(),
            StoreLocation {
                driver: "overlay".into(),
                graphroot: "/srv/graph#not-a-comment".into(),
                runroot: "/run/cs".into()
            }
        );
        let explicit = Store::ContainersStorage {
            driver: Some("overlay".into()),
            graphroot: Some("/g".into()),
            runroot: Some("/r".into()),
        };
        assert_eq!(resolve(&explicit, &env).unwrap().graphroot, Path::new("/g"));

        let vfs = write_conf("[storage]\ndriver = \"vfs\"\n");
        let env_vfs = StorageEnv {
            conf_override: Some(vfs.path().to_owned()),
            ..env.clone()
        };
        let err = resolve(&default_store, &env_vfs).unwrap_err().to_string();
        assert_eq!(
            err,
            "storage driver \"vfs\" is not supported (only overlay)"
        );

        let empty = write_conf("");
        let rootless = StorageEnv {
            uid: 1000,
            conf_override: Some(empty.path().to_owned()),
            home: Some("/home/u".into()),
            ..StorageEnv::default()
        };
        assert_eq!(
            resolve(&default_store, &rootless).unwrap(),
            StoreLocation {
                driver: "overlay".into(),
                graphroot: "/home/u/.local/share/containers/storage".into(),
                runroot: "/run/user/1000/containers".into()
            }
        );
        let missing = StorageEnv {
            conf_override: Some("/nonexistent/storage.conf".into()),
            ..rootless
        };
        assert!(resolve(&default_store, &missing).is_err());
    }
}
