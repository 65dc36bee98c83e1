//! Every file in `deploy/` is read the way production reads it: the coordinator's
//! config with `ConfigFile`, the client profile with `Profile`, the systemd units with a
//! small unit-file reader whose `ExecStart` is checked against the real binaries
//! (`--help`, and a run that parses the whole command line), and the worker's
//! environment file against the variables its unit uses.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use berth_coordinator::config::ConfigFile;
use berth_shared::duration::parse_duration;
use berth_shared::profile::Profile;
use berth_shared::wire::Role;

const COORDINATOR_UNIT: &str = "berth-coordinator.service";
const WORKER_UNIT: &str = "berth-worker.service";
const WORKER_ENV: &str = "worker.env";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("deploy")
}

fn read(name: &str) -> String {
    let path = deploy_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read deploy/{name} ({}): {e}", path.display()))
}

fn coordinator_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_berth-coordinator"))
}

/// `berth-worker` is another crate's binary: cargo does not build it for this test, so
/// look for it beside `berth-coordinator` in the same target directory.
fn worker_bin() -> PathBuf {
    let bin = coordinator_bin().with_file_name(format!("berth-worker{}", std::env::consts::EXE_SUFFIX));
    assert!(bin.is_file(), "{} is missing: run `cargo build --workspace` (or `cargo build -p berth-worker`) before this test", bin.display());
    bin
}

/// Runs `cmd` to completion, killing it and failing the test after `limit`.
fn run(mut cmd: Command, limit: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("cannot start {shown}: {e}"));
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait().unwrap_or_else(|e| panic!("cannot wait for {shown}: {e}")) {
            Some(s) => break s,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{shown} still ran after {limit:?}");
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    Output { status, stdout: out.join().expect("stdout reader"), stderr: err.join().expect("stderr reader") }
}

// ---------------------------------------------------------------------------------
// systemd unit files

/// Directives these units may use; a name outside the list is most likely a typo,
/// which systemd would only warn about and ignore. Add new ones after checking
/// systemd.directives(7).
const KNOWN_KEYS: &[(&str, &[&str])] = &[
    ("Unit", &["Description", "Documentation", "Wants", "Requires", "After", "Before", "StartLimitIntervalSec", "StartLimitBurst"]),
    (
        "Service",
        &[
            "Type",
            "User",
            "Group",
            "SupplementaryGroups",
            "StateDirectory",
            "StateDirectoryMode",
            "EnvironmentFile",
            "Environment",
            "ExecStartPre",
            "ExecStart",
            "ExecReload",
            "KillMode",
            "KillSignal",
            "TimeoutStopSec",
            "Restart",
            "RestartSec",
            "RestartPreventExitStatus",
            "OOMPolicy",
            "TasksMax",
            "LimitNOFILE",
            "UMask",
            "Delegate",
            "NoNewPrivileges",
            "ProtectSystem",
            "ReadWritePaths",
            "PrivateTmp",
            "ProtectHome",
            "PrivateDevices",
            "ProtectKernelTunables",
            "ProtectKernelModules",
            "ProtectKernelLogs",
            "ProtectControlGroups",
            "ProtectClock",
            "ProtectHostname",
            "RestrictAddressFamilies",
            "RestrictNamespaces",
            "RestrictRealtime",
            "RestrictSUIDSGID",
            "LockPersonality",
            "MemoryDenyWriteExecute",
            "SystemCallArchitectures",
            "SystemCallFilter",
            "CapabilityBoundingSet",
            "AmbientCapabilities",
        ],
    ),
    ("Install", &["WantedBy", "RequiredBy", "Alias"]),
];

/// A unit file: its sections in order and every `Key=Value` (keys may repeat).
struct Unit {
    sections: Vec<String>,
    entries: Vec<(String, String, String)>,
}

