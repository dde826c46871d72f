//! The configuration files: which are read, in what order, and what they hold (`storage.conf`
//! and its drop-ins as containers/storage's `configfile` package finds and merges them; see the
//! [parent module](super)).

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, ensure};
use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};

use super::StorageEnv;

/// Directory of the distribution's default configuration.
const VENDOR_DIR: &str = "/usr/share/containers";
/// Directory of the administrator's configuration, read before [`VENDOR_DIR`]'s.
const ADMIN_DIR: &str = "/etc/containers";
/// The configuration file's name, and with `.d` its drop-in directory's.
const CONF_NAME: &str = "storage.conf";
/// Drop-in files must end so; others in a drop-in directory are not configuration.
const DROP_IN_SUFFIX: &str = ".conf";
/// Largest configuration file read; the real ones are a few KiB of mostly comments. Bounds the
/// memory a file planted in a drop-in directory can take.
const MAX_CONF_LEN: u64 = 1 << 20;

/// A configuration file to read, and whether it is meant for this user only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ConfFile {
    pub(super) path: PathBuf,
    /// Named by the environment, the user's own, or a rootless drop-in.
    pub(super) for_user: bool,
}

/// The configuration files to read, in order (see the [parent module](super)).
pub(super) fn config_files(env: &StorageEnv) -> anyhow::Result<Vec<ConfFile>> {
    let mut files = Vec::new();
    let must_exist = |path: &Path| -> anyhow::Result<ConfFile> {
        // Silently using the defaults instead would pick another store.
        ensure!(
            path.exists(),
            "{} does not exist (named by the environment)",
            path.display()
        );
        Ok(ConfFile {
            path: path.to_owned(),
            for_user: true,
        })
    };
    if let Some(path) = &env.conf_override {
        files.push(must_exist(path)?);
    } else {
        let vendor = env.system_path(VENDOR_DIR).join(CONF_NAME);
        let admin = env.system_path(ADMIN_DIR).join(CONF_NAME);
        let user = env.user_conf_dir().map(|d| d.join(CONF_NAME));
        // Only the first main file that exists is read.
        for (path, for_user) in [
            (user.as_ref(), true),
            (Some(&admin), false),
            (Some(&vendor), false),
        ] {
            let Some(path) = path else { continue };
            if exists(path)? {
                files.push(ConfFile {
                    path: path.clone(),
                    for_user,
                });
                break;
            }
        }
        files.extend(drop_ins(env, &vendor, &admin, user.as_deref())?);
    }
    if let Some(path) = &env.conf_append {
        files.push(must_exist(path)?);
    }
    Ok(files)
}

/// Does `path` exist? Errors other than its absence are errors.
fn exists(path: &Path) -> anyhow::Result<bool> {
    match std::fs::metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("looking for {}", path.display())),
    }
}

/// The drop-in files, in the order they are read.
fn drop_ins(
    env: &StorageEnv,
    vendor: &Path,
    admin: &Path,
    user: Option<&Path>,
) -> anyhow::Result<Vec<ConfFile>> {
    let mut dirs: Vec<(PathBuf, bool)> = Vec::new();
    for main in [vendor, admin] {
        let stem = main.with_extension("");
        let with = |s: &str| PathBuf::from(format!("{}{s}", stem.display()));
        dirs.push((with(".conf.d"), false));
        if env.uid == 0 {
            dirs.push((with(".rootful.conf.d"), false));
        } else {
            let rootless = with(".rootless.conf.d");
            dirs.push((rootless.clone(), true));
            dirs.push((rootless.join(env.uid.to_string()), true));
        }
    }
    if let Some(user) = user {
        dirs.push((PathBuf::from(format!("{}.d", user.display())), true));
    }
    // By name: a later directory's file hides an earlier one's of the same name.
    let mut by_name: BTreeMap<Vec<u8>, ConfFile> = BTreeMap::new();
    for (dir, for_user) in dirs {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        };
        for entry in entries {
            let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
            let name = entry.file_name();
            let kind = entry
                .file_type()
                .with_context(|| format!("inspecting {}", entry.path().display()))?;
            if kind.is_file() && name.as_encoded_bytes().ends_with(DROP_IN_SUFFIX.as_bytes()) {
                by_name.insert(
                    name.as_encoded_bytes().to_vec(),
                    ConfFile {
                        path: entry.path(),
                        for_user,
                    },
                );
            }
        }
    }
    Ok(by_name.into_values().collect())
}

