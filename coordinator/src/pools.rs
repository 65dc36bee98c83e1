//! Pools and their rates: coordinator configuration (`run --pools FILE`), never a
//! worker's claim. Rates are parsed exactly: a TOML number is read from its source
//! text, not through a float, so `0.0001` is exactly one ten-thousandth of a dollar.
//!
//! ```toml
//! [[pool]]
//! name = "cloud-h100"
//! kind = "cloud"              # local < lan < cloud
//! gpu_usd_per_s = "0.00111"   # strings or numbers
//! vcpu_usd_per_s = 0.00001
//! gib_usd_per_s = 0
//! idle_tail_s = 60            # billed after each attempt (a VM that lingers)
//! spill_after_s = 30          # how long a job waits for a cheaper slot first
//! approval_threshold_usd = 100
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolKind {
    Local,
    Lan,
    Cloud,
}

impl FromStr for PoolKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "local" => Ok(PoolKind::Local),
            "lan" => Ok(PoolKind::Lan),
            "cloud" => Ok(PoolKind::Cloud),
            other => Err(format!("kind `{other}` is not local, lan or cloud")),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Pool {
    pub name: String,
    pub kind: PoolKind,
    pub gpu_usd_per_s: Decimal,
    pub vcpu_usd_per_s: Decimal,
    pub gib_usd_per_s: Decimal,
    pub idle_tail_s: u64,
    pub spill_after_s: u64,
    pub approval_threshold_usd: Option<Decimal>,
}

impl Pool {
    pub fn free(name: &str) -> Pool {
        Pool {
            name: name.into(),
            kind: PoolKind::Local,
            gpu_usd_per_s: Decimal::ZERO,
            vcpu_usd_per_s: Decimal::ZERO,
            gib_usd_per_s: Decimal::ZERO,
            idle_tail_s: 0,
            spill_after_s: 0,
            approval_threshold_usd: None,
        }
    }

    pub fn is_free(&self) -> bool {
        self.gpu_usd_per_s.is_zero() && self.vcpu_usd_per_s.is_zero() && self.gib_usd_per_s.is_zero()
    }

    /// Dollars per second for a job holding these resources here (CPUs in
    /// thousandths, memory in MiB).
    pub fn usd_per_s(&self, gpus: u32, millicpus: u32, mem_mib: u64) -> Decimal {
        let cpus = Decimal::from(millicpus) / Decimal::from(1000);
        let gib = Decimal::from(mem_mib) / Decimal::from(1024);
        self.gpu_usd_per_s * Decimal::from(gpus) + self.vcpu_usd_per_s * cpus + self.gib_usd_per_s * gib
    }

    /// What one attempt that ran `runtime_ms` costs here, idle tail included.
    pub fn charge(&self, gpus: u32, millicpus: u32, mem_mib: u64, runtime_ms: u64) -> Decimal {
        let secs = Decimal::from(runtime_ms) / Decimal::from(1000) + Decimal::from(self.idle_tail_s);
        (self.usd_per_s(gpus, millicpus, mem_mib) * secs).round_dp(6)
    }
}

/// The pools, by name. `default` (local, free) exists unless the file defines it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Pools {
    pub pools: BTreeMap<String, Pool>,
    /// Fair-share weights per account (`[[account]]` tables); 1 when not given.
    pub weights: BTreeMap<String, u32>,
}

impl Default for Pools {
    fn default() -> Self {
        let mut pools = BTreeMap::new();
        pools.insert("default".to_string(), Pool::free("default"));
        Pools { pools, weights: BTreeMap::new() }
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|b| *b == b'\n').count() + 1
}

/// A money amount from a TOML value: a string, an integer, or a float read from its
/// source text. Negative amounts are refused.
fn money(v: &toml_edit::Value, field: &str, src: &str) -> Result<Decimal, String> {
    let d = match v {
        toml_edit::Value::String(s) => Decimal::from_str(s.value().trim()).or_else(|_| Decimal::from_scientific(s.value().trim())),
        toml_edit::Value::Integer(i) => Ok(Decimal::from(*i.value())),
        toml_edit::Value::Float(f) => {
            // The number as written in the file, not the float it parsed to.
            let raw = v.span().and_then(|s| src.get(s)).map(str::to_string).unwrap_or_else(|| f.display_repr().into_owned());
            let raw = raw.trim().replace('_', "");
            Decimal::from_str(&raw).or_else(|_| Decimal::from_scientific(&raw))
        }
        _ => return Err(format!("`{field}` must be a number or a string holding one")),
    };
    let d = d.map_err(|_| format!("`{field}` is not a number"))?;
    if d.is_sign_negative() {
        return Err(format!("`{field}` must not be negative"));
    }
    Ok(d.normalize())
}