impl Unit {
    /// Reads the unit-file syntax: `[Section]` headers, `Key=Value` lines (a trailing
    /// backslash continues the value on the next line), comments starting with `#` or
    /// `;`, and blank lines. Anything else is an error naming the line.
    fn parse(text: &str) -> Result<Unit, String> {
        let mut unit = Unit { sections: Vec::new(), entries: Vec::new() };
        let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l));
        while let Some((n, raw)) = lines.next() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                if !KNOWN_KEYS.iter().any(|(s, _)| *s == name) {
                    return Err(format!("line {n}: unexpected section [{name}]"));
                }
                if unit.sections.iter().any(|s| s == name) {
                    return Err(format!("line {n}: section [{name}] appears twice"));
                }
                unit.sections.push(name.to_string());
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(format!("line {n}: `{line}` is not a section header, a comment or Key=Value"));
            };
            let key = key.trim();
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric()) || !key.starts_with(|c: char| c.is_ascii_uppercase()) {
                return Err(format!("line {n}: `{key}` is not a directive name"));
            }
            let Some(section) = unit.sections.last().cloned() else {
                return Err(format!("line {n}: `{key}` comes before any section"));
            };
            let known = KNOWN_KEYS.iter().find(|(s, _)| *s == section).map(|(_, k)| *k).unwrap_or_default();
            if !known.contains(&key) {
                return Err(format!("line {n}: unknown directive `{key}` in [{section}]"));
            }
            let mut value = value.trim().to_string();
            while let Some(head) = value.strip_suffix('\\') {
                let head = head.trim_end().to_string();
                let Some((_, next)) = lines.next() else {
                    return Err(format!("line {n}: `{key}` ends in a continuation with no next line"));
                };
                value = format!("{head} {}", next.trim());
            }
            unit.entries.push((section, key.to_string(), value));
        }
        Ok(unit)
    }

    fn all(&self, section: &str, key: &str) -> Vec<&str> {
        self.entries.iter().filter(|(s, k, _)| s == section && k == key).map(|(_, _, v)| v.as_str()).collect()
    }

    /// The value of a directive that must appear exactly once.
    fn one(&self, section: &str, key: &str) -> &str {
        match self.all(section, key)[..] {
            [v] => v,
            [] => panic!("[{section}] has no {key}="),
            _ => panic!("[{section}] has {key}= more than once"),
        }
    }

    /// Every space-separated item of a list directive such as `After=`, over all its lines.
    fn list(&self, section: &str, key: &str) -> Vec<&str> {
        self.all(section, key).into_iter().flat_map(str::split_whitespace).collect()
    }
}

fn unit(name: &str) -> Unit {
    Unit::parse(&read(name)).unwrap_or_else(|e| panic!("deploy/{name}: {e}"))
}

/// Splits a command line into words the way systemd does for the cases used here:
/// whitespace separates, single or double quotes group.
fn split_command(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut quote: Option<char> = None;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.get_or_insert_with(String::new).push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                word.get_or_insert_with(String::new);
            }
            (None, c) if c.is_whitespace() => words.extend(word.take()),
            (None, c) => word.get_or_insert_with(String::new).push(c),
        }
    }
    assert!(quote.is_none(), "unterminated quote in `{line}`");
    words.extend(word);
    words
}

/// The variables a value refers to, as `$NAME` or `${NAME}`, with whether braced.
fn variables(value: &str) -> Vec<(String, bool)> {
    let mut found = Vec::new();
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        rest = &rest[i + 1..];
        let braced = rest.starts_with('{');
        let body = if braced { &rest[1..] } else { rest };
        let len = body.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(body.len());
        assert!(len > 0, "a lone `$` in `{value}`");
        if braced {
            assert!(body[len..].starts_with('}'), "unclosed `${{` in `{value}`");
        }
        found.push((body[..len].to_string(), braced));
        rest = &body[len..];
    }
    found
}

