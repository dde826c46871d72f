//! Where a containers-storage store lives, and which other stores its images may come from:
//! `storage.conf` and its drop-ins, the environment, the built-in defaults, and the
//! `[DRIVER@GRAPHROOT+RUNROOT]` overrides of a source name.
//!
//! This follows containers/storage as it now lives in container-libs (`storage/pkg/configfile`,
//! `storage/types/options.go`, `storage/store.go` `GetStore`, and the overlay driver's
//! `parseOptions`).
//!
//! # Files
//!
//! - `$CONTAINERS_STORAGE_CONF`, when set: that file alone (it must exist), and no drop-ins.
//! - Otherwise the first that exists of the user's `$XDG_CONFIG_HOME/containers/storage.conf`
//!   (`$HOME/.config/…`; root has one too), `/etc/containers/storage.conf` and
//!   `/usr/share/containers/storage.conf`, then the drop-ins: the regular files (symlinks are
//!   skipped) named `*.conf` of, in order, `/usr/share/containers/storage.conf.d/`, then beside
//!   it `storage.rootful.conf.d/` for uid 0 or `storage.rootless.conf.d/` and
//!   `storage.rootless.conf.d/UID/` for other uids, the same three under `/etc/containers/`, and
//!   the user's `storage.conf.d/`. A name in a later directory hides the same name in an earlier
//!   one; the files are read in the byte order of their names.
//! - Last, `$CONTAINERS_STORAGE_CONF_OVERRIDE`, when set (it must exist).
//!
//! Each file is merged over the ones before it: a key it sets replaces the value so far, except
//! an array holding `{append = true}`, which extends it (and, as in containers/storage, the
//! arrays of later files extend it too unless they say `{append = false}`). Keys not read here
//! are ignored, as containers/storage ignores keys it does not know; a file that is not TOML,
//! or a key read here with a value of the wrong type, is an error naming the file and line.
//!
//! # Keys
//!
//! `[storage]` `driver` (`$STORAGE_DRIVER` wins; only overlay is served), `graphroot`,
//! `runroot`, `imagestore`, `rootless_storage_path`; `[storage.options]`
//! `additionalimagestores` and the options that become overlay driver options
//! (`mount_program`, `force_mask`, `mountopt`, …, and those of `[storage.options.overlay]`).
//! `$STORAGE_OPTS`, when set even to nothing, replaces all the driver options the files gave,
//! as a comma-separated list of `[overlay.]KEY=VALUE` (`imagestore=DIR` and
//! `additionalimagestore=DIR` name additional image stores). Paths in `graphroot`, `runroot` and
//! `rootless_storage_path` have `$UID` and then every `$VAR`/`${VAR}` expanded.
//!
//! A graph root is `graphroot`, else for a uid other than 0 `rootless_storage_path`, else
//! `/var/lib/containers/storage` for uid 0 and `$XDG_DATA_HOME/containers/storage`
//! (`~/.local/share/…`) for others; a run root is `runroot`, else `/run/containers/storage`, or
//! `$XDG_RUNTIME_DIR/containers` (`/run/user/UID` when it is the user's, else
//! `$TMPDIR/storage-run-UID`).
//!
//! One deliberate difference: for a uid other than 0, the location keys (`graphroot`, `runroot`,
//! `imagestore`) count only from files meant for that user — `$CONTAINERS_STORAGE_CONF` and its
//! `_OVERRIDE`, the user's own `storage.conf` and `storage.conf.d/`, and the
//! `storage.rootless.conf.d/` drop-ins. containers/storage since its 2026 rewrite takes them
//! from any file, but before it a rootless user never used the system file's graph root, and
//! distributions still ship `/usr/share/containers/storage.conf` with root's `graphroot` and
//! `runroot` set; the rewrite's own advice for a rootless-wide graph root is a
//! `storage.rootless.conf.d/` drop-in, which is honoured.
//!
//! # A graph root in the source name
//!
//! `containers-storage:[DRIVER@GRAPHROOT+RUNROOT]REF` is a store of its own: containers/image
//! passes `GetStore` only the driver, roots and options written there, and `GetStore` then uses
//! nothing of the configuration but the default of a root left out. So such a store has no
//! additional image stores, no image store and no driver options, whatever the files and
//! `$STORAGE_OPTS` say (though a malformed file is still an error, as there).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, bail, ensure};

use crate::proto::source::Store;

mod files;

use files::{StorageTable, config_files, read_conf};

/// Graph root of root's store when nothing configures one.
const ROOT_GRAPHROOT: &str = "/var/lib/containers/storage";
/// Run root of root's store when nothing configures one.
const ROOT_RUNROOT: &str = "/run/containers/storage";
/// The only graph driver served; `overlay2` is containers/storage's alias of it.
const OVERLAY: &str = "overlay";
/// Drivers whose options may appear (`DRIVER.KEY=VALUE`); an option naming any other is an
/// error, as in containers/storage.
const KNOWN_DRIVERS: [&str; 5] = ["overlay", "overlay2", "btrfs", "zfs", "vfs"];
/// Overlay driver options that do not change how a layer is read: accepted and ignored.
const IGNORED_OVERLAY_OPTIONS: [&str; 10] = [
    "override_kernel_check",
    "mountopt",
    "size",
    "inodes",
    "additionallayerstore",
    "use_composefs",
    "skip_mount_home",
    "ignore_chown_errors",
    "sync",
    "metacopy",
];

