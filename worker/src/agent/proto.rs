//! What the worker and a session's agent say to each other on the agent's unix socket,
//! one connection per exec: the worker's [`Request`] first, then [`ToAgent`] frames
//! (stdin, kill) one way and [`FromAgent`] frames (output, then one exit) the other.
//! Frames are `berth_shared::codec`'s (length-prefixed bincode, serde mode). These are
//! not wire messages: both ends are the same binary, so they change together.

use serde::{Deserialize, Serialize};

/// The first frame of a connection: one exec to run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub argv: Vec<String>,
    /// Set on top of the container's own environment (PATH and HOME have defaults).
    pub env: Vec<(String, String)>,
    /// The working directory, a path inside the container.
    pub cwd: String,
    /// Whether stdin frames follow (otherwise the command reads end of file at once).
    pub stdin: bool,
    /// Killed after this long (then `Exit::timed_out`).
    pub timeout_ms: Option<u64>,
    /// How long a SIGTERM'd exec gets before SIGKILL.
    pub grace_ms: u64,
    /// In a packed container: the session it belongs to (marked in the environment of
    /// its processes as `BERTH_PACK_MEMBER`, so that session's leaving ends them all).
    pub member: Option<String>,
    /// Not an exec: end every process of `member` (SIGTERM, the grace, SIGKILL), then
    /// answer one exit.
    pub kill_member: bool,
}

/// The worker's frames after the request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToAgent {
    /// Bytes for the command's stdin; empty: end of file.
    Stdin(Bytes),
    /// End the exec (SIGTERM to all of it, the grace, SIGKILL); it still reports its exit.
    Kill,
}

/// The agent's frames: output as it comes, then one exit, then the connection closes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromAgent {
    /// `stream`: 0 stdout, 1 stderr.
    Output {
        stream: u8,
        data: Bytes,
    },
    Exit(Exit),
}

/// How an exec ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    /// Its exit code, 128+N for signal N; `None` when it never ran.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// Its timeout fired.
    pub timed_out: bool,
    /// The worker asked to kill it (or its connection closed).
    pub killed: bool,
    /// Why it could not run.
    pub error: Option<String>,
}

/// Bytes carried as one byte string (serde's `bytes`), not a sequence of numbers.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Bytes(pub Vec<u8>);

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes({} bytes)", self.0.len())
    }
}

impl Serialize for Bytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Bytes;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
                Ok(Bytes(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
                Ok(Bytes(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(Bytes(out))
            }
        }
        d.deserialize_byte_buf(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_shared::codec::{decode, encode};

    #[test]
    fn frames_round_trip_and_bytes_are_a_byte_string() {
        let r = Request {
            argv: vec!["true".into()],
            env: vec![("A".into(), "b".into())],
            cwd: "/workspace".into(),
            stdin: true,
            timeout_ms: Some(5),
            grace_ms: 2000,
            member: Some("m".into()),
            kill_member: false,
        };
        assert_eq!(decode::<Request>(&encode(&r).expect("encodes")[4..]).expect("decodes"), r);
        let out = FromAgent::Output { stream: 1, data: Bytes(vec![7; 1000]) };
        let buf = encode(&out).expect("encodes");
        // Variant, stream, a length and the bytes themselves: no per-byte encoding.
        assert!(buf.len() < 1000 + 12, "{}", buf.len());
        assert_eq!(decode::<FromAgent>(&buf[4..]).expect("decodes"), out);
        let exit = FromAgent::Exit(Exit { code: Some(143), signal: Some(15), timed_out: true, ..Default::default() });
        assert_eq!(decode::<FromAgent>(&encode(&exit).expect("encodes")[4..]).expect("decodes"), exit);
        assert_eq!(decode::<ToAgent>(&encode(&ToAgent::Stdin(Bytes(Vec::new()))).expect("encodes")[4..]).expect("decodes"), ToAgent::Stdin(Bytes::default()));
    }
}
