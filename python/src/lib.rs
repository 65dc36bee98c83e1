//! `berth._berth`: the Python bindings of the berth client library. One tokio runtime
//! (owned here, shared by every client) drives the QUIC connections; each operation is
//! one async function of `berth::api::Client`, run either to completion with the GIL
//! released (the synchronous API) or spawned with a callback the asyncio layer turns
//! into a future (`berth.aio`). Everything Pythonic (classes, exceptions, iteration)
//! lives in the pure-Python package above this module.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use berth::api::{answer, unexpected, Client, Responses};
use berth::exit::{Fail, EXIT_FAILURE};
use berth_shared::codec::write_frame;
use berth_shared::ids::{JobId, JobSelector};
use berth_shared::job::{ArrayRange, Command, Dependency, Executor, JobSpec, JobState};
use berth_shared::session::{exit_code_of, ExecEnd, ExecSpec};
use berth_shared::wire::{OutStream, Request, Response, StdinFrame};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use pyo3::IntoPyObjectExt;

/// The code `berth.errors` reads as a wait that timed out (as `timeout(1)` exits).
const EXIT_TIMEOUT: u8 = 124;

/// The runtime every client's connection and request runs on.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(2, 4);
        // Building a runtime fails only when the OS refuses threads; nothing can run then.
        #[allow(clippy::expect_used)]
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("berth-io")
            .enable_all()
            .build()
            .expect("cannot start the berth runtime")
    })
}