/// The process environment that decides where the default store is. Gathered once by the
/// caller, so resolution itself is a function of this and the configuration files that tests
/// can drive.
#[derive(Debug, Clone, Default)]
pub struct StorageEnv {
    /// Effective user id; anything but 0 selects the rootless defaults and drop-ins.
    pub uid: u32,
    /// `$CONTAINERS_STORAGE_CONF`: the one configuration file.
    pub conf_override: Option<PathBuf>,
    /// `$CONTAINERS_STORAGE_CONF_OVERRIDE`: a file read after all others.
    pub conf_append: Option<PathBuf>,
    /// `$STORAGE_DRIVER`.
    pub storage_driver: Option<String>,
    /// `$STORAGE_OPTS`, when set (set to nothing still clears the files' driver options).
    pub storage_opts: Option<String>,
    /// `$HOME`, or the user's home directory in `/etc/passwd`.
    pub home: Option<PathBuf>,
    /// `$XDG_CONFIG_HOME`.
    pub xdg_config_home: Option<PathBuf>,
    /// `$XDG_DATA_HOME`.
    pub xdg_data_home: Option<PathBuf>,
    /// `$XDG_RUNTIME_DIR`.
    pub xdg_runtime_dir: Option<PathBuf>,
    /// `$TMPDIR`.
    pub tmpdir: Option<PathBuf>,
    /// Every variable of the environment, for `$VAR` in configured paths.
    pub vars: BTreeMap<String, String>,
    /// Prefixed to the built-in system paths (`/etc/containers`, `/usr/share/containers`), as
    /// containers/storage's `RootForImplicitAbsolutePaths`; `None` in real use.
    pub system_root: Option<PathBuf>,
}

impl StorageEnv {
    /// Read the variables of the running process.
    ///
    /// Inside a rootless user namespace that podman made (`podman unshare`: it sets
    /// `_CONTAINERS_USERNS_CONFIGURED` and `_CONTAINERS_ROOTLESS_UID`), or that
    /// [`crate::client::Proxy`] made for a rootless helper, the process is uid 0 but its store is
    /// still the user's: the user's uid picks the defaults, as containers/storage does there.
    pub fn from_process() -> Self {
        let var = |name| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let rootless_uid = std::env::var_os("_CONTAINERS_USERNS_CONFIGURED")
            .and_then(|_| std::env::var("_CONTAINERS_ROOTLESS_UID").ok())
            .and_then(|u| u.parse::<u32>().ok());
        let uid = rootless_uid.unwrap_or_else(|| rustix::process::geteuid().as_raw());
        StorageEnv {
            uid,
            conf_override: var("CONTAINERS_STORAGE_CONF"),
            conf_append: var("CONTAINERS_STORAGE_CONF_OVERRIDE"),
            storage_driver: std::env::var("STORAGE_DRIVER")
                .ok()
                .filter(|d| !d.is_empty()),
            storage_opts: std::env::var_os("STORAGE_OPTS")
                .map(|o| o.to_string_lossy().into_owned()),
            home: var("HOME").or_else(|| passwd_home(uid)),
            xdg_config_home: var("XDG_CONFIG_HOME"),
            xdg_data_home: var("XDG_DATA_HOME"),
            xdg_runtime_dir: var("XDG_RUNTIME_DIR"),
            tmpdir: var("TMPDIR"),
            vars: std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect(),
            system_root: None,
        }
    }

    /// A built-in system path, below [`system_root`](Self::system_root) when set.
    fn system_path(&self, path: &str) -> PathBuf {
        match &self.system_root {
            Some(root) => root.join(path.trim_start_matches('/')),
            None => PathBuf::from(path),
        }
    }

    /// The user's configuration directory, `$XDG_CONFIG_HOME/containers` or
    /// `$HOME/.config/containers`.
    fn user_conf_dir(&self) -> Option<PathBuf> {
        self.xdg_config_home
            .clone()
            .or_else(|| self.home.as_ref().map(|h| h.join(".config")))
            .map(|c| c.join("containers"))
    }

    fn lookup(&self, name: &str) -> String {
        match (name, &self.home) {
            ("HOME", Some(home)) => home.to_string_lossy().into_owned(),
            _ => self.vars.get(name).cloned().unwrap_or_default(),
        }
    }
}

/// The home directory of `uid` in `/etc/passwd`, as Go's `user.LookupId` finds it when `$HOME`
/// is not set (a service, `env -i`).
fn passwd_home(uid: u32) -> Option<PathBuf> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() >= 6 && fields[2].parse() == Ok(uid) && !fields[5].is_empty())
            .then(|| PathBuf::from(fields[5]))
    })
}

