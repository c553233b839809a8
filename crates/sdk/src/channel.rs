//! The message channel to the master: newline-delimited JSON over the Unix
//! socket at `HERD_IPC_FD` (see herd's README for the protocol).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;

use serde_json::{Value, json};

/// What the master sends a worker.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// From `herd send`/`broadcast` (`from` is `"cli"`) or another worker (its
    /// id); from another host, `"HOST/ID"` or `"HOST/cli"`.
    Message { from: Value, data: Value },
    /// A graceful stop of this worker begins (SIGTERM follows).
    Shutdown,
    /// A message this worker sent could not be delivered.
    Undeliverable {
        to: Option<u64>,
        data: Value,
        error: String,
    },
}

/// This worker's end of the channel.
pub struct Channel {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

static TAKEN: AtomicBool = AtomicBool::new(false);

/// The channel, if this process runs under herd; `None` on a second call.
pub fn channel() -> std::io::Result<Option<Channel>> {
    match crate::fd::take_inherited(crate::env::IPC_FD, &TAKEN) {
        Some(owned) => Channel::new(UnixStream::from(owned)).map(Some),
        None => Ok(None),
    }
}

impl Channel {
    pub fn new(stream: UnixStream) -> std::io::Result<Channel> {
        Ok(Channel {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    /// Waits for the next message; `None` once the master is gone.
    pub fn recv(&mut self) -> std::io::Result<Option<Incoming>> {
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Ok(None);
            }
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            let data = v.get("data").cloned().unwrap_or(Value::Null);
            return Ok(Some(match v.get("type").and_then(Value::as_str) {
                Some("shutdown") => Incoming::Shutdown,
                Some("undeliverable") => Incoming::Undeliverable {
                    to: v.get("to").and_then(Value::as_u64),
                    data,
                    error: v["error"].as_str().unwrap_or_default().to_string(),
                },
                _ => Incoming::Message {
                    from: v.get("from").cloned().unwrap_or(Value::Null),
                    data,
                },
            }));
        }
    }

    /// Sends `data` to worker `id`.
    pub fn send_to(&mut self, id: usize, data: Value) -> std::io::Result<()> {
        self.write(json!({"type": "send", "to": id, "data": data}))
    }

    /// Sends `data` to worker `id` of the same cluster on `host` (`--redis`);
    /// if it cannot be delivered, an `Undeliverable` says why.
    pub fn send_to_host(&mut self, host: &str, id: usize, data: Value) -> std::io::Result<()> {
        self.write(json!({"type": "send", "to": format!("{host}/{id}"), "data": data}))
    }

    /// Sends `data` to every other worker (the config-update pattern), and
    /// with `--redis` to every worker of the other hosts.
    pub fn broadcast(&mut self, data: Value) -> std::io::Result<()> {
        self.write(json!({"type": "broadcast", "data": data}))
    }

    /// Sends `data` to the master, which logs it.
    pub fn to_master(&mut self, data: Value) -> std::io::Result<()> {
        self.write(json!({"type": "master", "data": data}))
    }

    /// Asks the master for a replacement: it starts one, waits until it is
    /// ready, then drains and stops this worker (for a worker in a state
    /// it cannot recover from).
    pub fn replace_me(&mut self) -> std::io::Result<()> {
        self.write(json!({"type": "replace"}))
    }

    fn write(&mut self, v: Value) -> std::io::Result<()> {
        let mut line = v.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speaks_the_line_protocol() {
        let (worker, master) = UnixStream::pair().unwrap();
        let mut ch = Channel::new(worker).unwrap();
        ch.broadcast(json!({"config": 2})).unwrap();
        let mut r = BufReader::new(master.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v, json!({"type": "broadcast", "data": {"config": 2}}));
        let mut m = master;
        m.write_all(
            b"{\"type\":\"message\",\"from\":\"cli\",\"data\":\"hi\"}\n{\"type\":\"shutdown\"}\n",
        )
        .unwrap();
        assert_eq!(
            ch.recv().unwrap(),
            Some(Incoming::Message {
                from: json!("cli"),
                data: json!("hi")
            })
        );
        assert_eq!(ch.recv().unwrap(), Some(Incoming::Shutdown));
        drop((m, r)); // every handle on the master's end

        assert_eq!(ch.recv().unwrap(), None);
    }
}
