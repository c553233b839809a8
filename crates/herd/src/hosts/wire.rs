//! What masters of one cluster name say to each other through Redis, the
//! channel and key names they say it under, and the `HOST/ID` address.
//! Pure and unit-tested; `hosts` (the driver) moves it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One pub/sub payload (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Wire {
    /// On the broadcast stream: for every worker of every other host.
    Broadcast {
        host: String,
        from: Value,
        data: Value,
    },
    /// To one host's inbox: for its worker `to`; answered by an `Ack`.
    Send {
        host: String,
        token: u64,
        to: usize,
        from: Value,
        data: Value,
    },
    /// To the sender's inbox: whether the `Send` of `token` was delivered.
    Ack {
        host: String,
        token: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

impl Wire {
    pub fn host(&self) -> &str {
        match self {
            Wire::Broadcast { host, .. } | Wire::Send { host, .. } | Wire::Ack { host, .. } => host,
        }
    }
}

/// Redis names of one cluster: everything under `herd:NAME:`.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(cluster: &str) -> Keys {
        Keys {
            prefix: format!("herd:{cluster}:"),
        }
    }
    /// Broadcasts of every host: a stream, each entry's field `m` a `Wire`.
    pub fn broadcasts(&self) -> String {
        format!("{}broadcasts", self.prefix)
    }
    /// Sends to, and acks for, one host.
    pub fn inbox(&self, host: &str) -> String {
        format!("{}host:{host}", self.prefix)
    }
    /// One host's last status (JSON, expiring).
    pub fn status(&self, host: &str) -> String {
        format!("{}status:{host}", self.prefix)
    }
    /// Every host that reported, scored by when it last did (Unix seconds).
    pub fn hosts(&self) -> String {
        format!("{}hosts", self.prefix)
    }
}

/// Where a message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Local(usize),
    Remote { host: String, id: usize },
}

/// `to` as a worker or `herd send` gives it: a worker id (`3`, `"3"`) or
/// `"HOST/ID"`. This host's own name means a local worker.
pub fn address(to: &Value, own: Option<&str>) -> Result<Address, String> {
    const WANT: &str = "\"to\" must be a worker id, or \"HOST/ID\"";
    match to {
        Value::Number(n) => n
            .as_u64()
            .map(|n| Address::Local(n as usize))
            .ok_or_else(|| WANT.to_string()),
        Value::String(s) => parse(s, own),
        _ => Err(WANT.to_string()),
    }
}

/// `"3"` or `"HOST/3"`.
pub fn parse(s: &str, own: Option<&str>) -> Result<Address, String> {
    let bad = || format!("{s:?} is not a worker id or HOST/ID");
    match s.rsplit_once('/') {
        None => s.parse().map(Address::Local).map_err(|_| bad()),
        Some((host, id)) => {
            let id = id.parse().map_err(|_| bad())?;
            if host.is_empty() {
                return Err(bad());
            }
            Ok(match own {
                Some(o) if o == host => Address::Local(id),
                _ => Address::Remote {
                    host: host.to_string(),
                    id,
                },
            })
        }
    }
}

/// A sender as a worker on another host sees it: `"HOST/ID"` or `"HOST/cli"`.
pub fn remote_sender(host: &str, from: &Value) -> Value {
    match from {
        Value::String(s) => Value::String(format!("{host}/{s}")),
        other => Value::String(format!("{host}/{other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn addresses() {
        assert_eq!(address(&json!(2), None), Ok(Address::Local(2)));
        assert_eq!(address(&json!("2"), Some("a")), Ok(Address::Local(2)));
        assert_eq!(address(&json!("a/1"), Some("a")), Ok(Address::Local(1)));
        assert_eq!(
            address(&json!("web-2.example/1"), Some("a")),
            Ok(Address::Remote {
                host: "web-2.example".into(),
                id: 1
            })
        );
        for bad in [
            json!(-1),
            json!("b/"),
            json!("/1"),
            json!("b/x"),
            json!(null),
        ] {
            assert!(address(&bad, Some("a")).is_err(), "{bad}");
        }
    }

    #[test]
    fn wire_round_trips_and_names() {
        let w = Wire::Send {
            host: "a".into(),
            token: 7,
            to: 1,
            from: json!(0),
            data: json!({"k": [1, 2]}),
        };
        let s = serde_json::to_string(&w).unwrap();
        assert!(s.starts_with(r#"{"kind":"send","host":"a""#), "{s}");
        assert_eq!(serde_json::from_str::<Wire>(&s).unwrap(), w);
        let ack: Wire = serde_json::from_str(r#"{"kind":"ack","host":"b","token":7}"#).unwrap();
        assert_eq!(ack.host(), "b");
        let k = Keys::new("api");
        assert_eq!(k.broadcasts(), "herd:api:broadcasts");
        assert_eq!(k.inbox("b"), "herd:api:host:b");
        assert_eq!(k.status("b"), "herd:api:status:b");
        assert_eq!(remote_sender("b", &json!(1)), json!("b/1"));
        assert_eq!(remote_sender("b", &json!("cli")), json!("b/cli"));
    }
}
