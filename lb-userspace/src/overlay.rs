//! Changes made from the CLI (`weir backend add|remove|weight|drain|enable|disable`, `weir
//! announce withdraw|resume`), kept in `[agent] state_file` so they survive agent restarts
//! and reloads.
//!
//! The config file stays the base; the overlay is applied on top of it, per service and
//! backend address: an added backend (with its weight), a removed one, a weight, an admin
//! state. The file is written atomically (temporary file, fsync, rename).

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write as _},
    net::IpAddr,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::config::{BackendConfig, ServiceConfig};

/// Administrative state of a backend, set from the CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Admin {
    #[default]
    Enabled,
    /// No new flows; flows already tracked to it stay.
    Draining,
    /// No new flows; tracked flows are re-picked.
    Disabled,
}

/// What the CLI changed about one backend of one service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendOverride {
    /// Added from the CLI (not in the config file, or re-added after a removal).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub added: bool,
    /// Removed from the CLI.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<Admin>,
    /// `weir backend max-conns`: the backend's `max_connections` (0: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
}

/// The state file's contents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overlay {
    /// Service name -> backend address -> changes.
    #[serde(default)]
    pub services: BTreeMap<String, BTreeMap<IpAddr, BackendOverride>>,
    /// `weir announce withdraw` is in force: no VIP is announced until `weir announce
    /// resume`, across restarts (a balancer drained for maintenance stays drained).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub announce_withdrawn: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("reading state file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "state file {path} is not valid ({reason}); fix or remove it (it holds changes made with `weir backend ...`)"
    )]
    Invalid { path: PathBuf, reason: String },
    #[error("writing state file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A backend of a service after the overlay: where it comes from does not matter any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EffectiveBackend {
    pub address: IpAddr,
    pub weight: u32,
    pub admin: Admin,
    /// From the config file; backends added from the CLI are primaries.
    pub backup: bool,
    /// From the config file (`nat`); backends added from the CLI listen on the service's
    /// port.
    pub port: Option<u16>,
    /// Active connections at which it takes no new flow (0: no limit): the CLI's, else the
    /// config file's; backends added from the CLI start at the service's default.
    pub max_connections: u32,
}