/// Expands a split command line as systemd does: a word that is exactly `$NAME`
/// becomes the variable's value split at whitespace (zero or more words); `${NAME}`
/// is replaced in place and stays one word.
fn expand(words: &[String], env: &Vars) -> Vec<String> {
    let lookup = |name: &str| env.get(name).unwrap_or_else(|| panic!("${name} is not defined in deploy/{WORKER_ENV}")).clone();
    let mut out = Vec::new();
    for w in words {
        match w.strip_prefix('$') {
            Some(name) if !name.starts_with('{') => out.extend(lookup(name).split_whitespace().map(String::from)),
            _ => {
                let mut word = w.clone();
                for (name, _) in variables(w) {
                    word = word.replace(&format!("${{{name}}}"), &lookup(&name));
                }
                out.push(word);
            }
        }
    }
    out
}

/// The binary and its arguments from `ExecStart=`, with systemd's prefixes (`-`, `@`,
/// `:`, `+`, `!`) removed from the path.
fn exec_start(unit: &Unit) -> Vec<String> {
    let mut words = split_command(unit.one("Service", "ExecStart"));
    assert!(!words.is_empty(), "ExecStart= is empty");
    words[0] = words[0].trim_start_matches(['-', '@', ':', '+', '!']).to_string();
    assert!(words[0].starts_with('/'), "ExecStart= must name its binary by an absolute path, not `{}`", words[0]);
    words
}

fn binary_name(argv: &[String]) -> &str {
    Path::new(&argv[0]).file_name().and_then(|n| n.to_str()).unwrap_or_default()
}

/// The `--flags` a binary (or one of its subcommands) lists in its `--help`.
fn help_flags(bin: &Path, subcommands: &[String]) -> BTreeSet<String> {
    let mut cmd = Command::new(bin);
    cmd.args(subcommands).arg("--help");
    let out = run(cmd, Duration::from_secs(30));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{} {} --help failed: {}", bin.display(), subcommands.join(" "), String::from_utf8_lossy(&out.stderr));
    help.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.len() > 2 && w.starts_with("--") && !w.starts_with("---"))
        .map(String::from)
        .collect()
}

/// The subcommands (words before the first flag) and the flags of an argument list.
fn subcommands_and_flags(args: &[String]) -> (Vec<String>, Vec<String>) {
    let subs: Vec<String> = args.iter().take_while(|a| !a.starts_with('-')).cloned().collect();
    let flags = args.iter().filter(|a| a.starts_with("--")).map(|a| a.split('=').next().unwrap_or_default().to_string()).collect();
    (subs, flags)
}

fn assert_flags_accepted(unit_name: &str, bin: &Path, args: &[String]) {
    let (subs, flags) = subcommands_and_flags(args);
    let accepted = help_flags(bin, &subs);
    for f in &flags {
        assert!(
            accepted.contains(f),
            "deploy/{unit_name}: ExecStart passes {f}, which `{} {} --help` does not list (it lists {accepted:?})",
            bin.file_name().unwrap_or_default().to_string_lossy(),
            subs.join(" ")
        );
    }
}

/// The value following `flag` in an argument list.
fn flag_value<'a>(args: &'a [String], flag: &str) -> &'a str {
    let i = args.iter().position(|a| a == flag).unwrap_or_else(|| panic!("ExecStart has no {flag}"));
    args.get(i + 1).unwrap_or_else(|| panic!("{flag} has no value")).as_str()
}

