//! Talking to the coordinator: find the profile, connect, send requests, take the
//! answer a command expects apart (`Client::ask` with `answer!`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_shared::codec::{encode, read_frame, CodecError};
use berth_shared::dial::{client_endpoint, dial, DialError};
use berth_shared::profile::Profile;
use berth_shared::tls::client_config;
use berth_shared::wire::{ApiError, ErrorKind, PeerKind, Request, Response};

use crate::exit::{Fail, EXIT_AUTH, EXIT_FAILURE, EXIT_NOT_FOUND, EXIT_REFUSED, EXIT_USAGE};

/// Where the profile is: `--profile`, then `$BERTH_PROFILE`, then
/// `$XDG_CONFIG_HOME/berth/profile.toml` (or `~/.config/berth/profile.toml`).
pub fn profile_path(flag: Option<&Path>) -> Result<PathBuf, Fail> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("BERTH_PROFILE").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|p| !p.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => match std::env::var_os("HOME") {
            Some(h) => PathBuf::from(h).join(".config"),
            None => return Err(Fail::new(EXIT_AUTH, "no profile: pass --profile PATH or set BERTH_PROFILE")),
        },
    };
    Ok(base.join("berth").join("profile.toml"))
}

/// Reads the profile found as `profile_path` says.
pub fn load_profile(flag: Option<&Path>) -> Result<Profile, Fail> {
    let path = profile_path(flag)?;
    Profile::from_file(&path).map_err(|e| Fail::new(EXIT_AUTH, format!("{e} (make one with `berth-coordinator user add`, or run `berth dev`)")))
}

/// One connection to a coordinator. Every method takes `&self`, so a client is shared
/// (behind an `Arc`) by tasks and threads: requests are independent bi streams on the
/// one connection, and a reconnect swaps the connection for all of them.
pub struct Client {
    conn: std::sync::Mutex<quinn::Connection>,
    endpoint: quinn::Endpoint,
    profile: Profile,
}

impl Client {
    pub async fn connect(profile_flag: Option<&Path>) -> Result<Client, Fail> {
        let profile = load_profile(profile_flag)?;
        Self::with_profile(&profile).await
    }

    /// The connection in use now.
    fn conn(&self) -> quinn::Connection {
        // A poisoned lock only means another thread panicked while swapping in a
        // connection; the value it holds is a whole connection either way.
        self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_conn(&self, conn: quinn::Connection) {
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = conn;
    }

    /// The profile this client connected with.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    pub async fn with_profile(profile: &Profile) -> Result<Client, Fail> {
        let tls = client_config(&profile.ca, Some(&profile.identity())).map_err(|e| Fail::new(EXIT_AUTH, format!("profile for {}: {e}", profile.user)))?;
        let v6 = profile.coordinators.first().is_some_and(|a| a.starts_with('['));
        let endpoint = client_endpoint(tls, v6).map_err(|e| Fail::new(EXIT_FAILURE, format!("cannot open a UDP socket: {e}")))?;
        let conn = Self::dial(&endpoint, profile).await?;
        Ok(Client { conn: std::sync::Mutex::new(conn), endpoint, profile: profile.clone() })
    }

    /// Connects to the first of the profile's coordinators that answers.
    async fn dial(endpoint: &quinn::Endpoint, profile: &Profile) -> Result<quinn::Connection, Fail> {
        let d = dial(endpoint, &profile.coordinators, Some(&profile.server_name), PeerKind::Client, Duration::from_secs(5)).await.map_err(|e| match e {
            DialError::Refused { .. } | DialError::Auth { .. } => Fail::new(EXIT_AUTH, e.to_string()),
            other => Fail::lost(other.to_string()),
        })?;
        Ok(d.conn)
    }

    /// Dials again (the next coordinator in the profile if this one is down), for up to
    /// `patience`: after a lost connection, to pick up where a stream left off.
    pub async fn reconnect(&self, patience: Duration) -> Result<(), Fail> {
        let deadline = tokio::time::Instant::now() + patience;
        let mut backoff = Duration::from_millis(100);
        loop {
            match Self::dial(&self.endpoint, &self.profile).await {
                Ok(conn) => {
                    self.set_conn(conn);
                    return Ok(());
                }
                Err(f) if f.lost && tokio::time::Instant::now() + backoff < deadline => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(f) => return Err(f),
            }
        }
    }