/// A resolved store: where it is, and where else its images may come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreLocation {
    /// Graph driver (always `overlay` once resolved).
    pub driver: String,
    /// Graph root: the primary layer store (layers, tar-split files, diff dirs) and, without an
    /// [`imagestore`](Self::imagestore), the primary image store.
    pub graphroot: PathBuf,
    /// Run root.
    pub runroot: PathBuf,
    /// `imagestore`: where images and their layers' diff dirs go instead of the graph root;
    /// the graph root's images are still found after its own, as containers/storage mounts it
    /// as an additional image store.
    pub imagestore: Option<PathBuf>,
    /// Additional read-only image stores, searched in this order after the primary store.
    pub additional_image_stores: Vec<PathBuf>,
    /// The overlay `force_mask` (the mode bits on disk; the real ones are in the
    /// `user.containers.override_stat` xattr). It changes nothing about how bodies are found:
    /// their tar headers come from tar-split.
    pub force_mask: Option<u32>,
    /// The overlay `mount_program` (e.g. fuse-overlayfs), when one is set. Layers are read from
    /// their diff dirs, never through a mount, so it changes nothing here either.
    pub mount_program: Option<PathBuf>,
    /// The configuration files read, in order.
    pub config_files: Vec<PathBuf>,
}

impl StoreLocation {
    /// Every directory images or layers are read from: the graph root, the image store, then the
    /// additional image stores.
    pub fn roots(&self) -> impl Iterator<Item = &Path> {
        std::iter::once(self.graphroot.as_path())
            .chain(self.imagestore.as_deref())
            .chain(self.additional_image_stores.iter().map(PathBuf::as_path))
    }
}

/// Resolve `store` to a location: from the configuration and the environment, or, when it
/// names a driver or a root itself, from those (see the [module docs](self)).
///
/// # Errors
/// A configuration file that is unreadable, malformed (with its name and line) or missing when
/// named by `$CONTAINERS_STORAGE_CONF`; a driver other than overlay; an invalid driver option;
/// a relative path; no way to find a rootless user's home.
pub fn resolve(store: &Store, env: &StorageEnv) -> anyhow::Result<StoreLocation> {
    let Store::ContainersStorage {
        driver,
        graphroot,
        runroot,
    } = store
    else {
        bail!("{store} is not a containers-storage store");
    };
    let defaults = load_defaults(env)?;
    if driver.is_none() && graphroot.is_none() && runroot.is_none() {
        let driver = check_driver(defaults.driver.as_deref().unwrap_or_default())?;
        let options = parse_driver_options(&defaults.driver_options).with_context(|| match &env
            .storage_opts
        {
            Some(_) => "in $STORAGE_OPTS".to_owned(),
            None => format!(
                "in the storage options of {}",
                describe_files(&defaults.files)
            ),
        })?;
        let additional_image_stores = options
            .image_stores
            .into_iter()
            .filter(|s| *s != defaults.graphroot && Some(s) != defaults.imagestore.as_ref())
            .fold(Vec::new(), |mut stores, s| {
                if !stores.contains(&s) {
                    stores.push(s);
                }
                stores
            });
        return Ok(StoreLocation {
            driver,
            graphroot: defaults.graphroot,
            runroot: defaults.runroot,
            imagestore: defaults.imagestore,
            additional_image_stores,
            force_mask: options.force_mask,
            mount_program: options.mount_program,
            config_files: defaults.files,
        });
    }
    // `GetStore` with explicit options: nothing of the configuration but a missing root.
    let driver = check_driver(driver.as_deref().unwrap_or_default())?;
    Ok(StoreLocation {
        driver,
        graphroot: graphroot.clone().unwrap_or(defaults.graphroot),
        runroot: runroot.clone().unwrap_or(defaults.runroot),
        imagestore: None,
        additional_image_stores: Vec::new(),
        force_mask: None,
        mount_program: None,
        config_files: defaults.files,
    })
}

fn check_driver(driver: &str) -> anyhow::Result<String> {
    // No driver at all: containers/storage would pick one from what the graph root holds;
    // overlay is the one served.
    ensure!(
        matches!(driver, "" | "overlay" | "overlay2"),
        "storage driver {driver:?} is not supported (only overlay)"
    );
    Ok(OVERLAY.to_owned())
}

