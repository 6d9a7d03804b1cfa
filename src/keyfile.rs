//! Key files: one line `KIND HEX [ID]`, where KIND is `master`, `operator`
//! or `device`, HEX is the 32-byte key in hex, and ID is the device id (for
//! device keys). Lines starting with `#` are comments. A file holding only
//! 64 hex digits is read as a key of unstated kind.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
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
    /// A bare hex key whose kind the file does not say.
    Raw(Key),
}

impl std::fmt::Debug for KeyFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind())
    }
}

/// Why a key file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file could not be read or created.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        source: io::Error,
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
        why: String,
    },
}

/// Parses 64 hex digits into a key.
pub fn parse_hex_key(hex: &str) -> Result<Key, String> {
    let hex = hex.trim();
    if hex.len() != KEY_LEN * 2 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("a key is {} hex digits", KEY_LEN * 2));
    }
    let mut key = [0u8; KEY_LEN];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    Ok(key)
}

/// Lowercase hex of a key.
pub fn to_hex(key: &Key) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

impl KeyFile {
    /// The kind, as written in the file.
    pub fn kind(&self) -> &'static str {
        match self {
            KeyFile::Master(_) => "master",
            KeyFile::Operator(_) => "operator",
            KeyFile::Device(..) => "device",
            KeyFile::Raw(_) => "raw",
        }
    }

    /// Parses the content of a key file.
    pub fn parse(content: &str) -> Result<KeyFile, String> {
        let line = content
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .ok_or("no key in the file")?;
        let mut words = line.splitn(3, ' ');
        let first = words.next().unwrap_or_default();
        if words.clone().next().is_none() {
            return parse_hex_key(first).map(KeyFile::Raw);
        }
        let key = parse_hex_key(words.next().unwrap_or_default())?;
        let id = words.next().map(str::trim);
        match (first, id) {
            ("master", None) => Ok(KeyFile::Master(key)),
            ("operator", None) => Ok(KeyFile::Operator(key)),
            ("device", Some(id)) if !id.is_empty() => Ok(KeyFile::Device(key, id.to_string())),
            ("device", _) => Err("a device key line ends with the device id".into()),
            (other, _) => Err(format!("unknown key kind '{other}' (master, operator or device)")),
        }
    }

    /// Reads a key file.
    pub fn read(path: &Path) -> Result<KeyFile, KeyFileError> {
        let name = path.display().to_string();
        let content = std::fs::read_to_string(path)
            .map_err(|source| KeyFileError::Io { path: name.clone(), source })?;
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
            KeyFile::Raw(key) => format!("{}\n", to_hex(key)),
        }
    }

    /// Writes the key to a new file with mode 0600; an existing file is never overwritten.
    pub fn write_new(&self, path: &Path) -> Result<(), KeyFileError> {
        let name = path.display().to_string();
        let mut file =
            OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|source| {
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
            KeyFile::Operator(key) | KeyFile::Raw(key) => Some(*key),
            KeyFile::Device(..) => None,
        }
    }
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
        for file in [
            KeyFile::Master(key),
            KeyFile::Operator(key),
            KeyFile::Device(key, "boiler 7".into()),
            KeyFile::Raw(key),
        ] {
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