/// What an operation hands back: made into a Python object once the GIL is held.
type Out = Box<dyn FnOnce(Python<'_>) -> PyResult<PyObject> + Send>;

fn out<T>(v: T) -> Out
where
    T: for<'py> IntoPyObject<'py> + Send + 'static,
{
    Box::new(move |py| v.into_py_any(py))
}

/// A `Fail` as the Python exception `berth.errors` makes of it (exit code, message,
/// whether the connection was lost, and a hint of which step failed).
fn fail_to_py(py: Python<'_>, f: Fail, hint: &str) -> PyErr {
    let made = py.import("berth.errors").and_then(|m| m.getattr("_from_fail")).and_then(|mk| mk.call1((f.code, f.message.clone(), f.lost, hint)));
    match made {
        Ok(exc) => PyErr::from_value(exc),
        Err(e) => e,
    }
}

/// Runs `fut` to its end on the runtime with the GIL released, looking for signals
/// (Ctrl-C) every 200 ms: a KeyboardInterrupt drops the operation.
fn block<T: Send>(py: Python<'_>, fut: impl Future<Output = Result<T, Fail>> + Send) -> PyResult<T> {
    let rt = runtime();
    let mut fut = Box::pin(fut);
    loop {
        let r = py.allow_threads(|| rt.block_on(async { tokio::time::timeout(Duration::from_millis(200), &mut fut).await }));
        match r {
            Ok(v) => return v.map_err(|f| fail_to_py(py, f, "")),
            Err(_) => py.check_signals()?,
        }
    }
}

/// An operation spawned for asyncio: `cancel()` drops it (the future was cancelled).
#[pyclass(frozen, module = "berth._berth")]
struct Pending {
    abort: tokio::task::AbortHandle,
}

#[pymethods]
impl Pending {
    /// Drops the operation; its callback is never called.
    fn cancel(&self) {
        self.abort.abort();
    }
}

/// Runs an operation: blocking (the GIL released) when `done` is None, else spawned,
/// `done(error, value)` called from a runtime thread when it ends, and a `Pending`
/// returned at once.
fn drive<F>(py: Python<'_>, done: Option<PyObject>, fut: F) -> PyResult<PyObject>
where
    F: Future<Output = Result<Out, Fail>> + Send + 'static,
{
    match done {
        None => {
            let made = block(py, fut)?;
            made(py)
        }
        Some(cb) => {
            let task = runtime().spawn(async move {
                let r = fut.await;
                Python::with_gil(|py| {
                    let r = r.map_err(|f| fail_to_py(py, f, "")).and_then(|o| o(py));
                    let args = match r {
                        Ok(v) => (py.None(), v),
                        Err(e) => (e.into_value(py).into_any(), py.None()),
                    };
                    if let Err(e) = cb.call1(py, args) {
                        e.write_unraisable(py, None);
                    }
                });
            });
            Pending { abort: task.abort_handle() }.into_py_any(py)
        }
    }
}

fn selector(s: &str) -> PyResult<JobSelector> {
    s.parse::<JobSelector>().map_err(PyValueError::new_err)
}

fn usage(e: impl std::fmt::Display) -> Fail {
    Fail::usage(e.to_string())
}

fn json_text(v: serde_json::Value) -> Out {
    out(v.to_string())
}

/// `30s`, `5m`, `1h30m`, `250ms` in milliseconds (the CLI's parser).
#[pyfunction]
fn parse_duration_ms(s: &str) -> PyResult<u64> {
    berth_shared::duration::parse_duration(s).map(|d| d.as_millis() as u64).map_err(PyValueError::new_err)
}

/// `512M`, `4G` in MiB (the CLI's parser for --mem and --min-vram).
#[pyfunction]
fn parse_size_mib(s: &str) -> PyResult<u64> {
    berth_shared::duration::parse_size_mib(s).map_err(PyValueError::new_err)
}

/// `100M`, `2G` in bytes (the CLI's parser for --max-output).
#[pyfunction]
fn parse_size_bytes(s: &str) -> PyResult<u64> {
    berth_shared::duration::parse_size_bytes(s).map_err(PyValueError::new_err)
}

/// The profile path the CLI would use: `profile`, `$BERTH_PROFILE`, then
/// `$XDG_CONFIG_HOME/berth/profile.toml`.
#[pyfunction]
#[pyo3(signature = (profile=None))]
fn profile_path(py: Python<'_>, profile: Option<PathBuf>) -> PyResult<PathBuf> {
    berth::api::profile_path(profile.as_deref()).map_err(|f| fail_to_py(py, f, "profile"))
}

/// One item of a response stream, as Python sees it.
enum Item {
    Out(OutStream, Vec<u8>),
    Started(u32),
    Ended(ExecEnd),
}

fn item_to_py(py: Python<'_>, i: Item) -> PyResult<PyObject> {
    match i {
        Item::Out(s, data) => ("out", if s == OutStream::Stdout { 1 } else { 2 }, PyBytes::new(py, &data)).into_py_any(py),
        Item::Started(n) => ("started", n).into_py_any(py),
        Item::Ended(e) => ("ended", e.exec, exit_code_of(&e), e.exit_code, e.timed_out, e.runtime_ms, e.reason).into_py_any(py),
    }
}

/// Reads responses into a channel ahead of the reader (so the network and Python
/// overlap); ends with `None` sent after the last item, or the failure.
fn pump(mut r: Responses, cap: usize) -> (tokio::sync::mpsc::Receiver<Result<Item, Fail>>, tokio::task::AbortHandle) {
    let (tx, rx) = tokio::sync::mpsc::channel(cap);
    let task = runtime().spawn(async move {
        loop {
            let item = match r.next().await {
                Ok(Some(Response::Output { stream, data })) => Item::Out(stream, data),
                Ok(Some(Response::ExecStarted { exec })) => Item::Started(exec),
                Ok(Some(Response::ExecEnded(end))) => {
                    let _ = tx.send(Ok(Item::Ended(end))).await;
                    return;
                }
                Ok(Some(Response::End)) | Ok(None) => return,
                Ok(Some(other)) => {
                    let _ = tx.send(Err(unexpected(other))).await;
                    return;
                }
                Err(f) => {
                    let _ = tx.send(Err(f)).await;
                    return;
                }
            };
            if tx.send(Ok(item)).await.is_err() {
                return;
            }
        }
    });
    (rx, task.abort_handle())
}

/// A stream of output (a job's logs, an exec's output and end). `next()` gives the
/// items that are there (at least one, waiting for it), as a list; `[]` at the end.
#[pyclass(frozen, module = "berth._berth")]
struct Stream {
    rx: Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Result<Item, Fail>>>>,
    abort: tokio::task::AbortHandle,
}

impl Stream {
    fn of(r: Responses) -> Stream {
        let (rx, abort) = pump(r, 64);
        Stream { rx: Arc::new(tokio::sync::Mutex::new(rx)), abort }
    }
}

/// Up to this many bytes of output are handed over in one `next()`.
const BATCH_BYTES: usize = 4 << 20;

#[pymethods]
impl Stream {
    /// The next batch of items (empty: the stream ended). With `timeout_ms`, the one
    /// item `("timeout",)` when nothing came within it (the stream goes on).
    #[pyo3(signature = (done=None, timeout_ms=None))]
    fn next(&self, py: Python<'_>, done: Option<PyObject>, timeout_ms: Option<u64>) -> PyResult<PyObject> {
        let rx = self.rx.clone();
        drive(py, done, async move {
            let mut rx = rx.lock().await;
            let mut items = Vec::new();
            let first = match timeout_ms {
                None => Some(rx.recv().await),
                Some(ms) => tokio::time::timeout(std::time::Duration::from_millis(ms), rx.recv()).await.ok(),
            };
            match first {
                None => {
                    return Ok(Box::new(|py: Python<'_>| {
                        let list = pyo3::types::PyList::empty(py);
                        list.append(("timeout",))?;
                        Ok(list.into_any().unbind())
                    }) as Out)
                }
                Some(None) => {}
                Some(Some(Err(f))) => return Err(f),
                Some(Some(Ok(i))) => items.push(i),
            }
            let mut bytes = 0;
            while bytes < BATCH_BYTES {
                match rx.try_recv() {
                    Ok(Ok(i)) => {
                        if let Item::Out(_, d) = &i {
                            bytes += d.len();
                        }
                        items.push(i)
                    }
                    // A failure after items: handed over on the next call.
                    Ok(Err(f)) => {
                        if items.is_empty() {
                            return Err(f);
                        }
                        // Put back is not possible on an mpsc; keep it as the last word.
                        let msg = f;
                        return Ok(Box::new(move |py: Python<'_>| {
                            let list = pyo3::types::PyList::empty(py);
                            for i in items {
                                list.append(item_to_py(py, i)?)?;
                            }
                            list.append(("error", fail_to_py(py, msg, "").into_value(py)))?;
                            Ok(list.into_any().unbind())
                        }) as Out);
                    }
                    Err(_) => break,
                }
            }
            Ok(Box::new(move |py: Python<'_>| {
                let list = pyo3::types::PyList::empty(py);
                for i in items {
                    list.append(item_to_py(py, i)?)?;
                }
                Ok(list.into_any().unbind())
            }) as Out)
        })
    }

    /// Stops reading (the coordinator is told: an exec it follows is then killed).
    fn close(&self) {
        self.abort.abort();
    }
}