fn describe_files(files: &[PathBuf]) -> String {
    match files {
        [] => "the built-in defaults".to_owned(),
        files => files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// The default store as the files and the environment give it (`LoadStoreOptions`).
#[derive(Debug)]
struct Defaults {
    /// The driver named, if any (`$STORAGE_DRIVER`, else `driver`).
    driver: Option<String>,
    graphroot: PathBuf,
    runroot: PathBuf,
    imagestore: Option<PathBuf>,
    /// Driver options, unparsed, as containers/storage hands them to the driver.
    driver_options: Vec<String>,
    files: Vec<PathBuf>,
}

fn load_defaults(env: &StorageEnv) -> anyhow::Result<Defaults> {
    let files = config_files(env)?;
    let mut conf = StorageTable::default();
    for file in &files {
        let mut next = read_conf(&file.path)?;
        if env.uid != 0 && !file.for_user {
            // See the module docs: where a rootless user's store is comes only from files
            // meant for that user.
            next.storage.graphroot = None;
            next.storage.runroot = None;
            next.storage.imagestore = None;
        }
        conf.merge(next.storage);
    }
    let files: Vec<PathBuf> = files.into_iter().map(|f| f.path).collect();
    let source = || describe_files(&files);
    let nonempty = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());

    let driver = env
        .storage_driver
        .clone()
        .or_else(|| nonempty(&conf.driver));
    let mut driver_options = match &env.storage_opts {
        Some(opts) => opts.split(',').map(str::to_owned).collect(),
        None => conf.options.driver_options(),
    };
    if driver_options.len() == 1 && driver_options[0].is_empty() {
        driver_options.clear();
    }

    let absolute = |key: &str, value: &str| -> anyhow::Result<PathBuf> {
        let path = clean_path(value);
        ensure!(
            path.is_absolute(),
            "{key} {value:?} (from {}) is not an absolute path",
            source()
        );
        Ok(path)
    };
    let runroot = match nonempty(&conf.runroot) {
        Some(r) => absolute("runroot", &expand_path(&r, env))?,
        None if env.uid == 0 => PathBuf::from(ROOT_RUNROOT),
        None => rootless_runtime_dir(env).join("containers"),
    };
    let graphroot = match (
        nonempty(&conf.graphroot),
        nonempty(&conf.rootless_storage_path),
    ) {
        (Some(g), _) => absolute("graphroot", &expand_path(&g, env))?,
        (None, Some(p)) if env.uid != 0 => {
            absolute("rootless_storage_path", &expand_path(&p, env))?
        }
        _ if env.uid == 0 => PathBuf::from(ROOT_GRAPHROOT),
        _ => {
            let data = match (&env.xdg_data_home, &env.home) {
                (Some(d), _) => d.clone(),
                (None, Some(h)) => h.join(".local/share"),
                (None, None) => {
                    bail!("neither $XDG_DATA_HOME nor $HOME is set: no rootless graph root")
                }
            };
            data.join("containers/storage")
        }
    };
    let imagestore = match nonempty(&conf.imagestore) {
        Some(i) => Some(absolute("imagestore", &i)?),
        None => None,
    };
    ensure!(
        imagestore.as_ref() != Some(&graphroot),
        "imagestore {} (from {}) must be unset or differ from graphroot",
        graphroot.display(),
        source()
    );
    Ok(Defaults {
        driver,
        graphroot,
        runroot,
        imagestore,
        driver_options,
        files,
    })
}

/// `XDG_RUNTIME_DIR`, else `/run/user/UID` when it is the user's own directory that only the
/// user may write, else `$TMPDIR/storage-run-UID` (containers/storage's `GetRuntimeDir`).
fn rootless_runtime_dir(env: &StorageEnv) -> PathBuf {
    if let Some(dir) = &env.xdg_runtime_dir {
        return dir.clone();
    }
    let run_user = PathBuf::from(format!("/run/user/{}", env.uid));
    let usable = std::fs::symlink_metadata(&run_user)
        .is_ok_and(|m| m.is_dir() && m.uid() == env.uid && m.mode() & 0o022 == 0);
    if usable {
        return run_user;
    }
    env.tmpdir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join(format!("storage-run-{}", env.uid))
}

/// What the overlay driver options change about reading a store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverlayOptions {
    /// Additional image stores (`imagestore=`, `additionalimagestore=`), in order.
    pub image_stores: Vec<PathBuf>,
    /// `force_mask`, as mode bits.
    pub force_mask: Option<u32>,
    /// `mount_program`, when set to a program.
    pub mount_program: Option<PathBuf>,
}

/// Parse driver options as the overlay driver does (`parseOptions`): each `[DRIVER.]KEY=VALUE`,
/// the key's case ignored; options of other drivers are skipped; `imagestore` and
/// `additionalimagestore` take comma-separated absolute directories.
///
/// # Errors
/// An option without `=`, naming an unknown driver or an unknown overlay key, a relative image
/// store, or a `force_mask` that is neither `shared`, `private` nor octal.
pub fn parse_driver_options(options: &[String]) -> anyhow::Result<OverlayOptions> {
    let mut out = OverlayOptions::default();
    for option in options {
        let Some((key, value)) = option.split_once('=') else {
            bail!("storage option {option:?} is not KEY=VALUE");
        };
        let (key, value) = (key.trim().to_ascii_lowercase(), value.trim());
        let (driver, name) = key.split_once('.').unwrap_or(("", &key));
        if !driver.is_empty() {
            ensure!(
                KNOWN_DRIVERS.contains(&driver),
                "unknown driver {driver:?} in storage option {option:?}"
            );
            if driver != "overlay" && driver != "overlay2" {
                continue;
            }
        }
        match name {
            "imagestore" | "additionalimagestore" => {
                if value.is_empty() {
                    continue;
                }
                for store in value.split(',') {
                    let path = clean_path(store);
                    ensure!(
                        path.is_absolute(),
                        "image store {store:?} in storage option {option:?} is not an absolute \
                         path"
                    );
                    out.image_stores.push(path);
                }
            }
            "force_mask" => {
                let mask = match value {
                    "shared" => 0o755,
                    "private" => 0o700,
                    octal => u32::from_str_radix(octal, 8)
                        .ok()
                        .filter(|m| *m <= 0o7777)
                        .with_context(|| {
                            format!(
                                "force_mask {octal:?} is neither shared, private nor an octal mode"
                            )
                        })?,
                };
                out.force_mask = Some(mask);
            }
            "mount_program" => {
                out.mount_program = Some(value).filter(|v| !v.is_empty()).map(PathBuf::from)
            }
            known if IGNORED_OVERLAY_OPTIONS.contains(&known) => {}
            unknown => bail!("unknown overlay option {unknown:?} in storage option {option:?}"),
        }
    }
    Ok(out)
}

