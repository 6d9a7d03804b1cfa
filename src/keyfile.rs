//! Key files: one line `KIND HEX [ID]`, where KIND is `master`, `operator`
//! or `device`, HEX is the 32-byte key in hex, and ID is the device id (for
//! device keys, the rest of the line). Blank lines and lines starting with
//! `#` are ignored; the first other line is the key. A bare key without its
//! kind is refused, so a file always says what it holds.
//!
//! Key files must not be readable or writable by others, nor writable by
//! their group: as ssh does with private keys, reading one that is refuses
//! it, and says how to fix it (`chmod 600`). Group read is allowed only for
//! the process's own group, as for a Kubernetes Secret mounted with
//! `fsGroup` (mode 0440, group = the pod's group).

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::Path;

use crate::auth::{self, KEY_LEN, Key};

/// What a key file holds.
#[derive(Clone, PartialEq, Eq)]
pub enum KeyFile {
    /// The server's master secret.
    Master(Key),
    /// The operator key, derived from the master.
    Operator(Key),
    /// One device's key, and the id it belongs to.
    Device(Key, String),
}

impl std::fmt::Debug for KeyFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind())
    }
}

/// Why a key file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file could not be read or created (the cause follows as the source).
    #[error("{path}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        source: io::Error,
    },
    /// The file is readable or writable by group or others.
    #[error(
        "{path}: permissions {mode:04o} are too open: a key file must be readable by its owner only; run `chmod 600 {path}`"
    )]
    TooOpen {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The file exists and `keygen` does not overwrite keys.
    #[error("{0} already exists; refusing to overwrite a key")]
    Exists(String),
    /// The content is not a key file.
    #[error("{path}: {why}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        why: ParseError,
    },
}

/// Why a key file's content, or a hex key, is not a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// Only blank lines and comments.
    #[error("no key in the file")]
    NoKey,
    /// A bare hex key, without `master`, `operator` or `device` before it.
    #[error(
        "the key's kind is missing: write `master`, `operator` or `device` and a space before the hex (a device key is followed by its id)"
    )]
    KindMissing,
    /// The line is not `KIND HEX [ID]`.
    #[error("expected a line `KIND HEX [ID]` (KIND: master, operator or device)")]
    NotAKeyLine,
    /// A kind other than the three.
    #[error("unknown key kind '{0}' (master, operator or device)")]
    UnknownKind(String),
    /// The key is not 64 hex digits.
    #[error("a key is {} hex digits", KEY_LEN * 2)]
    BadHex,
    /// A device key without its id.
    #[error("a device key line ends with the device id")]
    DeviceWithoutId,
    /// Something after a master or operator key.
    #[error("a {0} key line holds only `{0}` and the key; something follows the key")]
    TrailingText(&'static str),
}

/// Parses 64 hex digits into a key.
pub fn parse_hex_key(hex: &str) -> Result<Key, ParseError> {
    let bytes = crate::hex::decode(hex.trim()).map_err(|_| ParseError::BadHex)?;
    Key::try_from(bytes.as_slice()).map_err(|_| ParseError::BadHex)
}

/// Lowercase hex of a key.
pub fn to_hex(key: &Key) -> String {
    crate::hex::encode(key)
}

