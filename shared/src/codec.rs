//! The frame codec: a 4-byte big-endian length, then the message in bincode 2 (serde
//! mode). Every frame on every stream goes through here, so the encoding can be
//! swapped in one place.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::wire::MAX_FRAME_BYTES;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("frame of {len} bytes is over the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
    #[error("frame does not decode")]
    Decode(#[source] bincode::error::DecodeError),
    #[error("frame does not encode")]
    Encode(#[source] bincode::error::EncodeError),
    #[error("stream ended inside a frame")]
    Truncated,
    #[error("stream i/o failed")]
    Io(#[source] std::io::Error),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
}

/// Encodes one message as a frame (length prefix included), into a buffer of exactly
/// its size (sized first: a 256 KiB output chunk is then copied once, not regrown).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(msg, &mut size, config()).map_err(CodecError::Encode)?;
    let len = size.bytes_written;
    if len > MAX_FRAME_BYTES {
        return Err(CodecError::TooLarge { len, limit: MAX_FRAME_BYTES });
    }
    let prefix = u32::try_from(len).map_err(|_| CodecError::TooLarge { len, limit: MAX_FRAME_BYTES })?;
    let mut buf = Vec::with_capacity(4 + len);
    buf.extend_from_slice(&prefix.to_be_bytes());
    bincode::serde::encode_into_std_write(msg, &mut buf, config()).map_err(CodecError::Encode)?;
    Ok(buf)
}

/// Decodes a frame body (without its length prefix).
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    let (msg, used) = bincode::serde::decode_from_slice(body, config()).map_err(CodecError::Decode)?;
    if used != body.len() {
        return Err(CodecError::Decode(bincode::error::DecodeError::OtherString(format!("{} trailing bytes after the message", body.len() - used))));
    }
    Ok(msg)
}

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(w: &mut W, msg: &T) -> Result<(), CodecError> {
    let buf = encode(msg)?;
    w.write_all(&buf).await.map_err(CodecError::Io)
}

/// Writes one frame on a QUIC stream, handing the encoded buffer to the stream rather
/// than copying it (for large frames: output chunks).
pub async fn write_frame_quic<T: Serialize>(w: &mut quinn::SendStream, msg: &T) -> Result<(), CodecError> {
    let buf = encode(msg)?;
    w.write_chunk(bytes::Bytes::from(buf)).await.map_err(|e| CodecError::Io(e.into()))
}