/// `$UID` and then every `$VAR` and `${VAR}` (unset: empty) in a configured path, as
/// containers/storage's `expandEnvPath` with Go's `os.ExpandEnv`.
fn expand_path(s: &str, env: &StorageEnv) -> String {
    let s = s.replace("$UID", &env.uid.to_string());
    let is_special = |b: u8| b"*#$@!?-".contains(&b) || b.is_ascii_digit();
    let is_name = |b: u8| b == b'_' || b.is_ascii_alphanumeric();
    let bytes = s.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    let mut start = 0;
    while i < bytes.len() {
        if bytes[i] != b'$' || i + 1 == bytes.len() {
            i += 1;
            continue;
        }
        out.push_str(&s[start..i]);
        let rest = &s[i + 1..];
        let rb = rest.as_bytes();
        // (name, bytes consumed after the '$')
        let (name, used) = if rb[0] == b'{' {
            if rb.len() > 2 && is_special(rb[1]) && rb[2] == b'}' {
                (&rest[1..2], 3)
            } else {
                match rest[1..].find('}') {
                    Some(0) => ("", 2),
                    Some(end) => (&rest[1..=end], end + 2),
                    None => ("", 1),
                }
            }
        } else if is_special(rb[0]) {
            (&rest[..1], 1)
        } else {
            let n = rb.iter().take_while(|&&b| is_name(b)).count();
            (&rest[..n], n)
        };
        match (name.is_empty(), used) {
            // Bad syntax (`${}`, an unclosed `${`): the characters are dropped.
            (true, 1..) => {}
            // A `$` not followed by a name stays.
            (true, 0) => out.push('$'),
            _ => out.push_str(&env.lookup(name)),
        }
        i += 1 + used;
        start = i;
    }
    out.push_str(&s[start..]);
    out
}