    /// Sends a request that is safe to repeat (it carries an idempotency key): when the
    /// coordinator is lost or does not answer in time, reconnects — to the next
    /// coordinator in the profile if that one is down — and sends it again, for up to
    /// `patience`.
    pub async fn call_idempotent(&self, req: &Request, patience: Duration) -> Result<Response, Fail> {
        let deadline = tokio::time::Instant::now() + patience;
        let mut backoff = Duration::from_millis(100);
        loop {
            let r = match tokio::time::timeout(Duration::from_secs(15), self.call(req)).await {
                Ok(r) => r,
                Err(_) => Err(Fail::lost("the coordinator did not answer within 15s")),
            };
            match r {
                Err(f) if f.lost && tokio::time::Instant::now() + backoff < deadline => {
                    tracing::debug!(error = %f.message, "request lost; sending it again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    if let Ok(conn) = Self::dial(&self.endpoint, &self.profile).await {
                        self.set_conn(conn);
                    }
                }
                other => return other,
            }
        }
    }

    /// Sends a request; the returned stream yields its responses. A request too large
    /// for one frame is refused here, as invalid, before anything is sent.
    pub async fn open(&self, req: &Request) -> Result<Responses, Fail> {
        let frame = encode(req).map_err(|e| match e {
            CodecError::TooLarge { len, limit } => Fail::usage(format!(
                "the request is {len} bytes, over the {} MiB ({limit} bytes) one request may carry: keep large data in files the job reads",
                limit >> 20
            )),
            other => Fail::new(EXIT_FAILURE, format!("cannot encode the request: {other}")),
        })?;
        let conn = self.conn();
        let (mut send, recv) = conn.open_bi().await.map_err(|e| Fail::lost(format!("lost the coordinator: {e}")))?;
        send.write_all(&frame).await.map_err(|e| Fail::lost(format!("cannot send the request: {e}")))?;
        let _ = send.finish();
        Ok(Responses { recv, conn })
    }

    /// As `open`, keeping the request's stream open for what the caller sends after it
    /// (an exec's stdin).
    pub async fn open_with_input(&self, req: &Request) -> Result<(Responses, Option<quinn::SendStream>), Fail> {
        let frame = encode(req).map_err(|e| Fail::new(EXIT_FAILURE, format!("cannot encode the request: {e}")))?;
        let conn = self.conn();
        let (mut send, recv) = conn.open_bi().await.map_err(|e| Fail::lost(format!("lost the coordinator: {e}")))?;
        send.write_all(&frame).await.map_err(|e| Fail::lost(format!("cannot send the request: {e}")))?;
        Ok((Responses { recv, conn }, Some(send)))
    }

    /// Sends a request that has exactly one answer.
    pub async fn call(&self, req: &Request) -> Result<Response, Fail> {
        let mut r = self.open(req).await?;
        match r.next().await? {
            Some(resp) => Ok(resp),
            None => Err(Fail::new(EXIT_FAILURE, "the coordinator sent no answer")),
        }
    }

    /// Sends a request that has exactly one answer and takes it apart with `take`, which
    /// gives back an answer it does not expect (a failure: unexpected). `answer!`
    /// writes `take` for one shape of `Response`.
    pub async fn ask<T>(&self, req: &Request, take: impl FnOnce(Response) -> Result<T, Response>) -> Result<T, Fail> {
        take(self.call(req).await?).map_err(unexpected)
    }

    pub fn close(&self) {
        self.conn().close(0u32.into(), b"bye");
    }
}

pub struct Responses {
    recv: quinn::RecvStream,
    conn: quinn::Connection,
}

impl Responses {
    /// The stream itself, for what follows the frames read so far (a copy's raw bytes).
    pub fn into_raw(self) -> quinn::RecvStream {
        self.recv
    }

    /// The next response; an `Error` response becomes a `Fail` with its exit code.
    pub async fn next(&mut self) -> Result<Option<Response>, Fail> {
        match read_frame::<_, Response>(&mut self.recv).await {
            Ok(Some(Response::Error(e))) => Err(api_fail(e)),
            Ok(r) => Ok(r),
            Err(e) => {
                let why = self.conn.close_reason().map(|r| berth_shared::dial::describe(&r)).unwrap_or_else(|| e.to_string());
                Err(Fail::lost(format!("lost the coordinator: {why}")))
            }
        }
    }
}

pub fn api_fail(e: ApiError) -> Fail {
    let code = match e.kind {
        ErrorKind::Invalid | ErrorKind::Ambiguous => EXIT_USAGE,
        ErrorKind::Refused => EXIT_REFUSED,
        ErrorKind::NotFound => EXIT_NOT_FOUND,
        ErrorKind::Internal => EXIT_FAILURE,
    };
    Fail::new(code, e.message)
}

pub fn unexpected(r: Response) -> Fail {
    Fail::new(EXIT_FAILURE, format!("unexpected answer from the coordinator: {r:?}"))
}

/// The `take` of `Client::ask` for one shape of answer: `answer!(Response::List(jobs) =>
/// jobs)` is the list, and any other answer is given back.
#[macro_export]
macro_rules! answer {
    ($shape:pat => $out:expr) => {
        |r: berth_shared::wire::Response| match r {
            $shape => Ok($out),
            other => Err(other),
        }
    };
}
pub use crate::answer;