fn seconds(v: &toml_edit::Value, field: &str) -> Result<u64, String> {
    match v {
        toml_edit::Value::Integer(i) if *i.value() >= 0 => Ok(*i.value() as u64),
        toml_edit::Value::Integer(_) => Err(format!("`{field}` must not be negative")),
        toml_edit::Value::String(s) => berth_shared::duration::parse_duration(s.value()).map(|d| d.as_secs()).map_err(|e| format!("`{field}`: {e}")),
        _ => Err(format!("`{field}` must be whole seconds or a duration such as \"30s\"")),
    }
}

impl Pools {
    pub fn from_file(path: &Path) -> Result<Pools, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read pools file {}: {e}", path.display()))?;
        Pools::parse(&text).map_err(|e| format!("{}{e}", path.display()))
    }

    /// Parses a pools file; an error reads `:LINE: what`.
    pub fn parse(text: &str) -> Result<Pools, String> {
        let doc: toml_edit::ImDocument<&str> = toml_edit::ImDocument::parse(text).map_err(|e| {
            let line = e.span().map(|s| format!(":{}", line_of(text, s.start))).unwrap_or_default();
            format!("{line}: {}", e.message().trim())
        })?;
        let mut out = Pools::default();
        let mut defined_default = false;
        for (key, item) in doc.iter() {
            if key != "pool" && key != "account" {
                let at = item.span().map(|s| line_of(text, s.start)).unwrap_or(1);
                return Err(format!(":{at}: unknown key `{key}`: the file holds `[[pool]]` and `[[account]]` tables"));
            }
        }
        if let Some(accounts) = doc.get("account") {
            let Some(tables) = accounts.as_array_of_tables() else {
                return Err(":1: `account` must be `[[account]]` tables".into());
            };
            for t in tables.iter() {
                let at = t.span().map(|s| line_of(text, s.start)).unwrap_or(1);
                let name = t.get("name").and_then(|v| v.as_str()).ok_or_else(|| format!(":{at}: an account needs a `name`"))?;
                let weight = match t.get("weight").and_then(|v| v.as_integer()) {
                    Some(w) if (1..=1000).contains(&w) => w as u32,
                    _ => return Err(format!(":{at}: account `{name}` needs a `weight` from 1 to 1000")),
                };
                if let Some((k, _)) = t.iter().find(|(k, _)| *k != "name" && *k != "weight") {
                    return Err(format!(":{at}: unknown field `{k}` in account `{name}`"));
                }
                out.weights.insert(name.to_string(), weight);
            }
        }
        let Some(tables) = doc.get("pool") else { return Ok(out) };

        let Some(tables) = tables.as_array_of_tables() else {
            return Err(":1: `pool` must be `[[pool]]` tables".into());
        };
        for t in tables.iter() {
            let at = t.span().map(|s| line_of(text, s.start)).unwrap_or(1);
            let mut pool = Pool::free("");
            let mut kind_set = false;
            for (k, item) in t.iter() {
                let line = item.span().map(|s| line_of(text, s.start)).unwrap_or(at);
                let err = |m: String| format!(":{line}: {m}");
                let Some(v) = item.as_value() else { return Err(err(format!("`{k}` must be a value"))) };
                match k {
                    "name" => pool.name = v.as_str().ok_or_else(|| err("`name` must be a string".into()))?.trim().to_string(),
                    "kind" => {
                        pool.kind = v.as_str().ok_or_else(|| err("`kind` must be a string".into()))?.parse().map_err(err)?;
                        kind_set = true;
                    }
                    "gpu_usd_per_s" => pool.gpu_usd_per_s = money(v, k, text).map_err(err)?,
                    "vcpu_usd_per_s" => pool.vcpu_usd_per_s = money(v, k, text).map_err(err)?,
                    "gib_usd_per_s" => pool.gib_usd_per_s = money(v, k, text).map_err(err)?,
                    "idle_tail_s" => pool.idle_tail_s = seconds(v, k).map_err(err)?,
                    "spill_after_s" => pool.spill_after_s = seconds(v, k).map_err(err)?,
                    "approval_threshold_usd" => pool.approval_threshold_usd = Some(money(v, k, text).map_err(err)?),
                    other => return Err(err(format!("unknown field `{other}`"))),
                }
            }
            if pool.name.is_empty() {
                return Err(format!(":{at}: a pool needs a `name`"));
            }
            if !kind_set {
                return Err(format!(":{at}: pool `{}` needs a `kind` (local, lan or cloud)", pool.name));
            }
            if pool.name == "default" {
                if defined_default {
                    return Err(format!(":{at}: pool `default` is defined twice"));
                }
                defined_default = true;
            } else if out.pools.contains_key(&pool.name) {
                return Err(format!(":{at}: pool `{}` is defined twice", pool.name));
            }
            out.pools.insert(pool.name.clone(), pool);
        }
        Ok(out)
    }

    pub fn get(&self, name: &str) -> Option<&Pool> {
        self.pools.get(name)
    }

    /// An account's fair-share weight.
    pub fn weight(&self, account: &str) -> u32 {
        self.weights.get(account).copied().unwrap_or(1)
    }

    /// The pools a job may run in: those it names (each must exist), else all.
    pub fn eligible(&self, named: &[String]) -> Result<Vec<&Pool>, String> {
        if named.is_empty() {
            return Ok(self.pools.values().collect());
        }
        named.iter().map(|n| self.pools.get(n).ok_or_else(|| format!("unknown pool `{n}`: the pools are {}", self.names().join(", ")))).collect()
    }

    pub fn names(&self) -> Vec<String> {
        self.pools.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_parsed_exactly_from_numbers_and_strings() {
        let p = Pools::parse(
            r#"
[[pool]]
name = "cloud"
kind = "cloud"
gpu_usd_per_s = 0.0001
vcpu_usd_per_s = "0.000123456789012345678"
gib_usd_per_s = 0.000012345678901234567
idle_tail_s = 60
spill_after_s = "2s"
approval_threshold_usd = 100
"#,
        )
        .expect("parses");
        let c = p.get("cloud").expect("cloud");
        assert_eq!(c.gpu_usd_per_s, Decimal::from_str("0.0001").expect("dec"));
        assert_eq!(c.vcpu_usd_per_s, Decimal::from_str("0.000123456789012345678").expect("dec"));
        assert_eq!(c.gib_usd_per_s, Decimal::from_str("0.000012345678901234567").expect("dec"), "more digits than a float holds");
        assert_eq!((c.idle_tail_s, c.spill_after_s), (60, 2));
        assert_eq!(c.approval_threshold_usd, Some(Decimal::from(100)));
        assert!(p.get("default").is_some_and(Pool::is_free), "default exists unless defined");
        // 10,000 charges of 0.0001 sum to exactly 1.
        let sum: Decimal = (0..10_000).map(|_| c.gpu_usd_per_s).sum();
        assert_eq!(sum, Decimal::ONE);
    }

    #[test]
    fn bad_pools_files_name_the_line() {
        for (text, want) in [
            ("[[pool]]\nname = \"a\"\nkind = \"local\"\ngpu_usd_per_s = -1\n", ":4: `gpu_usd_per_s` must not be negative"),
            ("[[pool]]\nname = \"a\"\nkind = \"local\"\ngpu_usd_per_s = \"lots\"\n", ":4: `gpu_usd_per_s` is not a number"),
            ("[[pool]]\nname = \"a\"\nkind = \"orbit\"\n", ":3: kind `orbit` is not local, lan or cloud"),
            ("[[pool]]\nname = \"a\"\nkind = \"lan\"\nspeed = 3\n", ":4: unknown field `speed`"),
            ("[[pool]]\nkind = \"lan\"\n", ":1: a pool needs a `name`"),
            ("[[pool]]\nname = \"a\"\nkind = \"lan\"\nidle_tail_s = -5\n", ":4: `idle_tail_s` must not be negative"),
            ("[[pool]\n", ":1:"),
        ] {
            let e = Pools::parse(text).expect_err(text);
            assert!(e.starts_with(want), "{text:?}: got {e}");
        }
    }

    #[test]
    fn a_charge_is_runtime_plus_tail_times_rates() {
        let mut p = Pool::free("c");
        p.gpu_usd_per_s = Decimal::from_str("0.001").expect("dec");
        p.vcpu_usd_per_s = Decimal::from_str("0.0001").expect("dec");
        p.idle_tail_s = 10;
        // 2 GPUs, 4 CPUs, 90 s + 10 s tail: (0.002 + 0.0004) * 100 = 0.24
        assert_eq!(p.charge(2, 4000, 0, 90_000), Decimal::from_str("0.24").expect("dec"));
    }
}