/// An exec started with `start`: its output stream, and its stdin when it reads one.
#[pyclass(frozen, module = "berth._berth")]
struct Exec {
    stream: Py<Stream>,
    stdin: Arc<tokio::sync::Mutex<Option<quinn::SendStream>>>,
}

#[pymethods]
impl Exec {
    #[getter]
    fn stream(&self, py: Python<'_>) -> Py<Stream> {
        self.stream.clone_ref(py)
    }

    /// Sends bytes to the command's stdin (in pieces of at most 1 MiB).
    #[pyo3(signature = (data, done=None))]
    fn write(&self, py: Python<'_>, data: Vec<u8>, done: Option<PyObject>) -> PyResult<PyObject> {
        let stdin = self.stdin.clone();
        drive(py, done, async move {
            let mut g = stdin.lock().await;
            let Some(send) = g.as_mut() else { return Err(Fail::usage("stdin is closed, or the command was started without stdin=True")) };
            for piece in data.chunks(1 << 20) {
                write_frame(send, &StdinFrame::Data(piece.to_vec())).await.map_err(|e| Fail::lost(format!("cannot send stdin: {e}")))?;
            }
            Ok(out(data.len()))
        })
    }

    /// Closes the command's stdin (it reads end of file). Idempotent.
    #[pyo3(signature = (done=None))]
    fn close_stdin(&self, py: Python<'_>, done: Option<PyObject>) -> PyResult<PyObject> {
        let stdin = self.stdin.clone();
        drive(py, done, async move {
            let mut g = stdin.lock().await;
            if let Some(mut send) = g.take() {
                let _ = write_frame(&mut send, &StdinFrame::End).await;
                let _ = send.finish();
            }
            Ok(out(()))
        })
    }
}

/// One connection to a coordinator, shared by every thread and task that uses it.
#[pyclass(frozen, module = "berth._berth")]
struct Core {
    client: Arc<Client>,
}

fn opt_mib(v: Option<&str>) -> Result<Option<u64>, Fail> {
    v.map(|s| berth_shared::duration::parse_size_mib(s).map_err(Fail::usage)).transpose()
}

#[pymethods]
impl Core {
    /// Connects with the profile found as the CLI finds it.
    #[new]
    #[pyo3(signature = (profile=None))]
    fn new(py: Python<'_>, profile: Option<PathBuf>) -> PyResult<Core> {
        let p = berth::api::load_profile(profile.as_deref()).map_err(|f| fail_to_py(py, f, "profile"))?;
        let rt = runtime();
        let r = py.allow_threads(|| rt.block_on(Client::with_profile(&p)));
        let client = r.map_err(|f| fail_to_py(py, f, "connect"))?;
        Ok(Core { client: Arc::new(client) })
    }

    /// Who this client is (the profile's user) and the coordinators it knows.
    #[getter]
    fn user(&self) -> String {
        self.client.profile().user.clone()
    }

    #[getter]
    fn coordinators(&self) -> Vec<String> {
        self.client.profile().coordinators.clone()
    }

    /// Closes the connection; requests after it fail.
    fn close(&self) {
        self.client.close();
    }

    // ------------------------------------------------------------------ jobs

