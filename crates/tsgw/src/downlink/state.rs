//! The newest entry id each rule handled, kept on disk so that a restart
//! never applies an entry again (ThingSpeak delivers the channel's newest
//! entry to every new subscription, and the gateway's own restart is one).
//!
//! One small JSON file, replaced atomically: written to a temporary file,
//! fsynced, renamed over the old one, and the directory fsynced, before the
//! action's outcome is reported. A power cut leaves the old or the new file.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct OnDisk {
    /// Rule name → the newest entry id it handled.
    rules: BTreeMap<String, u64>,
}

pub struct State {
    path: PathBuf,
    handled: BTreeMap<String, u64>,
}

/// What opening the state found.
pub enum Opened {
    Fresh(State),
    /// The file exists but cannot be read: the caller must not trust it (it
    /// skips the entries delivered on subscribing, to apply none twice).
    Unreadable(State, String),
}

impl State {
    pub fn open(path: &Path) -> Opened {
        let empty = || State {
            path: path.to_owned(),
            handled: BTreeMap::new(),
        };
        match std::fs::read(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Opened::Fresh(empty()),
            Err(e) => Opened::Unreadable(empty(), format!("cannot read {}: {e}", path.display())),
            Ok(bytes) => match serde_json::from_slice::<OnDisk>(&bytes) {
                Ok(disk) => Opened::Fresh(State {
                    path: path.to_owned(),
                    handled: disk.rules,
                }),
                Err(e) => {
                    Opened::Unreadable(empty(), format!("{} is not valid: {e}", path.display()))
                }
            },
        }
    }

    pub fn last_handled(&self, rule: &str) -> Option<u64> {
        self.handled.get(rule).copied()
    }

    /// Records that `rule` handled `entry_id`, durably.
    pub fn handled(&mut self, rule: &str, entry_id: u64) -> std::io::Result<()> {
        if self.handled.get(rule).is_some_and(|&last| last >= entry_id) {
            return Ok(());
        }
        self.handled.insert(rule.to_owned(), entry_id);
        self.save()
    }

    fn save(&self) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(&OnDisk {
            rules: self.handled.clone(),
        })
        .map_err(std::io::Error::other)?;
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = self.path.with_extension("json.tmp");
        {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        std::fs::File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handled_ids_survive_a_reopen_and_never_go_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join("downlink-state.json");
        let Opened::Fresh(mut s) = State::open(&path) else {
            panic!("a missing file is a fresh state")
        };
        s.handled("a", 5).unwrap();
        s.handled("a", 3).unwrap();
        s.handled("b", 1).unwrap();
        let Opened::Fresh(s) = State::open(&path) else {
            panic!("readable")
        };
        assert_eq!(
            (
                s.last_handled("a"),
                s.last_handled("b"),
                s.last_handled("c")
            ),
            (Some(5), Some(1), None)
        );
        std::fs::write(&path, b"{not json").unwrap();
        assert!(matches!(State::open(&path), Opened::Unreadable(..)));
    }
}