impl KeyFile {
    /// The kind, as written in the file.
    pub fn kind(&self) -> &'static str {
        match self {
            KeyFile::Master(_) => "master",
            KeyFile::Operator(_) => "operator",
            KeyFile::Device(..) => "device",
        }
    }

    /// The kind with its article, for messages: "a master key", "an operator key".
    pub fn kind_phrase(&self) -> &'static str {
        match self {
            KeyFile::Master(_) => "a master key",
            KeyFile::Operator(_) => "an operator key",
            KeyFile::Device(..) => "a device key",
        }
    }

    /// Parses the content of a key file.
    pub fn parse(content: &str) -> Result<KeyFile, ParseError> {
        let line = content
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .ok_or(ParseError::NoKey)?;
        let mut words = line.splitn(3, ' ');
        let first = words.next().unwrap_or_default();
        let Some(hex) = words.next() else {
            if parse_hex_key(first).is_ok() {
                return Err(ParseError::KindMissing);
            }
            return Err(ParseError::NotAKeyLine);
        };
        let key = |hex| parse_hex_key(hex);
        let rest = words.next().map(str::trim).filter(|rest| !rest.is_empty());
        match (first, rest) {
            ("master", None) => Ok(KeyFile::Master(key(hex)?)),
            ("operator", None) => Ok(KeyFile::Operator(key(hex)?)),
            ("device", Some(id)) => Ok(KeyFile::Device(key(hex)?, id.to_string())),
            ("device", None) => Err(ParseError::DeviceWithoutId),
            ("master", Some(_)) => Err(ParseError::TrailingText("master")),
            ("operator", Some(_)) => Err(ParseError::TrailingText("operator")),
            (other, _) => Err(ParseError::UnknownKind(other.to_string())),
        }
    }

    /// Reads a key file; refuses one that group or others may read or write.
    pub fn read(path: &Path) -> Result<KeyFile, KeyFileError> {
        let name = path.display().to_string();
        let io_error = |source| KeyFileError::Io { path: name.clone(), source };
        let meta = std::fs::metadata(path).map_err(io_error)?;
        if let Some(mode) = too_open(&meta) {
            return Err(KeyFileError::TooOpen { path: name, mode });
        }
        let content = std::fs::read_to_string(path).map_err(io_error)?;
        KeyFile::parse(&content).map_err(|why| KeyFileError::Invalid { path: name, why })
    }

    /// The file's content.
    pub fn render(&self) -> String {
        match self {
            KeyFile::Master(key) => format!(
                "# presence master secret: keep it on the server only (mode 0600)\nmaster {}\n",
                to_hex(key)
            ),
            KeyFile::Operator(key) => {
                format!("# presence operator key: signs status queries\noperator {}\n", to_hex(key))
            }
            KeyFile::Device(key, id) => {
                format!("# presence key of one device\ndevice {} {id}\n", to_hex(key))
            }
        }
    }

    /// Writes the key to a new file with mode 0600; an existing file is
    /// never overwritten. A missing parent directory is created, mode 0700.
    pub fn write_new(&self, path: &Path) -> Result<(), KeyFileError> {
        let name = path.display().to_string();
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty() && !dir.exists()) {
            private_dir(std::fs::DirBuilder::new().recursive(true))
                .create(dir)
                .map_err(|source| KeyFileError::Io { path: dir.display().to_string(), source })?;
        }
        let mut file =
            private_file(OpenOptions::new().write(true).create_new(true)).open(path).map_err(|source| {
                if source.kind() == io::ErrorKind::AlreadyExists {
                    KeyFileError::Exists(name.clone())
                } else {
                    KeyFileError::Io { path: name.clone(), source }
                }
            })?;
        file.write_all(self.render().as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|source| KeyFileError::Io { path: name, source })
    }

    /// The operator key this file gives: its own, or the one derived from a master.
    pub fn operator_key(&self) -> Option<Key> {
        match self {
            KeyFile::Master(master) => Some(auth::operator_key(master)),
            KeyFile::Operator(key) => Some(*key),
            KeyFile::Device(..) => None,
        }
    }
}

/// The permission bits of a key file that others may read or write, or its
/// group write (group read is fine for the process's own group); `None`
/// when the file is private enough. On non-unix systems modes are not
/// checked (their ACLs are the operator's to set).
#[cfg(unix)]
fn too_open(meta: &std::fs::Metadata) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let mode = meta.mode() & 0o7777;
    let own_group = meta.gid() == rustix::process::getegid().as_raw();
    let group_read_only = mode & 0o070 == 0o040 && own_group;
    (mode & 0o007 != 0 || (mode & 0o070 != 0 && !group_read_only)).then_some(mode)
}

#[cfg(not(unix))]
fn too_open(_: &std::fs::Metadata) -> Option<u32> {
    None
}

/// Directories for keys and state are created readable by their owner only (0700 on unix).
pub(crate) fn private_dir(builder: &mut std::fs::DirBuilder) -> &mut std::fs::DirBuilder {
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(builder, 0o700);
    builder
}