fn assert_common_unit(name: &str, u: &Unit, user: &str, state_dir: &str) {
    assert_eq!(u.sections, ["Unit", "Service", "Install"], "deploy/{name}: sections");
    assert!(!u.one("Unit", "Description").is_empty());
    assert!(u.list("Unit", "After").contains(&"network-online.target"), "deploy/{name}: After=network-online.target");
    assert!(u.list("Unit", "Wants").contains(&"network-online.target"), "deploy/{name}: Wants=network-online.target");
    assert_eq!(u.list("Install", "WantedBy"), ["multi-user.target"], "deploy/{name}: WantedBy");
    assert_eq!(u.one("Service", "User"), user);
    assert_eq!(u.one("Service", "StateDirectory"), state_dir);
    assert_eq!(u.one("Service", "NoNewPrivileges"), "yes");
    assert_eq!(u.one("Service", "PrivateTmp"), "yes");
    let nofile: u64 = u.one("Service", "LimitNOFILE").parse().expect("LimitNOFILE is a number");
    assert!(nofile >= 4096, "deploy/{name}: LimitNOFILE={nofile} is too low");
    parse_duration(u.one("Service", "TimeoutStopSec")).expect("TimeoutStopSec is a duration");
}

// ---------------------------------------------------------------------------------
// The worker's environment file

/// Variable name to value.
type Vars = BTreeMap<String, String>;

/// `KEY=VALUE` lines (systemd `EnvironmentFile=` syntax: `#` or `;` comments, blank
/// lines, optional surrounding quotes); also returns the commented-out assignments,
/// which document optional settings.
fn parse_env(text: &str) -> Result<(Vars, Vars), String> {
    fn assignment(line: &str) -> Option<(String, String)> {
        let (key, value) = line.split_once('=')?;
        let valid =
            key.starts_with(|c: char| c.is_ascii_uppercase() || c == '_') && key.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return None;
        }
        let v = value.trim();
        let unquoted = ['"', '\''].iter().find_map(|q| v.strip_prefix(*q).and_then(|r| r.strip_suffix(*q))).unwrap_or(v);
        Some((key.to_string(), unquoted.to_string()))
    }
    let (mut set, mut commented) = (BTreeMap::new(), BTreeMap::new());
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#').or_else(|| line.strip_prefix(';')) {
            if let Some((k, v)) = assignment(comment.trim()) {
                commented.insert(k, v);
            }
            continue;
        }
        let (k, v) = assignment(line).ok_or_else(|| format!("line {}: `{line}` is not KEY=VALUE", i + 1))?;
        if set.insert(k.clone(), v).is_some() {
            return Err(format!("line {}: {k} is set twice", i + 1));
        }
    }
    Ok((set, commented))
}

fn worker_env() -> (Vars, Vars) {
    parse_env(&read(WORKER_ENV)).unwrap_or_else(|e| panic!("deploy/{WORKER_ENV}: {e}"))
}

// ---------------------------------------------------------------------------------

fn coordinator_config() -> ConfigFile {
    let path = deploy_dir().join("coordinator.toml");
    ConfigFile::from_file(&path).unwrap_or_else(|e| panic!("deploy/coordinator.toml: {e}"))
}

fn example_profile() -> Profile {
    Profile::from_file(&deploy_dir().join("profile.example.toml")).unwrap_or_else(|e| panic!("deploy/profile.example.toml: {e}"))
}

fn split_host_port(addr: &str) -> (&str, u16) {
    let (host, port) = addr.rsplit_once(':').unwrap_or_else(|| panic!("`{addr}` is not HOST:PORT"));
    (host.trim_start_matches('[').trim_end_matches(']'), port.parse().unwrap_or_else(|_| panic!("`{addr}` has no valid port")))
}

#[test]
fn coordinator_toml_parses_with_the_real_config_type() {
    let c = coordinator_config();
    assert_eq!(c.data_dir.as_deref(), Some(Path::new("/var/lib/berth")));
    assert_eq!(c.listen.as_deref(), Some("0.0.0.0:7447"));
    assert_eq!(c.lease_ttl.as_deref(), Some("30s"));
    assert_eq!(parse_duration(c.lease_ttl.as_deref().unwrap_or_default()), Ok(Duration::from_secs(30)));
    assert_eq!(c.names, ["berth.example.org"]);
    assert_eq!(c.store, None, "the example keeps the embedded SQLite store");
}