    #[pyo3(signature = (command=None, script=None, name=None, array=None, image=None, network=None, cpus=None, mem=None, gpus=None,
        gpu_model=None, min_vram=None, max_runtime_ms=None, attempts=None, env=Vec::new(), secrets=Vec::new(), account=None,
        pools=Vec::new(), after=Vec::new(), priority=None, max_output=None, constraints=Vec::new(), idempotency_key=None, done=None))]
    #[allow(clippy::too_many_arguments)]
    fn submit(
        &self,
        py: Python<'_>,
        command: Option<Vec<String>>,
        script: Option<String>,
        name: Option<String>,
        array: Option<String>,
        image: Option<String>,
        network: Option<String>,
        cpus: Option<f64>,
        mem: Option<String>,
        gpus: Option<u32>,
        gpu_model: Option<String>,
        min_vram: Option<String>,
        max_runtime_ms: Option<u64>,
        attempts: Option<u32>,
        env: Vec<(String, String)>,
        secrets: Vec<(String, String)>,
        account: Option<String>,
        pools: Vec<String>,
        after: Vec<String>,
        priority: Option<i32>,
        max_output: Option<String>,
        constraints: Vec<(String, String)>,
        idempotency_key: Option<String>,
        done: Option<PyObject>,
    ) -> PyResult<PyObject> {
        let spec = (|| -> Result<JobSpec, Fail> {
            let cmd = match (command, script) {
                (Some(argv), None) if !argv.is_empty() => Command::Argv(argv),
                (None, Some(s)) => Command::Script(s),
                (Some(_), Some(_)) => return Err(Fail::usage("give either a command or script=, not both")),
                _ => return Err(Fail::usage("nothing to run: give a command (a list of arguments) or script=")),
            };
            let mut spec = JobSpec::new(cmd);
            spec.name = name;
            spec.array = array.map(|a| a.parse::<ArrayRange>()).transpose().map_err(Fail::usage)?;
            spec.env = env;
            spec.secrets = secrets;
            if let Some(ms) = max_runtime_ms {
                if ms == 0 {
                    return Err(Fail::usage("max_runtime must be more than zero"));
                }
                spec.max_runtime_ms = Some(ms);
            }
            if let Some(n) = attempts {
                spec.max_attempts = n;
            }
            if let Some(c) = cpus {
                if !(c.is_finite() && c > 0.0 && c <= 4096.0) {
                    return Err(Fail::usage(format!("cpus={c} is not a positive number of CPUs")));
                }
                spec.resources.millicpus = (c * 1000.0).round() as u32;
            }
            if let Some(m) = opt_mib(mem.as_deref())? {
                spec.resources.mem_mib = m;
            }
            spec.resources.gpus = gpus.unwrap_or(0);
            spec.resources.gpu_model = gpu_model;
            spec.resources.min_vram_mib = opt_mib(min_vram.as_deref())?;
            spec.max_output = max_output.map(|s| berth_shared::duration::parse_size_bytes(&s).map_err(Fail::usage)).transpose()?;
            spec.constraints = constraints;
            spec.after = after.iter().map(|a| a.parse::<Dependency>()).collect::<Result<_, _>>().map_err(Fail::usage)?;
            spec.account = account;
            spec.pools = pools;
            if let Some(p) = priority {
                spec.priority = p;
            }
            match (image, network) {
                (Some(image), network) => spec.executor = Executor::Docker { image, network },
                (None, Some(_)) => return Err(Fail::usage("network= applies to container jobs: give image= too")),
                (None, None) => {}
            }
            berth_shared::job::check_user_labels(&spec.labels).map_err(Fail::usage)?;
            spec.validate().map_err(Fail::usage)?;
            Ok(spec)
        })();
        let key = match idempotency_key.as_deref().map(uuid::Uuid::parse_str).transpose() {
            Ok(k) => k.unwrap_or_else(uuid::Uuid::new_v4),
            Err(e) => return Err(PyValueError::new_err(format!("idempotency_key: {e}"))),
        };
        let client = self.client.clone();
        drive(py, done, async move {
            let spec = spec?;
            let resp = client.call_idempotent(&Request::Submit { spec, idempotency_key: key }, Duration::from_secs(60)).await?;
            let Response::Submitted { job, tasks, duplicate, warning } = resp else { return Err(unexpected(resp)) };
            Ok(out((job.to_string(), tasks, duplicate, warning)))
        })
    }

    /// Waits until every task of the job has ended: (state, exit code, counts as JSON).
    #[pyo3(signature = (job, timeout_ms=None, done=None))]
    fn wait(&self, py: Python<'_>, job: &str, timeout_ms: Option<u64>, done: Option<PyObject>) -> PyResult<PyObject> {
        let sel = selector(job)?;
        let client = self.client.clone();
        drive(py, done, async move {
            let watch = async {
                let mut r = client.open(&Request::Watch { job: sel.clone(), tasks: false }).await?;
                loop {
                    match r.next().await? {
                        Some(Response::Progress { .. }) => {}
                        Some(Response::Finished { state, counts, exit_code }) => {
                            return Ok((state.as_str().to_string(), exit_code, berth::json::counts_json(&counts).to_string()));
                        }
                        Some(other) => return Err(unexpected(other)),
                        None => return Err(Fail::new(EXIT_FAILURE, "the coordinator ended the watch early")),
                    }
                }
            };
            match timeout_ms {
                None => Ok(out(watch.await?)),
                Some(ms) => match tokio::time::timeout(Duration::from_millis(ms), watch).await {
                    Ok(r) => Ok(out(r?)),
                    Err(_) => Err(Fail::new(EXIT_TIMEOUT, format!("job {} had not ended after {:.3}s", sel.prefix, ms as f64 / 1000.0))),
                },
            }
        })
    }

    /// One task's output (`JOB` or `JOB:INDEX`): a `Stream`, live with `follow`.
    #[pyo3(signature = (job, attempt=None, follow=false, done=None))]
    fn logs(&self, py: Python<'_>, job: &str, attempt: Option<u32>, follow: bool, done: Option<PyObject>) -> PyResult<PyObject> {
        let sel = selector(job)?;
        let client = self.client.clone();
        drive(py, done, async move {
            let r = client.open(&Request::Logs { job: sel, attempt, follow }).await?;
            let s = Stream::of(r);
            Ok(Box::new(move |py: Python<'_>| s.into_py_any(py)) as Out)
        })
    }

    #[pyo3(signature = (job, reason=None, done=None))]
    fn cancel(&self, py: Python<'_>, job: &str, reason: Option<String>, done: Option<PyObject>) -> PyResult<PyObject> {
        let sel = selector(job)?;
        let client = self.client.clone();
        drive(py, done, async move {
            let (job, tasks) = client.ask(&Request::Cancel { job: sel, reason }, answer!(Response::Cancelled { job, tasks } => (job, tasks))).await?;
            Ok(out((job.to_string(), tasks)))
        })
    }

    /// `berth status JOB --json`, as text.
    #[pyo3(signature = (job, done=None))]
    fn status(&self, py: Python<'_>, job: &str, done: Option<PyObject>) -> PyResult<PyObject> {
        let sel = selector(job)?;
        let client = self.client.clone();
        drive(py, done, async move {
            let st = client.ask(&Request::Status { job: sel }, answer!(Response::Status(st) => *st)).await?;
            Ok(json_text(berth::json::status_json(&st)))
        })
    }

    /// `berth list --json`, as text.
    #[pyo3(signature = (state=None, limit=50, done=None))]
    fn jobs(&self, py: Python<'_>, state: Option<&str>, limit: u32, done: Option<PyObject>) -> PyResult<PyObject> {
        let state = state.map(|s| s.parse::<JobState>()).transpose().map_err(PyValueError::new_err)?;
        let client = self.client.clone();
        drive(py, done, async move {
            let jobs = client.ask(&Request::List { state, limit }, answer!(Response::List(jobs) => jobs)).await?;
            Ok(json_text(berth::json::list_json(&jobs)))
        })
    }

    /// `berth budget show --json`, as text.
    #[pyo3(signature = (account=None, done=None))]
    fn budgets(&self, py: Python<'_>, account: Option<String>, done: Option<PyObject>) -> PyResult<PyObject> {
        let client = self.client.clone();
        drive(py, done, async move {
            let rows = client.ask(&Request::Budgets { account }, answer!(Response::Budgets(rows) => rows)).await?;
            Ok(json_text(berth::json::budgets_json(&rows)))
        })
    }

    /// Sets an account's caps in USD (admin); amounts as decimal strings.
    #[pyo3(signature = (account, run, month, done=None))]
    fn set_budget(&self, py: Python<'_>, account: String, run: &str, month: &str, done: Option<PyObject>) -> PyResult<PyObject> {
        let parse = |what: &str, s: &str| -> PyResult<rust_decimal::Decimal> {
            let d: rust_decimal::Decimal = s.trim().parse().map_err(|_| PyValueError::new_err(format!("{what}={s} is not an amount in USD")))?;
            if d.is_sign_negative() {
                return Err(PyValueError::new_err(format!("{what}={s} is negative: a cap is zero or more")));
            }
            Ok(d)
        };
        let (run, month) = (parse("run", run)?, parse("month", month)?);
        let client = self.client.clone();
        drive(py, done, async move {
            let a = client.ask(&Request::SetBudget { account, run, month }, answer!(Response::BudgetSet { account } => account)).await?;
            Ok(out(a))
        })
    }

    /// `berth workers --json`, as text.
    #[pyo3(signature = (done=None))]
    fn workers(&self, py: Python<'_>, done: Option<PyObject>) -> PyResult<PyObject> {
        let client = self.client.clone();
        drive(py, done, async move {
            let ws = client.ask(&Request::Workers, answer!(Response::Workers(ws) => ws)).await?;
            Ok(json_text(berth::json::workers_json(&ws)))
        })
    }

    // ------------------------------------------------------------------ sessions

    /// Opens a session; answers (id, worker, warning) once its sandbox is ready.
    #[pyo3(signature = (name=None, image=None, from_frozen=None, network=None, cpus=None, mem=None, gpus=None, gpu_model=None,
        min_vram=None, constraints=Vec::new(), pools=Vec::new(), account=None, env=Vec::new(), secrets=Vec::new(),
        idle_ttl_ms=None, max_lifetime_ms=None, idempotency_key=None, done=None))]
    #[allow(clippy::too_many_arguments)]
    fn open_session(
        &self,
        py: Python<'_>,
        name: Option<String>,
        image: Option<String>,
        from_frozen: Option<String>,
        network: Option<String>,
        cpus: Option<f64>,
        mem: Option<String>,
        gpus: Option<u32>,
        gpu_model: Option<String>,
        min_vram: Option<String>,
        constraints: Vec<(String, String)>,
        pools: Vec<String>,
        account: Option<String>,
        env: Vec<(String, String)>,
        secrets: Vec<(String, String)>,
        idle_ttl_ms: Option<u64>,
        max_lifetime_ms: Option<u64>,
        idempotency_key: Option<String>,
        done: Option<PyObject>,
    ) -> PyResult<PyObject> {
        let spec = (|| -> Result<JobSpec, Fail> {
            if let Some(c) = cpus {
                if !(c.is_finite() && c > 0.0 && c <= 4096.0) {
                    return Err(Fail::usage(format!("cpus={c} is not a positive number of CPUs")));
                }
            }
            if let Some(t) = from_frozen.as_deref() {
                berth_shared::job::validate_tag(t).map_err(usage)?;
            }
            let o = berth::spec::SessionOptions {
                name,
                image,
                from_frozen,
                network,
                cpus,
                mem_mib: opt_mib(mem.as_deref())?,
                gpus,
                gpu_model,
                min_vram_mib: opt_mib(min_vram.as_deref())?,
                constraints,
                pools,
                account,
                env,
                secrets,
                idle_ttl: idle_ttl_ms.map(Duration::from_millis),
                max_lifetime: max_lifetime_ms.map(Duration::from_millis),
            };
            berth::spec::session_spec(&o)
        })();
        let key = match idempotency_key.as_deref().map(uuid::Uuid::parse_str).transpose() {
            Ok(k) => k.unwrap_or_else(uuid::Uuid::new_v4),
            Err(e) => return Err(PyValueError::new_err(format!("idempotency_key: {e}"))),
        };
        let client = self.client.clone();
        drive(py, done, async move {
            let spec = spec?;
            let mut r = client.open(&Request::OpenSession { spec, idempotency_key: key }).await?;
            let mut id: Option<JobId> = None;
            let mut warn = None;
            loop {
                match r.next().await {
                    Ok(Some(Response::Submitted { job, warning, .. })) => {
                        id = Some(job);
                        warn = warning;
                    }
                    Ok(Some(Response::SessionReady { session, worker })) => return Ok(out((session.to_string(), worker, warn))),
                    Ok(Some(other)) => return Err(unexpected(other)),
                    Ok(None) => return Err(Fail::new(EXIT_FAILURE, "the coordinator ended the answer before the session was ready")),
                    Err(mut f) => {
                        if let Some(id) = id {
                            f.message = format!("{} (session {id}: close it with Client.close_session(\"{id}\"))", f.message);
                        }
                        return Err(f);
                    }
                }
            }
        })
    }

    /// Runs a command to its end: (exec, exit code, stdout, stderr, runtime ms, timed
    /// out, reason). A lost coordinator is waited for (2 min) and the exec's output
    /// picked up where it was, as `berth exec` does.
    #[pyo3(signature = (session, argv, env=Vec::new(), timeout_ms=None, cwd=None, input=None, done=None))]
    #[allow(clippy::too_many_arguments)]
    fn exec(
        &self,
        py: Python<'_>,
        session: &str,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        timeout_ms: Option<u64>,
        cwd: Option<String>,
        input: Option<Vec<u8>>,
        done: Option<PyObject>,
    ) -> PyResult<PyObject> {
        let sel = selector(session)?;
        let spec = ExecSpec { argv, env, timeout_ms, cwd, stdin: input.is_some() };
        let client = self.client.clone();
        drive(py, done, async move {
            let (n, end, stdout, stderr) = run_exec(&client, sel, spec, input).await?;
            let code = exit_code_of(&end);
            Ok(Box::new(move |py: Python<'_>| {
                (n, code, PyBytes::new(py, &stdout), PyBytes::new(py, &stderr), end.runtime_ms, end.timed_out, end.reason).into_py_any(py)
            }) as Out)
        })
    }

    /// Starts a command: an `Exec` whose stream gives ("started", n), output and
    /// ("ended", ...); with `stdin`, its stdin stays open for `write`.
    #[pyo3(signature = (session, argv, env=Vec::new(), timeout_ms=None, cwd=None, stdin=false, done=None))]
    #[allow(clippy::too_many_arguments)]
    fn start(
        &self,
        py: Python<'_>,
        session: &str,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        timeout_ms: Option<u64>,
        cwd: Option<String>,
        stdin: bool,
        done: Option<PyObject>,
    ) -> PyResult<PyObject> {
        let sel = selector(session)?;
        let spec = ExecSpec { argv, env, timeout_ms, cwd, stdin };
        let client = self.client.clone();
        drive(py, done, async move {
            spec.validate().map_err(Fail::usage)?;
            let (r, send) = client.open_with_input(&Request::Exec { session: sel, exec: spec, detach: false }).await?;
            let mut send = if stdin { send } else { None };
            if !stdin {
                // Nothing follows the request: the stream's sending side is done.
                drop(send.take());
            }
            let s = Stream::of(r);
            Ok(Box::new(move |py: Python<'_>| {
                let e = Exec { stream: Py::new(py, s)?, stdin: Arc::new(tokio::sync::Mutex::new(send)) };
                e.into_py_any(py)
            }) as Out)
        })
    }

    /// A recorded exec's output after the first `after` chunks of each stream; with
    /// `follow`, until it ends: a `Stream`.
    #[pyo3(signature = (session, exec, follow=true, after=(0, 0), done=None))]
    fn exec_output(&self, py: Python<'_>, session: &str, exec: u32, follow: bool, after: (u64, u64), done: Option<PyObject>) -> PyResult<PyObject> {
        let sel = selector(session)?;
        let client = self.client.clone();
        drive(py, done, async move {
            let r = client.open(&Request::ExecOutput { session: sel, exec, follow, after }).await?;
            let s = Stream::of(r);
            Ok(Box::new(move |py: Python<'_>| s.into_py_any(py)) as Out)
        })
    }

    /// Copies a local file or directory into the session: (files, dirs, links, bytes).
    #[pyo3(signature = (session, src, dest, done=None))]
    fn copy_in(&self, py: Python<'_>, session: &str, src: PathBuf, dest: String, done: Option<PyObject>) -> PyResult<PyObject> {
        let sel = selector(session)?;
        let client = self.client.clone();
        drive(py, done, async move {
            berth_shared::session::check_relative("the session path", &dest).map_err(Fail::usage)?;
            Ok(out(berth::copy::copy_in(&client, &src, sel, &dest).await?))
        })
    }

    /// Copies a path of the session's workspace out to `dest`: (files, dirs, links, bytes).
    #[pyo3(signature = (session, path, dest, done=None))]
    fn copy_out(&self, py: Python<'_>, session: &str, path: String, dest: PathBuf, done: Option<PyObject>) -> PyResult<PyObject> {
        let sel = selector(session)?;
        let client = self.client.clone();
        drive(py, done, async move {
            berth_shared::session::check_relative("the session path", &path).map_err(Fail::usage)?;
            let s = berth::copy::copy_out(&client, sel, &path, &dest).await?;
            Ok(out((s.files, s.dirs, s.symlinks, s.bytes)))
        })
    }

    /// Closes a session (idempotent): (id, whether it had already ended).
    #[pyo3(signature = (session, done=None))]
    fn close_session(&self, py: Python<'_>, session: &str, done: Option<PyObject>) -> PyResult<PyObject> {
        let sel = selector(session)?;
        let client = self.client.clone();
        drive(py, done, async move {
            let (id, already) =
                client.ask(&Request::CloseSession { session: sel }, answer!(Response::SessionClosed { session, already } => (session, already))).await?;
            Ok(out((id.to_string(), already)))
        })
    }

    /// Freezes a container session into `berth-frozen:TAG`; answers the image.
    #[pyo3(signature = (session, tag=None, done=None))]
    fn freeze(&self, py: Python<'_>, session: &str, tag: Option<String>, done: Option<PyObject>) -> PyResult<PyObject> {
        let sel = selector(session)?;
        if let Some(t) = tag.as_deref() {
            berth_shared::job::validate_tag(t).map_err(PyValueError::new_err)?;
        }
        let client = self.client.clone();
        drive(py, done, async move { Ok(out(client.ask(&Request::Freeze { job: sel, tag }, answer!(Response::Frozen { image, .. } => image)).await?)) })
    }

    /// `berth session status SID --json`, as text.
    #[pyo3(signature = (session, done=None))]
    fn session_status(&self, py: Python<'_>, session: &str, done: Option<PyObject>) -> PyResult<PyObject> {
        let sel = selector(session)?;
        let client = self.client.clone();
        drive(py, done, async move {
            let st = client.ask(&Request::SessionStatus { session: sel }, answer!(Response::Session(st) => *st)).await?;
            Ok(json_text(berth::json::session_status_json(&st)))
        })
    }

    /// `berth session list --json`, as text.
    #[pyo3(signature = (limit=50, done=None))]
    fn sessions(&self, py: Python<'_>, limit: u32, done: Option<PyObject>) -> PyResult<PyObject> {
        let client = self.client.clone();
        drive(py, done, async move {
            let rows = client.ask(&Request::Sessions { limit }, answer!(Response::Sessions(rows) => rows)).await?;
            Ok(json_text(berth::json::session_list_json(&rows)))
        })
    }

    /// The bench's baseline: `n` execs of `argv` run back to back by Rust alone on this
    /// connection; each one's round trip in seconds.
    #[pyo3(signature = (session, argv, n))]
    fn bench_exec(&self, py: Python<'_>, session: &str, argv: Vec<String>, n: u32) -> PyResult<Vec<f64>> {
        let sel = selector(session)?;
        let client = self.client.clone();
        block(py, async move {
            let mut times = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let t = Instant::now();
                let spec = ExecSpec { argv: argv.clone(), env: Vec::new(), timeout_ms: None, cwd: None, stdin: false };
                run_exec(&client, sel.clone(), spec, None).await?;
                times.push(t.elapsed().as_secs_f64());
            }
            Ok(times)
        })
    }

    /// The bench's baseline for output: reads all of one task's output in Rust alone;
    /// answers the bytes read.
    #[pyo3(signature = (job))]
    fn bench_logs(&self, py: Python<'_>, job: &str) -> PyResult<u64> {
        let sel = selector(job)?;
        let client = self.client.clone();
        block(py, async move {
            let mut r = client.open(&Request::Logs { job: sel, attempt: None, follow: false }).await?;
            let mut n = 0u64;
            while let Some(resp) = r.next().await? {
                match resp {
                    Response::Output { data, .. } => n += data.len() as u64,
                    Response::End => break,
                    other => return Err(unexpected(other)),
                }
            }
            Ok(n)
        })
    }
}