/// Go's `filepath.Clean`: drop empty and `.` components, fold `..` lexically.
fn clean_path(s: &str) -> PathBuf {
    let path = Path::new(s);
    let mut parts: Vec<Component<'_>> = Vec::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => match parts.last() {
                Some(Component::Normal(_)) => {
                    parts.pop();
                }
                Some(Component::RootDir) => {}
                _ => parts.push(c),
            },
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        return PathBuf::from(".");
    }
    parts.iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cstor(graphroot: Option<&str>) -> Store {
        Store::ContainersStorage {
            driver: None,
            graphroot: graphroot.map(PathBuf::from),
            runroot: None,
        }
    }

    /// A fake system: `root/usr/share/containers`, `root/etc/containers`, and a user config
    /// directory `root/home/.config/containers`.
    struct System {
        root: tempfile::TempDir,
    }

    impl System {
        fn new() -> Self {
            System {
                root: tempfile::TempDir::new().unwrap(),
            }
        }

        fn write(&self, rel: &str, text: &str) -> PathBuf {
            let path = self.root.path().join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, text).unwrap();
            path
        }

        fn path(&self, rel: &str) -> PathBuf {
            self.root.path().join(rel)
        }

        fn env(&self, uid: u32) -> StorageEnv {
            StorageEnv {
                uid,
                home: Some(self.path("home")),
                xdg_runtime_dir: Some(PathBuf::from("/run/user/test")),
                system_root: Some(self.root.path().to_owned()),
                ..StorageEnv::default()
            }
        }
    }

    #[test]
    fn built_in_defaults() {
        let sys = System::new();
        let root = resolve(&cstor(None), &sys.env(0)).unwrap();
        assert_eq!(
            root,
            StoreLocation {
                driver: "overlay".into(),
                graphroot: ROOT_GRAPHROOT.into(),
                runroot: ROOT_RUNROOT.into(),
                imagestore: None,
                additional_image_stores: vec![],
                force_mask: None,
                mount_program: None,
                config_files: vec![],
            }
        );
        let mut env = sys.env(4242);
        let user = resolve(&cstor(None), &env).unwrap();
        assert_eq!(
            user.graphroot,
            sys.path("home/.local/share/containers/storage")
        );
        assert_eq!(user.runroot, Path::new("/run/user/test/containers"));
        env.xdg_data_home = Some("/data".into());
        env.xdg_runtime_dir = None;
        env.tmpdir = Some("/scratch".into());
        let user = resolve(&cstor(None), &env).unwrap();
        assert_eq!(user.graphroot, Path::new("/data/containers/storage"));
        // No /run/user/4242 of that uid here: the temporary directory.
        assert_eq!(
            user.runroot,
            Path::new("/scratch/storage-run-4242/containers")
        );
        env.home = None;
        env.xdg_data_home = None;
        assert!(resolve(&cstor(None), &env).is_err());
    }

    #[test]
    fn main_file_then_drop_ins_in_name_order() {
        let sys = System::new();
        let vendor = sys.write(
            "usr/share/containers/storage.conf",
            "[storage]\ngraphroot = \"/vendor\"\nrunroot = \"/vendor-run\"\n",
        );
        // The first main file that exists is the only one read.
        assert_eq!(
            resolve(&cstor(None), &sys.env(0)).unwrap().graphroot,
            Path::new("/vendor")
        );
        let admin = sys.write(
            "etc/containers/storage.conf",
            "[storage]\ngraphroot = \"/admin\"\n",
        );
        let loc = resolve(&cstor(None), &sys.env(0)).unwrap();
        assert_eq!(loc.graphroot, Path::new("/admin"));
        assert_eq!(
            loc.runroot,
            Path::new(ROOT_RUNROOT),
            "{vendor:?} is not read"
        );
        assert_eq!(loc.config_files, vec![admin.clone()]);

        let d = "usr/share/containers/storage.conf.d";
        sys.write(
            &format!("{d}/10-a.conf"),
            "[storage]\ngraphroot = \"/10-vendor\"\n",
        );
        sys.write(
            &format!("{d}/90-z.conf"),
            "[storage]\nrunroot = \"/90-vendor\"\n",
        );
        // The same name under /etc hides the vendor's.
        let a10 = sys.write(
            "etc/containers/storage.conf.d/10-a.conf",
            "[storage]\ngraphroot = \"/10-admin\"\n[storage.options]\n\
             additionalimagestores = [\"/s1\"]\n",
        );
        let b20 = sys.write(
            "etc/containers/storage.rootful.conf.d/20-b.conf",
            "[storage.options]\nadditionalimagestores = [\"/s2\", {append = true}]\n",
        );
        sys.write(
            "etc/containers/storage.rootless.conf.d/30-c.conf",
            "[storage]\ngraphroot = \"/rootless-only\"\n",
        );
        let u50 = sys.write(
            "home/.config/containers/storage.conf.d/50-u.conf",
            "[storage.options]\nadditionalimagestores = [\"/s3\"]\n",
        );
        // Neither a symlink nor a file without the suffix is a drop-in.
        std::os::unix::fs::symlink(&u50, sys.path(&format!("{d}/60-link.conf"))).unwrap();
        sys.write(&format!("{d}/70-x.conf.bak"), "[storage]\ngraphroot = 5\n");
        let loc = resolve(&cstor(None), &sys.env(0)).unwrap();
        assert_eq!(loc.graphroot, Path::new("/10-admin"));
        assert_eq!(loc.runroot, Path::new("/90-vendor"));
        // `append` sticks for the files after, as in containers/storage.
        assert_eq!(
            loc.additional_image_stores,
            ["/s1", "/s2", "/s3"].map(PathBuf::from)
        );
        assert_eq!(
            loc.config_files,
            vec![admin, a10, b20, u50, sys.path(&format!("{d}/90-z.conf"))]
        );

        // A user file is the main file, for root too.
        sys.write(
            "home/.config/containers/storage.conf",
            "[storage]\ngraphroot = \"/user\"\n",
        );
        let loc = resolve(&cstor(None), &sys.env(0)).unwrap();
        assert_eq!(
            loc.config_files[0],
            sys.path("home/.config/containers/storage.conf")
        );
        assert_eq!(loc.graphroot, Path::new("/10-admin"), "drop-ins come after");
    }

    #[test]
    fn rootless_takes_its_location_only_from_its_own_files() {
        let sys = System::new();
        sys.write(
            "usr/share/containers/storage.conf",
            "[storage]\ndriver = \"overlay\"\ngraphroot = \"/var/lib/containers/storage\"\n\
             runroot = \"/run/containers/storage\"\n\
             rootless_storage_path = \"$HOME/rl/$UID/${USER}\"\n",
        );
        let mut env = sys.env(1000);
        env.vars.insert("USER".into(), "alice".into());
        let loc = resolve(&cstor(None), &env).unwrap();
        assert_eq!(loc.graphroot, sys.path("home/rl/1000/alice"));
        assert_eq!(loc.runroot, Path::new("/run/user/test/containers"));
        // The rootless drop-ins, the uid's own after the shared ones.
        sys.write(
            "etc/containers/storage.rootless.conf.d/10.conf",
            "[storage]\ngraphroot = \"/rootless\"\n",
        );
        sys.write(
            "etc/containers/storage.rootless.conf.d/1000/20.conf",
            "[storage]\nrunroot = \"/run-1000\"\n",
        );
        sys.write(
            "etc/containers/storage.rootful.conf.d/30.conf",
            "[storage]\ngraphroot = \"/rootful\"\n",
        );
        let loc = resolve(&cstor(None), &env).unwrap();
        assert_eq!(loc.graphroot, Path::new("/rootless"));
        assert_eq!(loc.runroot, Path::new("/run-1000"));
        // The user's own file wins over the system's main file entirely.
        sys.write(
            "home/.config/containers/storage.conf",
            "[storage]\ngraphroot = \"$HOME/mine\"\n",
        );
        let loc = resolve(&cstor(None), &env).unwrap();
        assert_eq!(loc.graphroot, Path::new("/rootless"), "drop-ins after it");
        std::fs::remove_dir_all(sys.path("etc/containers/storage.rootless.conf.d")).unwrap();
        let loc = resolve(&cstor(None), &env).unwrap();
        assert_eq!(loc.graphroot, sys.path("home/mine"));
        // Root reads the user's file too, then its own drop-ins.
        let loc = resolve(&cstor(None), &sys.env(0)).unwrap();
        assert_eq!(loc.graphroot, Path::new("/rootful"));
        std::fs::remove_dir_all(sys.path("etc/containers/storage.rootful.conf.d")).unwrap();
        let loc = resolve(&cstor(None), &sys.env(0)).unwrap();
        assert_eq!(loc.graphroot, sys.path("home/mine"));
    }

    #[test]
    fn environment_overrides() {
        let sys = System::new();
        sys.write(
            "etc/containers/storage.conf",
            "[storage]\ngraphroot = \"/admin\"\n[storage.options]\n\
             additionalimagestores = [\"/conf-store\"]\n",
        );
        sys.write(
            "etc/containers/storage.conf.d/10.conf",
            "[storage]\nrunroot = \"/drop-in\"\n",
        );
        let only = sys.write("only.conf", "[storage]\ngraphroot = \"/only\"\n");
        let last = sys.write("last.conf", "[storage]\nrunroot = \"/last\"\n");
        let mut env = sys.env(0);
        env.conf_override = Some(only.clone());
        env.conf_append = Some(last.clone());
        let loc = resolve(&cstor(None), &env).unwrap();
        assert_eq!(loc.graphroot, Path::new("/only"));
        assert_eq!(loc.runroot, Path::new("/last"));
        assert_eq!(loc.additional_image_stores, Vec::<PathBuf>::new());
        assert_eq!(loc.config_files, vec![only, last]);
        env.conf_append = Some(sys.path("missing.conf"));
        let err = resolve(&cstor(None), &env).unwrap_err().to_string();
        assert!(err.contains("missing.conf does not exist"), "{err}");

        let mut env = sys.env(0);
        assert_eq!(
            resolve(&cstor(None), &env).unwrap().additional_image_stores,
            [PathBuf::from("/conf-store")]
        );
        // $STORAGE_OPTS replaces the files' driver options, even when empty.
        env.storage_opts = Some("overlay.imagestore=/a,additionalimagestore=/b/./c/".into());
        assert_eq!(
            resolve(&cstor(None), &env).unwrap().additional_image_stores,
            ["/a", "/b/c"].map(PathBuf::from)
        );
        env.storage_opts = Some(String::new());
        assert!(
            resolve(&cstor(None), &env)
                .unwrap()
                .additional_image_stores
                .is_empty()
        );
        // A store named twice, or naming the graph root, is searched once, as the primary.
        env.storage_opts = Some("imagestore=/x,imagestore=/admin,imagestore=/x".into());
        assert_eq!(
            resolve(&cstor(None), &env).unwrap().additional_image_stores,
            [PathBuf::from("/x")]
        );
        env.storage_opts = Some("imagestore=/a,/b".into());
        let err = format!("{:#}", resolve(&cstor(None), &env).unwrap_err());
        assert_eq!(
            err,
            "in $STORAGE_OPTS: storage option \"/b\" is not KEY=VALUE"
        );

        env.storage_opts = None;
        env.storage_driver = Some("vfs".into());
        let err = resolve(&cstor(None), &env).unwrap_err().to_string();
        assert_eq!(
            err,
            "storage driver \"vfs\" is not supported (only overlay)"
        );
        env.storage_driver = Some("overlay2".into());
        assert_eq!(resolve(&cstor(None), &env).unwrap().driver, "overlay");
    }

    #[test]
    fn an_explicit_graph_root_takes_nothing_but_missing_roots() {
        let sys = System::new();
        sys.write(
            "etc/containers/storage.conf",
            "[storage]\ndriver = \"vfs\"\nrunroot = \"/conf-run\"\n[storage.options]\n\
             additionalimagestores = [\"/conf-store\"]\n\
             [storage.options.overlay]\nforce_mask = \"shared\"\n",
        );
        let mut env = sys.env(0);
        env.storage_opts = Some("imagestore=/env-store".into());
        let loc = resolve(&cstor(Some("/g")), &env).unwrap();
        assert_eq!(
            loc,
            StoreLocation {
                driver: "overlay".into(),
                graphroot: "/g".into(),
                runroot: "/conf-run".into(),
                imagestore: None,
                additional_image_stores: vec![],
                force_mask: None,
                mount_program: None,
                config_files: vec![sys.path("etc/containers/storage.conf")],
            }
        );
        // A malformed file is an error all the same.
        sys.write("etc/containers/storage.conf.d/bad.conf", "[storage\n");
        assert!(resolve(&cstor(Some("/g")), &env).is_err());
    }

    #[test]
    fn driver_options_as_the_overlay_driver_reads_them() {
        let opts =
            |s: &[&str]| parse_driver_options(&s.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            opts(&[
                " OVERLAY.ImageStore = /a ",
                "overlay2.additionalimagestore=/b,/c",
                "vfs.imagestore=/skipped",
                "imagestore=",
                "force_mask=shared",
                "overlay.force_mask=0750",
                "mount_program=/usr/bin/fuse-overlayfs",
                "mountopt=nodev",
                "btrfs.min_space=1G",
            ])
            .unwrap(),
            OverlayOptions {
                image_stores: ["/a", "/b", "/c"].map(PathBuf::from).to_vec(),
                force_mask: Some(0o750),
                mount_program: Some("/usr/bin/fuse-overlayfs".into()),
            }
        );
        assert_eq!(
            opts(&["force_mask=private"]).unwrap().force_mask,
            Some(0o700)
        );
        for (bad, want) in [
            (&["nokey"][..], "is not KEY=VALUE"),
            (&["foo.imagestore=/a"], "unknown driver \"foo\""),
            (&["additionalimagestores=/a"], "unknown overlay option"),
            (&["imagestore=rel/dir"], "is not an absolute path"),
            (&["imagestore=/a,"], "is not an absolute path"),
            (
                &["force_mask=everyone"],
                "neither shared, private nor an octal mode",
            ),
        ] {
            let err = format!("{:#}", opts(bad).unwrap_err());
            assert!(err.contains(want), "{bad:?}: {err}");
        }
    }

    #[test]
    fn storage_options_from_the_files() {
        let sys = System::new();
        sys.write(
            "etc/containers/storage.conf",
            "[storage]\nimagestore = \"/images\"\n[storage.options]\nforce_mask = 0o700\n\
             mount_program = \"/bin/a\"\nunknown_key = { anything = 1 }\n\
             [storage.options.overlay]\nmount_program = \"/bin/b\"\n\
             [storage.options.vfs]\nignore_chown_errors = \"true\"\n[unrelated]\nx = 1\n",
        );
        let loc = resolve(&cstor(None), &sys.env(0)).unwrap();
        assert_eq!(loc.imagestore, Some(PathBuf::from("/images")));
        assert_eq!(loc.force_mask, Some(0o700));
        assert_eq!(loc.mount_program, Some(PathBuf::from("/bin/b")));
        assert_eq!(
            loc.roots().collect::<Vec<_>>(),
            [Path::new(ROOT_GRAPHROOT), Path::new("/images")]
        );
        sys.write(
            "etc/containers/storage.conf",
            "[storage]\nimagestore = \"/var/lib/containers/storage\"\n",
        );
        assert!(resolve(&cstor(None), &sys.env(0)).is_err());
    }

    #[test]
    fn malformed_files_name_their_line() {
        let sys = System::new();
        let bad = sys.write(
            "etc/containers/storage.conf",
            "# a comment\n[storage]\ndriver = \"overlay\"\ngraphroot = /x\n",
        );
        let mut env = sys.env(0);
        let err = format!("{:#}", resolve(&cstor(None), &env).unwrap_err());
        assert!(err.starts_with(&format!("{}:4: ", bad.display())), "{err}");
        for (text, line) in [
            ("[storage]\n\ndriver = 5\n", 3),
            (
                "[storage.options]\nadditionalimagestores = [\n  \"/a\",\n  1,\n]\n",
                4,
            ),
            (
                "[storage.options]\nadditionalimagestores = [{append = 1}]\n",
                2,
            ),
            ("[storage.options]\nforce_mask = \"0755\"\n", 2),
            ("[storage]\ndriver = \"a\"\ndriver = \"b\"\n", 3),
        ] {
            let f = sys.write("x.conf", text);
            env.conf_override = Some(f.clone());
            let err = format!("{:#}", resolve(&cstor(None), &env).unwrap_err());
            assert!(
                err.starts_with(&format!("{}:{line}: ", f.display())),
                "{text:?}: {err}"
            );
        }
    }

    #[test]
    fn paths_expand_as_go_expands_them() {
        let mut env = StorageEnv {
            uid: 7,
            home: Some("/h".into()),
            ..StorageEnv::default()
        };
        env.vars.insert("A".into(), "x".into());
        for (input, want) in [
            ("$HOME/$UID/$A/${A}y/$Ay", "/h/7/x/xy/"),
            ("/a$", "/a$"),
            ("/a/${}/b", "/a//b"),
            ("/a/${A", "/a/A"),
            ("/$/x", "/$/x"),
            ("/$1/$?", "//"),
        ] {
            assert_eq!(expand_path(input, &env), want, "{input}");
        }
        assert_eq!(clean_path("/a/./b//../c/"), Path::new("/a/c"));
        assert_eq!(clean_path("/.."), Path::new("/"));
        assert_eq!(clean_path("a/../.."), Path::new(".."));
        assert_eq!(clean_path(""), Path::new("."));
    }
}