/// Whether a TOML line assigns `key` (comments assign nothing).
fn sets_key(line: &str, key: &str) -> bool {
    match line.split_once('=') {
        Some((k, _)) => k.trim() == key,
        None => false,
    }
}

/// A commented-out `# key = value` line documents an option: uncommented, the file
/// must still parse (so a renamed or removed field shows up here).
#[test]
fn coordinator_toml_documented_options_parse() {
    let text = read("coordinator.toml");
    let mut documented = 0;
    let tmp = tempfile::tempdir().expect("temp dir");
    for (i, line) in text.lines().enumerate() {
        let Some(body) = line.strip_prefix('#').map(str::trim) else {
            continue;
        };
        let Ok(table) = toml::from_str::<toml::Table>(body) else {
            continue;
        };
        let Some(key) = table.keys().next().filter(|_| table.len() == 1) else {
            continue;
        };
        let variant: String =
            text.lines().enumerate().filter(|(j, l)| *j == i || !sets_key(l, key)).map(|(j, l)| if j == i { body } else { l }).collect::<Vec<_>>().join("\n");
        let path = tmp.path().join(format!("variant-{i}.toml"));
        std::fs::write(&path, variant).expect("write variant");
        ConfigFile::from_file(&path).unwrap_or_else(|e| panic!("deploy/coordinator.toml line {}: `{body}` does not parse once uncommented: {e}", i + 1));
        documented += 1;
    }
    assert!(documented > 0, "deploy/coordinator.toml documents no optional setting");
}

#[test]
fn coordinator_unit_runs_the_coordinator_with_flags_it_accepts() {
    let u = unit(COORDINATOR_UNIT);
    assert_common_unit(COORDINATOR_UNIT, &u, "berth", "berth");
    assert_eq!(u.one("Service", "Restart"), "on-failure");
    assert_eq!(u.one("Service", "ProtectSystem"), "strict");
    assert_eq!(u.one("Service", "ProtectHome"), "yes");

    let argv = exec_start(&u);
    assert_eq!(binary_name(&argv), "berth-coordinator", "deploy/{COORDINATOR_UNIT}: ExecStart runs {}", argv[0]);
    let (subs, _) = subcommands_and_flags(&argv[1..]);
    assert_eq!(subs, ["run"], "deploy/{COORDINATOR_UNIT}: ExecStart runs `berth-coordinator run`");
    assert_flags_accepted(COORDINATOR_UNIT, &coordinator_bin(), &argv[1..]);
    assert_eq!(flag_value(&argv, "--config"), "/etc/berth/coordinator.toml");

    // The data dir of the shipped config is the unit's state directory, and the only
    // place the sandbox lets it write.
    let data_dir = coordinator_config().data_dir.expect("coordinator.toml sets data_dir");
    assert_eq!(data_dir, Path::new("/var/lib").join(u.one("Service", "StateDirectory")));
    assert!(u.list("Service", "ReadWritePaths").contains(&data_dir.to_str().unwrap_or_default()), "ReadWritePaths must hold {}", data_dir.display());

    // The binary itself takes this command line and config: with an empty data dir
    // it gets past flags and config (errors there exit 2) and stops at the missing CA.
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut args: Vec<String> = argv[1..].to_vec();
    let i = args.iter().position(|a| a == "--config").expect("--config") + 1;
    args[i] = deploy_dir().join("coordinator.toml").display().to_string();
    let mut cmd = Command::new(coordinator_bin());
    cmd.args(&args).arg("--data-dir").arg(tmp.path().join("empty"));
    let out = run(cmd, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "berth-coordinator {args:?} should stop at the uninitialised data dir, got: {stderr}");
    assert!(stderr.contains("not initialised"), "unexpected error: {stderr}");
}