/// One exec run to its end, its output gathered; stdin sent and closed when given.
async fn run_exec(client: &Client, sel: JobSelector, spec: ExecSpec, input: Option<Vec<u8>>) -> Result<(u32, ExecEnd, Vec<u8>, Vec<u8>), Fail> {
    spec.validate().map_err(Fail::usage)?;
    let (mut r, send) = client.open_with_input(&Request::Exec { session: sel.clone(), exec: spec, detach: false }).await?;
    let feeding = match (input, send) {
        (Some(data), Some(mut send)) => Some(runtime().spawn(async move {
            for piece in data.chunks(1 << 20) {
                if write_frame(&mut send, &StdinFrame::Data(piece.to_vec())).await.is_err() {
                    return;
                }
            }
            let _ = write_frame(&mut send, &StdinFrame::End).await;
            let _ = send.finish();
        })),
        (None, Some(mut send)) => {
            let _ = send.finish();
            None
        }
        _ => None,
    };
    let (mut exec, mut stdout, mut stderr, mut seen) = (None, Vec::new(), Vec::new(), (0u64, 0u64));
    let result = loop {
        let next = match r.next().await {
            Ok(n) => n,
            Err(f) if f.lost && exec.is_some() => {
                let n = exec.unwrap_or_default();
                client.reconnect(Duration::from_secs(120)).await?;
                r = client.open(&Request::ExecOutput { session: sel.clone(), exec: n, follow: true, after: seen }).await?;
                continue;
            }
            Err(f) => break Err(f),
        };
        match next {
            Some(Response::ExecStarted { exec: n }) => exec = Some(n),
            Some(Response::Output { stream: OutStream::Stdout, data }) => {
                seen.0 += 1;
                stdout.extend_from_slice(&data);
            }
            Some(Response::Output { stream: OutStream::Stderr, data }) => {
                seen.1 += 1;
                stderr.extend_from_slice(&data);
            }
            Some(Response::ExecEnded(end)) => break Ok((end.exec, end, std::mem::take(&mut stdout), std::mem::take(&mut stderr))),
            Some(other) => break Err(unexpected(other)),
            None => break Err(Fail::lost("the coordinator ended the exec's stream before it ended")),
        }
    };
    if let Some(f) = feeding {
        f.abort();
    }
    result
}

/// The native half of the `berth` package.
#[pymodule]
fn _berth(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Core>()?;
    m.add_class::<Stream>()?;
    m.add_class::<Exec>()?;
    m.add_class::<Pending>()?;
    m.add_function(wrap_pyfunction!(parse_duration_ms, m)?)?;
    m.add_function(wrap_pyfunction!(parse_size_mib, m)?)?;
    m.add_function(wrap_pyfunction!(parse_size_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(profile_path, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