/// Files for keys and state are created readable by their owner only (0600 on unix).
pub(crate) fn private_file(options: &mut OpenOptions) -> &mut OpenOptions {
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(options, 0o600);
    options
}

/// A new random master secret from the operating system.
pub fn generate_master() -> io::Result<Key> {
    let mut key = [0u8; KEY_LEN];
    getrandom::fill(&mut key).map_err(|e| io::Error::other(e.to_string()))?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_kind() {
        let key = [0xab; KEY_LEN];
        for file in [KeyFile::Master(key), KeyFile::Operator(key), KeyFile::Device(key, "boiler 7".into())] {
            assert_eq!(KeyFile::parse(&file.render()), Ok(file));
        }
    }

    #[test]
    fn rejects_what_is_not_a_key() {
        for bad in ["", "# only a comment", "master 00", "device abab", "nonsense 00", &"zz".repeat(32)] {
            assert!(KeyFile::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_bare_key_must_say_its_kind() {
        let why = KeyFile::parse(&"ab".repeat(32)).unwrap_err();
        assert_eq!(why, ParseError::KindMissing);
        let why = why.to_string();
        assert!(why.contains("kind is missing") && why.contains("master"), "{why}");
    }

    #[test]
    fn trailing_text_after_a_master_key_is_named_as_such() {
        let why = KeyFile::parse(&format!("master {} extra", "ab".repeat(32))).unwrap_err().to_string();
        assert!(why.contains("something follows the key"), "{why}");
        assert!(!why.contains("unknown key kind"), "{why}");
        assert!(KeyFile::parse(&format!("master {}  ", "ab".repeat(32))).is_ok(), "trailing spaces are fine");
    }

    #[test]
    fn a_key_file_open_to_others_is_refused_with_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        KeyFile::Master([7; KEY_LEN]).write_new(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = KeyFile::read(&path).unwrap_err().to_string();
        assert!(error.contains("0644") && error.contains("chmod 600"), "{error}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(KeyFile::read(&path).is_ok());
    }

    #[test]
    fn group_read_is_allowed_only_for_the_process_s_own_group() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        KeyFile::Master([7; KEY_LEN]).write_new(&path).unwrap();
        let mode = |m| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(m)).unwrap();
        // A Kubernetes Secret mounted with fsGroup: 0440, group = ours.
        mode(0o440);
        assert!(KeyFile::read(&path).is_ok());
        mode(0o460);
        assert!(matches!(KeyFile::read(&path), Err(KeyFileError::TooOpen { .. })), "group-writable");
        mode(0o444);
        assert!(matches!(KeyFile::read(&path), Err(KeyFileError::TooOpen { .. })), "readable by others");
        // Readable by a group this process is not in (only root can give a
        // file away to another group; CI runs as root).
        mode(0o440);
        let other_gid = rustix::process::getegid().as_raw().wrapping_add(4242);
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(&path, None, Some(other_gid)).unwrap();
            assert!(matches!(KeyFile::read(&path), Err(KeyFileError::TooOpen { .. })), "another group");
        } else {
            eprintln!("not root: the other-group case is checked only when run as root");
        }
    }

    #[test]
    fn a_missing_file_names_the_os_error_once() {
        let error = KeyFile::read(Path::new("/nonexistent/master.key")).unwrap_err();
        let chain = format!("{:#}", anyhow::Error::from(error));
        assert_eq!(chain.matches("os error 2").count(), 1, "{chain}");
    }

    #[test]
    fn write_new_creates_a_private_directory() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etc/presence/master.key");
        KeyFile::Master([7; KEY_LEN]).write_new(&path).unwrap();
        let mode = std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn writes_mode_0600_and_never_overwrites() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let file = KeyFile::Master(generate_master().unwrap());
        file.write_new(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(matches!(KeyFile::Master([0; KEY_LEN]).write_new(&path), Err(KeyFileError::Exists(_))));
        assert_eq!(KeyFile::read(&path).unwrap(), file);
    }
}