#[test]
fn worker_unit_runs_the_worker_with_flags_it_accepts() {
    let u = unit(WORKER_UNIT);
    // Root, to run each slot's jobs as a user of its own; cgroups delegated to it.
    assert_common_unit(WORKER_UNIT, &u, "root", "berth-worker");
    assert_eq!(u.one("Service", "Delegate"), "yes", "deploy/{WORKER_UNIT}: the worker makes its jobs' cgroups");
    assert!(u.entries.iter().all(|(_, k, v)| k != "ProtectControlGroups" || v == "no"), "deploy/{WORKER_UNIT}: cgroups must be writable");
    assert_eq!(u.one("Service", "Restart"), "always");
    assert_eq!(u.one("Service", "KillMode"), "mixed");
    assert_eq!(u.one("Service", "OOMPolicy"), "continue");
    assert_eq!(u.one("Service", "EnvironmentFile").trim_start_matches('-'), format!("/etc/berth/{WORKER_ENV}"));
    // Room for every job's SIGTERM grace before systemd's SIGKILL.
    let stop = parse_duration(u.one("Service", "TimeoutStopSec")).expect("TimeoutStopSec");
    assert!(stop >= Duration::from_secs(15), "TimeoutStopSec={stop:?} leaves jobs too little grace");

    let argv = exec_start(&u);
    assert_eq!(binary_name(&argv), "berth-worker", "deploy/{WORKER_UNIT}: ExecStart runs {}", argv[0]);
    let (set, commented) = worker_env();
    let args = expand(&argv[1..], &set);
    let (subs, _) = subcommands_and_flags(&args);
    assert!(subs.is_empty(), "berth-worker takes no subcommand, ExecStart gives {subs:?}");
    let worker = worker_bin();
    assert_flags_accepted(WORKER_UNIT, &worker, &args);
    assert_eq!(flag_value(&args, "--ca"), "/etc/berth/ca.pem");
    assert_eq!(Path::new(flag_value(&args, "--work-dir")), Path::new("/var/lib").join(u.one("Service", "StateDirectory")));

    // The worker parses the whole expanded command line, values included: with the
    // env file as shipped and with the example extra flags it documents.
    let mut variants = vec![set.clone()];
    if let Some(extra) = commented.get("BERTH_WORKER_ARGS") {
        let mut with_extra = set.clone();
        with_extra.insert("BERTH_WORKER_ARGS".into(), extra.clone());
        variants.push(with_extra);
    }
    for env in variants {
        let args = expand(&argv[1..], &env);
        assert_flags_accepted(WORKER_ENV, &worker, &args);
        let mut cmd = Command::new(&worker);
        cmd.args(&args).arg("--print-host").env_remove("BERTH_JOIN_TOKEN");
        let out = run(cmd, Duration::from_secs(30));
        assert!(out.status.success(), "berth-worker {args:?} --print-host failed: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn worker_env_defines_what_the_worker_unit_uses() {
    let (set, commented) = worker_env();
    let u = unit(WORKER_UNIT);
    let defined_in_unit: BTreeSet<String> =
        u.all("Service", "Environment").iter().flat_map(|v| split_command(v)).filter_map(|a| a.split_once('=').map(|(k, _)| k.to_string())).collect();
    let mut used = Vec::new();
    for (_, _, value) in &u.entries {
        used.extend(variables(value));
    }
    assert!(!used.is_empty(), "deploy/{WORKER_UNIT} uses no variables from deploy/{WORKER_ENV}");
    for (name, braced) in used {
        let value = set.get(&name);
        assert!(value.is_some() || defined_in_unit.contains(&name), "deploy/{WORKER_UNIT} uses ${name}, which deploy/{WORKER_ENV} does not set");
        // `${NAME}` is always exactly one argument: empty would pass `--flag ""`.
        if braced {
            assert!(value.is_some_and(|v| !v.is_empty()), "deploy/{WORKER_ENV}: {name} must not be empty");
        }
    }

    let slots: usize = set["BERTH_SLOTS"].parse().expect("BERTH_SLOTS is a number");
    assert!((1..=4096).contains(&slots), "BERTH_SLOTS={slots}");
    for addr in set["BERTH_COORDINATOR"].split(',') {
        split_host_port(addr);
    }
    // A join token is per host and single-use: the example documents it, never sets it.
    assert!(!set.contains_key("BERTH_JOIN_TOKEN"), "deploy/{WORKER_ENV} must not set BERTH_JOIN_TOKEN");
    assert!(commented.contains_key("BERTH_JOIN_TOKEN"), "deploy/{WORKER_ENV} should document BERTH_JOIN_TOKEN");
}

#[test]
fn profile_example_parses_with_the_real_profile_type() {
    let p = example_profile();
    assert_eq!(p.user, "alice");
    let role = Role::parse(&p.role).unwrap_or_else(|| panic!("role `{}` is not a berth role", p.role));
    assert!(role != Role::Worker, "a client profile cannot have role worker");
    assert!(!p.coordinators.is_empty());
    for addr in &p.coordinators {
        split_host_port(addr);
    }
    for (field, pem, kind) in [("ca", &p.ca, "CERTIFICATE"), ("cert", &p.cert, "CERTIFICATE"), ("key", &p.key, "PRIVATE KEY")] {
        let pem = pem.trim();
        assert!(pem.starts_with(&format!("-----BEGIN {kind}-----")), "{field} does not start a {kind} PEM block");
        assert!(pem.ends_with(&format!("-----END {kind}-----")), "{field} does not end a {kind} PEM block");
    }
}

/// The examples describe one cluster: workers and clients dial a name the
/// coordinator's certificate holds, on the port it listens on.
#[test]
fn examples_agree_on_the_coordinator_address() {
    let c = coordinator_config();
    let (_, port) = split_host_port(c.listen.as_deref().expect("listen"));
    let (env, _) = worker_env();
    let p = example_profile();
    let dialled = env["BERTH_COORDINATOR"].split(',').chain(p.coordinators.iter().map(String::as_str)).map(str::to_string).collect::<Vec<_>>();
    for addr in &dialled {
        let (host, p) = split_host_port(addr);
        assert!(c.names.iter().any(|n| n == host), "{addr} is not one of coordinator.toml's names {:?}", c.names);
        assert_eq!(p, port, "{addr} does not use the port coordinator.toml listens on");
    }
    assert!(c.names.contains(&p.server_name), "profile server_name {} is not one of {:?}", p.server_name, c.names);
}

/// Where `systemd-analyze` is installed, it reads both units too (with ExecStart
/// pointed at the built binaries) and must report no unknown or invalid settings.
#[test]
fn systemd_analyze_accepts_the_units_where_available() {
    let probe = Command::new("systemd-analyze").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("systemd-analyze is not installed: skipped");
        return;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut paths = Vec::new();
    for (name, bin) in [(COORDINATOR_UNIT, coordinator_bin()), (WORKER_UNIT, worker_bin())] {
        let text = read(name).replace(&format!("/usr/local/bin/{}", name.trim_end_matches(".service")), &bin.display().to_string());
        let path = tmp.path().join(name);
        std::fs::write(&path, text).expect("write unit copy");
        paths.push(path);
    }
    let mut cmd = Command::new("systemd-analyze");
    cmd.arg("verify").arg("--man=no").args(&paths);
    let out = run(cmd, Duration::from_secs(60));
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // Parse problems are reported as `FILE:LINE: message`.
    let problems: Vec<&str> = report
        .lines()
        .filter(|l| {
            [COORDINATOR_UNIT, WORKER_UNIT].iter().any(|u| l.contains(&format!("{u}:")) && l.split(':').nth(1).is_some_and(|n| n.trim().parse::<u32>().is_ok()))
        })
        .collect();
    assert!(problems.is_empty(), "systemd-analyze verify:\n{}", problems.join("\n"));
}
