//! `job.toml`: a job described in a file, with the same fields as `berth submit`'s
//! flags. Errors name the file, the line and the field.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use toml::Spanned;

use crate::duration::{parse_duration, parse_size_bytes, parse_size_mib};
use crate::job::{ArrayRange, Command, Executor, JobSpec};
use crate::profile::one_line;
use crate::wire::MAX_FRAME_BYTES;

const MIB: f64 = 1024.0 * 1024.0;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobFile {
    name: Option<Spanned<String>>,
    command: Option<Spanned<Vec<String>>>,
    script: Option<Spanned<String>>,
    array: Option<Spanned<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    secrets: BTreeMap<String, String>,
    max_runtime: Option<Spanned<String>>,
    attempts: Option<Spanned<i64>>,
    priority: Option<i32>,
    account: Option<String>,
    cpus: Option<Spanned<f64>>,
    mem: Option<Spanned<String>>,
    gpus: Option<Spanned<i64>>,
    gpu_model: Option<String>,
    min_vram: Option<Spanned<String>>,
    image: Option<String>,
    network: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    pools: Vec<String>,
    /// Worker labels the job needs.
    #[serde(default)]
    constraints: BTreeMap<String, String>,
    /// Parents: `["JOB", "JOB:any"]`.
    #[serde(default)]
    after: Vec<Spanned<String>>,
    /// The most output one attempt may store: `"100M"`.
    max_output: Option<Spanned<String>>,
}