/// Read and parse one configuration file.
pub(super) fn read_conf(path: &Path) -> anyhow::Result<FileConf> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut data = Vec::new();
    file.take(MAX_CONF_LEN + 1)
        .read_to_end(&mut data)
        .with_context(|| format!("reading {}", path.display()))?;
    ensure!(
        data.len() as u64 <= MAX_CONF_LEN,
        "{} is larger than {MAX_CONF_LEN} bytes",
        path.display()
    );
    let text = String::from_utf8(data).map_err(|e| {
        anyhow::anyhow!(
            "{}: not UTF-8 (byte {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    parse_conf(&text).map_err(|e| anyhow::anyhow!("{}:{e}", path.display()))
}

/// Parse a configuration file's text; the error starts with the line it is about (`LINE: …`).
fn parse_conf(text: &str) -> Result<FileConf, ConfError> {
    toml::from_str(text).map_err(|e| ConfError {
        line: e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1),
        message: e.message().trim_end().to_owned(),
    })
}

/// A configuration file that could not be parsed.
#[derive(Debug)]
struct ConfError {
    line: Option<usize>,
    message: String,
}

impl fmt::Display for ConfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{line}: {}", self.message),
            None => write!(f, " {}", self.message),
        }
    }
}

/// One configuration file: its `[storage]` table.
#[derive(Debug, Default, Deserialize)]
pub(super) struct FileConf {
    #[serde(default)]
    pub(super) storage: StorageTable,
}

/// The keys of `[storage]` read here (`TomlConfig.Storage`).
#[derive(Debug, Default, Deserialize)]
pub(super) struct StorageTable {
    pub(super) driver: Option<String>,
    pub(super) graphroot: Option<String>,
    pub(super) runroot: Option<String>,
    pub(super) imagestore: Option<String>,
    pub(super) rootless_storage_path: Option<String>,
    #[serde(default)]
    pub(super) options: OptionsTable,
}

/// `[storage.options]`: the keys that become driver options (`OptionsConfig`).
#[derive(Debug, Default, Deserialize)]
pub(super) struct OptionsTable {
    pub(super) additionalimagestores: Option<ConfSlice>,
    pub(super) additionallayerstores: Option<ConfSlice>,
    pub(super) size: Option<String>,
    pub(super) mount_program: Option<String>,
    pub(super) skip_mount_home: Option<String>,
    pub(super) ignore_chown_errors: Option<String>,
    /// An integer here (Go's `os.FileMode`), a string in `[storage.options.overlay]`.
    pub(super) force_mask: Option<u32>,
    pub(super) mountopt: Option<String>,
    #[serde(default)]
    pub(super) overlay: OverlayTable,
}

/// `[storage.options.overlay]`.
#[derive(Debug, Default, Deserialize)]
pub(super) struct OverlayTable {
    pub(super) ignore_chown_errors: Option<String>,
    pub(super) mount_program: Option<String>,
    pub(super) mountopt: Option<String>,
    pub(super) size: Option<String>,
    pub(super) inodes: Option<String>,
    pub(super) skip_mount_home: Option<String>,
    pub(super) force_mask: Option<String>,
    pub(super) use_composefs: Option<String>,
    pub(super) sync: Option<String>,
}

/// Replace `to` with `from` when `from` was set.
fn over<T>(to: &mut Option<T>, from: Option<T>) {
    if from.is_some() {
        *to = from;
    }
}

impl StorageTable {
    /// Merge a later file's table over this one.
    pub(super) fn merge(&mut self, next: StorageTable) {
        over(&mut self.driver, next.driver);
        over(&mut self.graphroot, next.graphroot);
        over(&mut self.runroot, next.runroot);
        over(&mut self.imagestore, next.imagestore);
        over(&mut self.rootless_storage_path, next.rootless_storage_path);
        let (o, n) = (&mut self.options, next.options);
        ConfSlice::merge(&mut o.additionalimagestores, n.additionalimagestores);
        ConfSlice::merge(&mut o.additionallayerstores, n.additionallayerstores);
        over(&mut o.size, n.size);
        over(&mut o.mount_program, n.mount_program);
        over(&mut o.skip_mount_home, n.skip_mount_home);
        over(&mut o.ignore_chown_errors, n.ignore_chown_errors);
        over(&mut o.force_mask, n.force_mask);
        over(&mut o.mountopt, n.mountopt);
        let (o, n) = (&mut o.overlay, n.overlay);
        over(&mut o.ignore_chown_errors, n.ignore_chown_errors);
        over(&mut o.mount_program, n.mount_program);
        over(&mut o.mountopt, n.mountopt);
        over(&mut o.size, n.size);
        over(&mut o.inodes, n.inodes);
        over(&mut o.skip_mount_home, n.skip_mount_home);
        over(&mut o.force_mask, n.force_mask);
        over(&mut o.use_composefs, n.use_composefs);
        over(&mut o.sync, n.sync);
    }
}

