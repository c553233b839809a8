//! What a running cluster changed since its master started, through the
//! control socket, that a new master must take over to run it as it runs
//! now: `herd scale`'s count, a promoted deploy's command, directory and
//! environment, and `--update-env`'s environment. The master's command
//! line does not say them, so without this `herd upgrade`, `herd stop`
//! then `herd start NAME`, and `herd save` then `herd resurrect` would
//! bring the cluster back as it started (the release before the promote,
//! the count before the scale), as PM2 would not.
//!
//! It travels as JSON in `HERD_RELAUNCH` (never to workers) and layers
//! over the master's flags as flags of its own would.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{EnvPair, Instances, Options};

/// The environment variable that carries a [`Relaunch`] to a new master.
pub const VAR: &str = "HERD_RELAUNCH";

/// Above this, `base_env` is left out of `HERD_RELAUNCH`: one environment
/// string may not pass 128 KiB (Linux's `MAX_ARG_STRLEN`), and an exec or
/// a spawn refused for it would lose the cluster, not just the variables.
const MAX_ENCODED: usize = 96 * 1024;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Relaunch {
    /// The cluster's name, kept when `command` would derive another.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `herd scale`'s count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instances: Option<usize>,
    /// A promoted deploy's `-- COMMAND` (as resolved: interpreter first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// A promoted deploy's `--cwd`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cwd: Option<PathBuf>,
    /// Promoted deploys' `--env`s, in order (over `[env]` and `--env`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<(String, String)>,
    /// The environment `reload --update-env` gave, which the workers'
    /// environment adds to instead of the master's own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_env: Option<BTreeMap<String, String>>,
}

impl Relaunch {
    /// This process's `HERD_RELAUNCH`; nothing when unset or unreadable
    /// (only herd writes it).
    pub fn from_env() -> Relaunch {
        std::env::var(VAR)
            .ok()
            .and_then(|v| Relaunch::decode(&v))
            .unwrap_or_default()
    }

    pub fn decode(v: &str) -> Option<Relaunch> {
        serde_json::from_str(v).ok()
    }

    pub fn is_empty(&self) -> bool {
        *self == Relaunch::default()
    }

    /// As `HERD_RELAUNCH`'s value; without `base_env` if it would be too
    /// long for one environment string.
    pub fn encode(&self) -> String {
        let text = serde_json::to_string(self).unwrap_or_default();
        if text.len() <= MAX_ENCODED {
            return text;
        }
        let lean = Relaunch {
            base_env: None,
            ..self.clone()
        };
        serde_json::to_string(&lean).unwrap_or_default()
    }

    /// Lays these changes over the master's flags.
    pub fn over(&self, o: &mut Options) {
        if let Some(n) = &self.name {
            o.name = Some(n.clone());
        }
        if let Some(n) = self.instances {
            o.instances = Some(Instances::Count(n));
        }
        if let Some(c) = &self.command {
            o.command = Some(c.iter().map(Into::into).collect());
        }
        if let Some(d) = &self.cwd {
            o.cwd = Some(d.clone());
        }
        o.env
            .extend(self.env.iter().map(|(k, v)| EnvPair(k.clone(), v.clone())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_lays_over_the_flags_and_round_trips() {
        let r = Relaunch {
            name: Some("api".into()),
            instances: Some(3),
            command: Some(vec!["node".into(), "v2.js".into()]),
            cwd: Some("/srv/v2".into()),
            env: vec![("RELEASE".into(), "v2".into())],
            base_env: None,
        };
        assert_eq!(Relaunch::decode(&r.encode()), Some(r.clone()));
        let mut o = Options {
            instances: Some(Instances::Max),
            env: vec![EnvPair("RELEASE".into(), "v1".into())],
            command: Some(vec!["v1.js".into()]),
            ..Options::default()
        };
        r.over(&mut o);
        assert_eq!(o.instances, Some(Instances::Count(3)));
        assert_eq!(o.command, Some(vec!["node".into(), "v2.js".into()]));
        assert_eq!(o.cwd, Some(PathBuf::from("/srv/v2")));
        assert_eq!(o.name.as_deref(), Some("api"));
        // The later pair wins, as a later --env does.
        assert_eq!(o.env.last(), Some(&EnvPair("RELEASE".into(), "v2".into())));
        assert!(Relaunch::default().is_empty());
        assert_eq!(Relaunch::decode("{}"), Some(Relaunch::default()));
    }

    #[test]
    fn an_environment_too_long_for_one_variable_is_left_out() {
        let big: BTreeMap<String, String> = (0..2000)
            .map(|i| (format!("VAR_{i}"), "x".repeat(64)))
            .collect();
        let r = Relaunch {
            instances: Some(2),
            base_env: Some(big),
            ..Relaunch::default()
        };
        let back = Relaunch::decode(&r.encode()).unwrap_or_default();
        assert_eq!(back.instances, Some(2));
        assert_eq!(back.base_env, None);
        let small = Relaunch {
            base_env: Some([("A".to_string(), "1".to_string())].into()),
            ..Relaunch::default()
        };
        assert_eq!(Relaunch::decode(&small.encode()), Some(small));
    }
}