impl Overlay {
    /// Reads the state file; a missing file is an empty overlay.
    pub fn load(path: &Path) -> Result<Self, OverlayError> {
        match fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| OverlayError::Invalid {
                path: path.to_owned(),
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(OverlayError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Writes the state file atomically: a reader sees the old or the new file, never half.
    pub fn save(&self, path: &Path) -> Result<(), OverlayError> {
        let err = |source| OverlayError::Write {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(err)?;
        }
        // A temporary name of this process's own, created exclusively: the save never
        // truncates a file someone else made. Mode 0600: the overlay names backends and
        // their states, as private as the API socket and the pins.
        let name = path
            .file_name()
            .map_or_else(|| "state".into(), |n| n.to_string_lossy().into_owned());
        let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
        let mut text = serde_json::to_vec_pretty(self).map_err(|e| err(io::Error::other(e)))?;
        text.push(b'\n');
        let written = (|| {
            let open = || {
                fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)
            };
            let mut file = match open() {
                // A temporary of this name is an earlier save's of ours that died (the
                // same pid, as PID 1 in a container): remove it and try once more.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    fs::remove_file(&tmp)?;
                    open()?
                }
                other => other?,
            };
            file.write_all(&text)?;
            file.sync_all()
        })();
        if let Err(e) = written {
            if e.kind() != io::ErrorKind::AlreadyExists {
                let _ = fs::remove_file(&tmp);
            }
            return Err(err(e));
        }
        fs::rename(&tmp, path).map_err(err)
    }

    /// The override of one backend, created empty if needed.
    pub fn entry(&mut self, service: &str, address: IpAddr) -> &mut BackendOverride {
        self.services
            .entry(service.to_owned())
            .or_default()
            .entry(address)
            .or_default()
    }

    /// The backends of `service` once the overlay is applied, in config order then in
    /// address order for CLI additions.
    #[must_use]
    pub fn effective(&self, service: &ServiceConfig) -> Vec<EffectiveBackend> {
        let empty = BTreeMap::new();
        let changes = self.services.get(&service.name).unwrap_or(&empty);
        let mut out: Vec<EffectiveBackend> = service
            .backends
            .iter()
            .map(|b: &BackendConfig| EffectiveBackend {
                address: b.address,
                weight: b.weight,
                admin: Admin::Enabled,
                backup: b.backup,
                port: b.port,
                max_connections: b.max_connections,
            })
            .collect();
        for (address, change) in changes {
            if change.added && !out.iter().any(|b| b.address == *address) {
                out.push(EffectiveBackend {
                    address: *address,
                    weight: 1,
                    admin: Admin::Enabled,
                    backup: false,
                    port: None,
                    max_connections: service.max_connections,
                });
            }
        }
        out.retain(|b| !changes.get(&b.address).is_some_and(|c| c.removed));
        for backend in &mut out {
            if let Some(change) = changes.get(&backend.address) {
                if let Some(weight) = change.weight {
                    backend.weight = weight;
                }
                if let Some(admin) = change.admin {
                    backend.admin = admin;
                }
                if let Some(max) = change.max_connections {
                    backend.max_connections = max;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    use crate::config;

    fn web() -> ServiceConfig {
        let text = "[agent]\ninterface = \"eth0\"\ntunnel_source = \"198.51.100.1\"\n\
                    [[service]]\nname = \"web\"\nvip = \"203.0.113.10\"\nport = 80\nprotocol = \"tcp\"\n\
                    [[service.backend]]\naddress = \"198.51.100.11\"\n\
                    [[service.backend]]\naddress = \"198.51.100.12\"\nweight = 2\n";
        config::parse(text, Path::new("t.toml"))
            .unwrap()
            .services
            .remove(0)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn overlay_adds_removes_reweights_and_sets_admin() {
        let svc = web();
        let mut o = Overlay::default();
        assert_eq!(o.effective(&svc).len(), 2);
        o.entry("web", ip("198.51.100.13")).added = true;
        o.entry("web", ip("198.51.100.13")).weight = Some(5);
        o.entry("web", ip("198.51.100.11")).removed = true;
        o.entry("web", ip("198.51.100.12")).admin = Some(Admin::Draining);
        let eff = o.effective(&svc);
        assert_eq!(
            eff,
            vec![
                EffectiveBackend {
                    address: ip("198.51.100.12"),
                    weight: 2,
                    admin: Admin::Draining,
                    backup: false,
                    port: None,
                    max_connections: 0,
                },
                EffectiveBackend {
                    address: ip("198.51.100.13"),
                    weight: 5,
                    admin: Admin::Enabled,
                    backup: false,
                    port: None,
                    max_connections: 0,
                },
            ]
        );
    }

    #[test]
    fn save_is_atomic_and_round_trips() {
        let dir = std::env::temp_dir().join(format!("weir-overlay-{}", std::process::id()));
        let path = dir.join("state.json");
        let mut o = Overlay::default();
        o.entry("web", ip("2001:db8::11")).weight = Some(3);
        o.save(&path).unwrap();
        assert_eq!(Overlay::load(&path).unwrap(), o);
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != "state.json")
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the state file is private: {mode:o}");
        fs::write(&path, "{\"services\": 3}").unwrap();
        let err = Overlay::load(&path).unwrap_err().to_string();
        assert!(err.contains("not valid"), "{err}");
        assert_eq!(
            Overlay::load(&dir.join("missing.json")).unwrap(),
            Overlay::default()
        );
        // `weir announce withdraw` survives a restart; a file from before it still loads.
        o.announce_withdrawn = true;
        o.save(&path).unwrap();
        assert!(Overlay::load(&path).unwrap().announce_withdrawn);
        fs::write(&path, "{\"services\": {}}").unwrap();
        assert!(!Overlay::load(&path).unwrap().announce_withdrawn);
        fs::remove_dir_all(&dir).unwrap();
    }
}