/// Reads one frame; `Ok(None)` when the stream ended cleanly between frames.
pub async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(r: &mut R) -> Result<Option<T>, CodecError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut len[got..]).await.map_err(CodecError::Io)?;
        if n == 0 {
            return if got == 0 { Ok(None) } else { Err(CodecError::Truncated) };
        }
        got += n;
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(CodecError::TooLarge { len, limit: MAX_FRAME_BYTES });
    }
    // Read into spare capacity: no zeroing of a buffer about to be overwritten.
    let mut body = Vec::with_capacity(len);
    r.take(len as u64).read_to_end(&mut body).await.map_err(CodecError::Io)?;
    if body.len() < len {
        return Err(CodecError::Truncated);
    }
    decode(&body).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{JobId, LeaseId};
    use crate::job::{Command, JobSpec};
    use crate::wire::*;
    use uuid::Uuid;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// Golden bytes: a change here is a protocol change, so bump PROTOCOL_VERSION.
    #[test]
    fn golden_hello() {
        let hello = Hello { protocol: 1, software: "0.1.0".into(), kind: PeerKind::Worker };
        assert_eq!(hex(&encode(&hello).expect("encodes")), "000000080105302e312e3001");
    }

    #[test]
    fn golden_output_chunk_and_ack() {
        let lease = LeaseId(Uuid::from_u128(0x0102030405060708090a0b0c0d0e0f10));
        let chunk = OutputFrame::Chunk { stream: OutStream::Stderr, seq: 3, data: b"hi\n".to_vec() };
        assert_eq!(hex(&encode(&chunk).expect("encodes")), "0000000701010303686a0a".replace("686a", "6869"));
        let ack = CoordMsg::OutputAck { lease, stream: OutStream::Stdout, seq: 300 };
        assert_eq!(hex(&encode(&ack).expect("encodes")), "0000001603100102030405060708090a0b0c0d0e0f1000fb2c01");
    }

    #[test]
    /// Protocol 1 as of the job constraints and dependencies (two empty lists), the
    /// output cap and the session (none: `00` each), before the key.
    fn golden_submit() {
        let spec = JobSpec::new(Command::Argv(vec!["true".into()]));
        let req = Request::Submit { spec, idempotency_key: Uuid::from_u128(1) };
        assert_eq!(hex(&encode(&req).expect("encodes")), "0000002d000000010474727565000000000000000000030000000000000000001000000000000000000000000000000001");
    }

    /// The session messages (protocol 3), appended to their enums.
    #[test]
    fn golden_exec() {
        let lease = LeaseId(Uuid::from_u128(0x0102030405060708090a0b0c0d0e0f10));
        let spec = crate::session::ExecSpec { argv: vec!["true".into()], env: vec![], timeout_ms: None, cwd: None, stdin: false };
        let exec = CoordMsg::Exec { lease, exec: 2, spec };
        assert_eq!(hex(&encode(&exec).expect("encodes")), "0000001d0b100102030405060708090a0b0c0d0e0f100201047472756500000000");
        let open = OutputFrame::OpenExec { lease, exec: 2 };
        assert_eq!(hex(&encode(&open).expect("encodes")), "0000001302100102030405060708090a0b0c0d0e0f1002");
    }

    /// The freeze messages, appended to their enums so every earlier message keeps its
    /// bytes.
    #[test]
    fn golden_freeze() {
        let lease = LeaseId(Uuid::from_u128(0x0102030405060708090a0b0c0d0e0f10));
        let freeze = CoordMsg::Freeze { lease, tag: "t1".into() };
        assert_eq!(hex(&encode(&freeze).expect("encodes")), "0000001507100102030405060708090a0b0c0d0e0f10027431");
        let outcome = crate::job::Outcome { exit_code: Some(143), signal: None, timed_out: false, killed: false, runtime_ms: 5, error: None };
        let frozen = WorkerMsg::Frozen { lease, image: "berth-frozen:t1".into(), outcome };
        assert_eq!(hex(&encode(&frozen).expect("encodes")), "0000002b05100102030405060708090a0b0c0d0e0f100f62657274682d66726f7a656e3a743101fb1e010000000500");
        let req = Request::Freeze { job: "0192f3ab".parse().expect("selector"), tag: None };
        assert_eq!(hex(&encode(&req).expect("encodes")), "0000000c0c0830313932663361620000");
    }

    /// A full store's messages, appended to their enums so every earlier message keeps
    /// its bytes.
    #[test]
    fn golden_store_health() {
        let lease = LeaseId(Uuid::from_u128(0x0102030405060708090a0b0c0d0e0f10));
        assert_eq!(hex(&encode(&CoordMsg::Resend { lease }).expect("encodes")), "0000001209100102030405060708090a0b0c0d0e0f10");
        assert_eq!(hex(&encode(&Request::Health).expect("encodes")), "0000000110");
        let health = Response::Health(CoordinatorHealth {
            coordinator: "c".into(),
            store: StoreHealth { writable: false, disk_full: true, since: None, reason: Some("full".into()) },
            default_max_output: 1 << 20,
        });
        assert_eq!(hex(&encode(&health).expect("encodes")), "00000011130163000100010466756c6cfc00001000");
    }

    /// Protocol 2: a worker's `Register` ends with its process's instance id, and
    /// `InUse` is appended to `CoordMsg`, so every earlier message keeps its bytes.
    #[test]
    fn golden_one_identity() {
        let busy = CoordMsg::InUse { reason: "x".into(), retry_after_ms: 5000 };
        assert_eq!(hex(&encode(&busy).expect("encodes")), "000000060a0178fb8813");
        let instance = Uuid::from_u128(0x0102030405060708090a0b0c0d0e0f10);
        let register =
            WorkerMsg::Register { name: "w".into(), slots: 1, pool: "p".into(), labels: Vec::new(), host: Box::default(), held: Vec::new(), instance };
        let bytes = hex(&encode(&register).expect("encodes"));
        assert!(bytes[8..].starts_with("000177010170"), "Register is variant 0, name, slots, pool first: {bytes}");
        assert!(bytes.ends_with("00100102030405060708090a0b0c0d0e0f10"), "no lease held, then the instance: {bytes}");
    }

    #[test]
    fn round_trip_assignment() {
        let a = Assignment {
            lease: LeaseId::new(),
            job: JobId::new(),
            index: Some(7),
            attempt: 2,
            spec: JobSpec::new(Command::Script("echo hi".into())),
            owner: "alice".into(),
        };
        let buf = encode(&CoordMsg::Assign(vec![a.clone()])).expect("encodes");
        let back: CoordMsg = decode(&buf[4..]).expect("decodes");
        assert_eq!(back, CoordMsg::Assign(vec![a]));
    }

    #[tokio::test]
    async fn bad_frames_are_errors_not_panics() {
        // Over the limit.
        let mut big: &[u8] = &[0xff, 0xff, 0xff, 0xff];
        assert!(matches!(read_frame::<_, Hello>(&mut big).await, Err(CodecError::TooLarge { .. })));
        // Garbage body.
        let mut junk: &[u8] = &[0, 0, 0, 3, 0xff, 0xfe, 0xfd];
        assert!(matches!(read_frame::<_, Request>(&mut junk).await, Err(CodecError::Decode(_))));
        // Truncated.
        let mut cut: &[u8] = &[0, 0, 0, 9, 1, 2];
        assert!(matches!(read_frame::<_, Request>(&mut cut).await, Err(CodecError::Truncated)));
        // Clean end.
        let mut empty: &[u8] = &[];
        assert!(matches!(read_frame::<_, Request>(&mut empty).await, Ok(None)));
        // Trailing bytes after a valid message.
        let mut buf = encode(&PeerKind::Client).expect("encodes");
        buf.push(0);
        let n = (buf.len() - 4) as u32;
        buf[..4].copy_from_slice(&n.to_be_bytes());
        let mut r: &[u8] = &buf;
        assert!(matches!(read_frame::<_, PeerKind>(&mut r).await, Err(CodecError::Decode(_))));
    }
}