impl OptionsTable {
    /// The driver options the files give, in containers/storage's order (`LoadStoreOptions`,
    /// then `GetGraphDriverOptions`): a later option of the same key wins.
    pub(super) fn driver_options(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut push = |key: &str, value: &Option<String>| {
            if let Some(v) = value.as_deref().filter(|v| !v.is_empty()) {
                out.push(format!("{key}={v}"));
            }
        };
        for store in self.additionalimagestores.iter().flat_map(|s| &s.values) {
            push("imagestore", &Some(store.clone()));
        }
        for store in self.additionallayerstores.iter().flat_map(|s| &s.values) {
            push("additionallayerstore", &Some(store.clone()));
        }
        push("size", &self.size);
        push("mount_program", &self.mount_program);
        push("skip_mount_home", &self.skip_mount_home);
        push("ignore_chown_errors", &self.ignore_chown_errors);
        push(
            "force_mask",
            &self
                .force_mask
                .filter(|m| *m != 0)
                .map(|m| format!("{m:o}")),
        );
        push("mountopt", &self.mountopt);
        let o = &self.overlay;
        push("overlay.ignore_chown_errors", &o.ignore_chown_errors);
        push("overlay.mount_program", &o.mount_program);
        push("overlay.mountopt", &o.mountopt);
        push("overlay.size", &o.size);
        push("overlay.inodes", &o.inodes);
        push("overlay.skip_mount_home", &o.skip_mount_home);
        push("overlay.force_mask", &o.force_mask);
        push("overlay.use_composefs", &o.use_composefs);
        push("overlay.sync", &o.sync);
        out
    }
}

/// A string array that a later file replaces, or extends when it holds `{append = true}`
/// (containers/storage's `configfile.Slice`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct ConfSlice {
    values: Vec<String>,
    /// The `append` attribute, once given: it stays for the files after (as the Go struct
    /// field that holds it does).
    append: Option<bool>,
}

impl ConfSlice {
    fn merge(to: &mut Option<ConfSlice>, next: Option<ConfSlice>) {
        let Some(next) = next else { return };
        let cur = to.get_or_insert_with(ConfSlice::default);
        if next.append.is_some() {
            cur.append = next.append;
        }
        if cur.append == Some(true) {
            cur.values.extend(next.values);
        } else {
            cur.values = next.values;
        }
    }
}

impl<'de> Deserialize<'de> for ConfSlice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SliceVisitor;
        impl<'de> Visitor<'de> for SliceVisitor {
            type Value = ConfSlice;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of strings, optionally with {append = true}")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ConfSlice, A::Error> {
                let mut out = ConfSlice::default();
                while let Some(item) = seq.next_element::<SliceItem>()? {
                    match item {
                        SliceItem::Value(v) => out.values.push(v),
                        SliceItem::Append(a) => out.append = Some(a),
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_seq(SliceVisitor)
    }
}

/// An element of a [`ConfSlice`]: a string, or the attributes table.
enum SliceItem {
    Value(String),
    Append(bool),
}

impl<'de> Deserialize<'de> for SliceItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ItemVisitor;
        impl<'de> Visitor<'de> for ItemVisitor {
            type Value = SliceItem;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or {append = true}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SliceItem, E> {
                Ok(SliceItem::Value(v.to_owned()))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<SliceItem, A::Error> {
                let mut append = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key != "append" {
                        return Err(de::Error::custom(format!(
                            "unsupported key {key:?} in an array's attributes"
                        )));
                    }
                    append = Some(map.next_value::<bool>()?);
                }
                append
                    .map(SliceItem::Append)
                    .ok_or_else(|| de::Error::custom("an empty attributes table"))
            }
        }
        d.deserialize_any(ItemVisitor)
    }
}