/// Reads and checks a job file.
pub fn load(path: &Path) -> Result<JobSpec, String> {
    // A submission is one frame: a file larger than a frame can never be sent.
    let len = std::fs::metadata(path).map_err(|e| format!("cannot read job file {}: {e}", path.display()))?.len();
    if len > MAX_FRAME_BYTES as u64 {
        return Err(format!(
            "job file {} is {:.1} MiB, over the {} MiB one submission may carry: keep large data in files the job reads",
            path.display(),
            len as f64 / MIB,
            MAX_FRAME_BYTES >> 20
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read job file {}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("{}{e}", path.display()))
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|b| *b == b'\n').count() + 1
}

/// Parses job-file text; an error reads `:LINE: field F: what` (the caller puts the
/// path in front).
pub fn parse(text: &str) -> Result<JobSpec, String> {
    let f: JobFile = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| format!(":{}", line_of(text, s.start))).unwrap_or_default();
        format!("{line}: {}", one_line(e.message()))
    })?;
    let at = |span: std::ops::Range<usize>, field: &str, msg: String| format!(":{}: field `{field}`: {msg}", line_of(text, span.start));

    let command = match (f.command, f.script) {
        (Some(_), Some(s)) => return Err(at(s.span(), "script", "give either `command` or `script`, not both".into())),
        (None, None) => return Err(": field `command`: missing: give `command = [\"prog\", \"arg\"]` or `script = \"...\"`".into()),
        (Some(c), None) => {
            let span = c.span();
            let v = c.into_inner();
            if v.is_empty() || v[0].is_empty() {
                return Err(at(span, "command", "is empty".into()));
            }
            Command::Argv(v)
        }
        (None, Some(s)) => {
            let span = s.span();
            let v = s.into_inner();
            if v.trim().is_empty() {
                return Err(at(span, "script", "is empty".into()));
            }
            Command::Script(v)
        }
    };
    let mut spec = JobSpec::new(command);
    if let Some(n) = f.name {
        let span = n.span();
        let n = n.into_inner();
        crate::text::check_label("the name", &n, crate::text::MAX_NAME_BYTES).map_err(|e| at(span, "name", e))?;
        spec.name = Some(n);
    }
    spec.env = f.env.into_iter().collect();
    spec.secrets = f.secrets.into_iter().collect();
    spec.labels = f.labels.into_iter().collect();
    spec.pools = f.pools;
    spec.account = f.account;
    spec.priority = f.priority.unwrap_or(0);
    spec.resources.gpu_model = f.gpu_model;
    spec.constraints = f.constraints.into_iter().collect();
    for a in f.after {
        let span = a.span();
        spec.after.push(a.get_ref().parse().map_err(|e| at(span, "after", e))?);
    }
    if let Some(a) = f.array {
        let span = a.span();
        spec.array = Some(a.into_inner().parse::<ArrayRange>().map_err(|e| at(span, "array", e))?);
    }
    if let Some(d) = f.max_runtime {
        let span = d.span();
        let d = parse_duration(d.get_ref()).map_err(|e| at(span.clone(), "max_runtime", e))?;
        if d.is_zero() {
            return Err(at(span, "max_runtime", "must be more than zero".into()));
        }
        spec.max_runtime_ms = Some(d.as_millis() as u64);
    }
    if let Some(n) = f.attempts {
        let span = n.span();
        let n = *n.get_ref();
        if !(1..=100).contains(&n) {
            return Err(at(span, "attempts", format!("{n} is out of range: use 1 to 100")));
        }
        spec.max_attempts = n as u32;
    }
    if let Some(c) = f.cpus {
        let span = c.span();
        let c = *c.get_ref();
        if !(c.is_finite() && c > 0.0 && c <= 4096.0) {
            return Err(at(span, "cpus", format!("{c} is not a positive number of CPUs")));
        }
        spec.resources.millicpus = (c * 1000.0).round() as u32;
    }
    if let Some(m) = f.mem {
        let span = m.span();
        spec.resources.mem_mib = parse_size_mib(m.get_ref()).map_err(|e| at(span, "mem", e))?;
    }
    if let Some(g) = f.gpus {
        let span = g.span();
        let g = *g.get_ref();
        if !(0..=64).contains(&g) {
            return Err(at(span, "gpus", format!("{g} is out of range: use 0 to 64")));
        }
        spec.resources.gpus = g as u32;
    }
    if let Some(v) = f.min_vram {
        let span = v.span();
        spec.resources.min_vram_mib = Some(parse_size_mib(v.get_ref()).map_err(|e| at(span, "min_vram", e))?);
    }
    if let Some(m) = f.max_output {
        let span = m.span();
        let bytes = parse_size_bytes(m.get_ref()).map_err(|e| at(span.clone(), "max_output", e))?;
        if bytes == 0 {
            return Err(at(span, "max_output", "must be more than zero".into()));
        }
        spec.max_output = Some(bytes);
    }
    match (f.image, f.network) {
        (Some(image), network) => spec.executor = Executor::Docker { image, network },
        (None, Some(_)) => return Err(": field `network`: only applies with `image`".into()),
        (None, None) => {}
    }
    spec.validate().map_err(|e| format!(": {e}"))?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_file() {
        let spec = parse(
            r#"
name = "train"
script = "echo $BERTH_ARRAY_INDEX"
array = "1-10"
env = { A = "1" }
max_runtime = "5m"
attempts = 2
cpus = 1.5
mem = "2G"
"#,
        )
        .expect("valid");
        assert_eq!(spec.name.as_deref(), Some("train"));
        assert_eq!(spec.array.map(|a| a.len()), Some(10));
        assert_eq!(spec.max_runtime_ms, Some(300_000));
        assert_eq!(spec.resources.millicpus, 1500);
        assert_eq!(spec.resources.mem_mib, 2048);
        assert_eq!(spec.max_attempts, 2);
        assert_eq!(spec.max_output, None);
        let spec = parse("command = [\"true\"]\nmax_output = \"1.5M\"\n").expect("valid");
        assert_eq!(spec.max_output, Some(3 << 19));
    }

    #[test]
    fn errors_name_line_and_field() {
        let e = parse("command = [\"true\"]\nmax_runtime = \"soon\"\n").expect_err("bad duration");
        assert!(e.starts_with(":2: field `max_runtime`"), "{e}");
        let e = parse("command = [\"true\"]\ncolour = \"red\"\n").expect_err("unknown field");
        assert!(e.starts_with(":2:") && e.contains("colour"), "{e}");
        let e = parse("name = \"x\"\n").expect_err("no command");
        assert!(e.contains("`command`"), "{e}");
        let e = parse("command = [\"true\"]\nattempts = 0\n").expect_err("attempts");
        assert!(e.starts_with(":2: field `attempts`"), "{e}");
        let e = parse("command = [\"true\"]\nmax_output = \"0\"\n").expect_err("no output");
        assert!(e.starts_with(":2: field `max_output`"), "{e}");
        let e = parse("command = [\n").expect_err("syntax");
        assert!(!e.contains('\n'), "one line: {e}");
        let e = parse("command = [\"true\"]\nname = \"a\\u001bb\"\n").expect_err("control character");
        assert!(e.starts_with(":2: field `name`") && e.contains("control character"), "{e}");
        let e = parse(&format!("command = [\"true\"]\nname = \"{}\"\n", "n".repeat(300))).expect_err("long name");
        assert!(e.starts_with(":2: field `name`") && e.contains("256"), "{e}");
    }
}
