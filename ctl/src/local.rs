//! How `pollenctl` finds the controller of a local `pollen up`: the
//! `pollen.json` file that `pollen up` writes into its data directory.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const FILE_NAME: &str = "pollen.json";
pub const DEFAULT_DATA_DIR: &str = "pollen-data";
pub const DEFAULT_CONTROLLER: &str = "http://127.0.0.1:7070";
pub const CONTROLLER_ENV: &str = "POLLEN_CONTROLLER";

/// Contents of `<data-dir>/pollen.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalCluster {
    /// Base URL of the controller's API, `http://ip:port`.
    pub controller: String,
    /// The node's main data address, `ip:port`.
    pub node: String,
    pub node_id: String,
    /// Process id of `pollen up`.
    pub pid: u32,
    /// The file holding the controller's admin token, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
    /// The certificate to trust for an https controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
}

impl LocalCluster {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(FILE_NAME)
    }

    /// Writes the file atomically (a temporary file renamed over it), so a
    /// reader never sees half of it.
    pub fn write(&self, data_dir: &Path) -> io::Result<()> {
        let tmp = data_dir.join(format!(".{FILE_NAME}.{}", std::process::id()));
        let mut text = serde_json::to_string_pretty(self).map_err(io::Error::other)?;
        text.push('\n');
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, Self::path(data_dir)).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }

    /// Reads the file; `Ok(None)` when it does not exist.
    pub fn read(data_dir: &Path) -> io::Result<Option<LocalCluster>> {
        let path = Self::path(data_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))
    }

    /// Removes the file if it is still the one this process wrote.
    pub fn remove_if_ours(data_dir: &Path) {
        if let Ok(Some(c)) = Self::read(data_dir) {
            if c.pid == std::process::id() {
                let _ = std::fs::remove_file(Self::path(data_dir));
            }
        }
    }
}

/// Where a controller URL came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlSource {
    Flag,
    Env,
    File(PathBuf),
    Default,
}

impl std::fmt::Display for UrlSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UrlSource::Flag => f.write_str("--controller"),
            UrlSource::Env => f.write_str(CONTROLLER_ENV),
            UrlSource::File(p) => write!(f, "{}", p.display()),
            UrlSource::Default => f.write_str("the default"),
        }
    }
}

/// The controller URL, in order of preference: the `--controller` flag, the
/// `POLLEN_CONTROLLER` environment variable, `./pollen-data/pollen.json`,
/// then `http://127.0.0.1:7070`. A URL without a scheme gets `http://`.
pub fn resolve_controller(
    flag: Option<&str>,
    env: Option<&str>,
    cwd: &Path,
) -> io::Result<(String, UrlSource)> {
    if let Some(u) = flag.filter(|u| !u.trim().is_empty()) {
        return Ok((normalize_url(u), UrlSource::Flag));
    }
    if let Some(u) = env.filter(|u| !u.trim().is_empty()) {
        return Ok((normalize_url(u), UrlSource::Env));
    }
    let dir = cwd.join(DEFAULT_DATA_DIR);
    if let Some(c) = LocalCluster::read(&dir)? {
        return Ok((normalize_url(&c.controller), UrlSource::File(LocalCluster::path(&dir))));
    }
    Ok((DEFAULT_CONTROLLER.to_string(), UrlSource::Default))
}

/// `127.0.0.1:7070` → `http://127.0.0.1:7070`; trailing slashes dropped.
pub fn normalize_url(u: &str) -> String {
    let u = u.trim().trim_end_matches('/');
    if u.contains("://") {
        u.to_string()
    } else {
        format!("http://{u}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolution_order() {
        let dir = tempfile::tempdir().unwrap();
        let cwd = dir.path();
        let (u, s) = resolve_controller(None, None, cwd).unwrap();
        assert_eq!((u.as_str(), s), (DEFAULT_CONTROLLER, UrlSource::Default));

        let data = cwd.join(DEFAULT_DATA_DIR);
        std::fs::create_dir(&data).unwrap();
        let lc = LocalCluster {
            controller: "http://127.0.0.1:9999".into(),
            node: "127.0.0.1:9000".into(),
            node_id: "node-0".into(),
            pid: 1,
            admin_token_file: None,
            ca_cert: None,
        };
        lc.write(&data).unwrap();
        assert_eq!(LocalCluster::read(&data).unwrap(), Some(lc));
        let (u, s) = resolve_controller(None, None, cwd).unwrap();
        assert_eq!(u, "http://127.0.0.1:9999");
        assert!(matches!(s, UrlSource::File(_)));

        let (u, s) = resolve_controller(None, Some("10.0.0.1:1/"), cwd).unwrap();
        assert_eq!((u.as_str(), s), ("http://10.0.0.1:1", UrlSource::Env));
        let (u, s) = resolve_controller(Some("http://h:2"), Some("x:1"), cwd).unwrap();
        assert_eq!((u.as_str(), s), ("http://h:2", UrlSource::Flag));
    }

    #[test]
    fn corrupt_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join(DEFAULT_DATA_DIR);
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join(FILE_NAME), "{not json").unwrap();
        let e = resolve_controller(None, None, dir.path()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn removes_only_its_own_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut lc = LocalCluster {
            controller: "http://127.0.0.1:1".into(),
            node: "127.0.0.1:2".into(),
            node_id: "n".into(),
            pid: std::process::id().wrapping_add(1),
            admin_token_file: None,
            ca_cert: None,
        };
        lc.write(dir.path()).unwrap();
        LocalCluster::remove_if_ours(dir.path());
        assert!(LocalCluster::path(dir.path()).exists());
        lc.pid = std::process::id();
        lc.write(dir.path()).unwrap();
        LocalCluster::remove_if_ours(dir.path());
        assert!(!LocalCluster::path(dir.path()).exists());
    }
}
