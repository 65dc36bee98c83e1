//! The perf harness's table: a row per figure, set against its baseline, with a
//! verdict against its target; printed aligned, and as JSON for comparison across
//! commits.

use serde_json::{json, Value};

/// A number with as many decimals as its size deserves.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.1 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

pub fn list(v: &[f64]) -> String {
    format!("[{}]", v.iter().map(|x| num(*x)).collect::<Vec<_>>().join(", "))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

// ---------------------------------------------------------------- the table

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Miss,
    /// Measured, but there is no target (or not at the target's scale).
    Info,
    Skipped,
    Error,
}

impl Verdict {
    pub fn of(ok: Option<bool>) -> Verdict {
        match ok {
            Some(true) => Verdict::Pass,
            Some(false) => Verdict::Miss,
            None => Verdict::Error,
        }
    }
    fn word(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Miss => "MISS",
            Verdict::Info => "-",
            Verdict::Skipped => "skipped",
            Verdict::Error => "error",
        }
    }
}

/// How the ratio of a row reads: a percentage (throughput against its baseline) or a
/// factor (anything else).
#[derive(Clone, Copy)]
pub enum RatioStyle {
    Percent,
    Times,
}

pub struct Row {
    pub id: String,
    pub scenario: String,
    pub figure: Option<f64>,
    pub unit: String,
    /// Shown instead of `figure unit` (latency rows show p50 and p99).
    pub figure_text: Option<String>,
    pub baseline: Option<f64>,
    pub baseline_unit: String,
    pub baseline_text: Option<String>,
    pub ratio: Option<f64>,
    pub ratio_style: RatioStyle,
    pub target: String,
    pub verdict: Verdict,
    /// What the figure and the baseline are, rounds, caveats.
    pub note: String,
    pub extra: serde_json::Map<String, Value>,
}

impl Row {
    pub fn new(id: &str, scenario: &str, unit: &str, baseline_unit: &str, target: &str) -> Row {
        Row {
            id: id.into(),
            scenario: scenario.into(),
            figure: None,
            unit: unit.into(),
            figure_text: None,
            baseline: None,
            baseline_unit: baseline_unit.into(),
            baseline_text: None,
            ratio: None,
            ratio_style: RatioStyle::Times,
            target: target.into(),
            verdict: Verdict::Info,
            note: String::new(),
            extra: serde_json::Map::new(),
        }
    }

    pub fn not_run(id: &str, scenario: &str, verdict: Verdict, why: String) -> Row {
        let mut r = Row::new(id, scenario, "", "", "");
        r.verdict = verdict;
        r.note = why;
        r
    }

    pub fn values(mut self, figure: Option<f64>, baseline: Option<f64>) -> Row {
        self.figure = figure;
        self.baseline = baseline;
        self.ratio = ratio(figure, baseline);
        self
    }

    pub fn extra(mut self, k: &str, v: Value) -> Row {
        self.extra.insert(k.into(), v);
        self
    }

    fn figure_cell(&self) -> String {
        if self.verdict == Verdict::Skipped || (self.verdict == Verdict::Error && self.figure.is_none()) {
            return String::new();
        }
        match (&self.figure_text, self.figure) {
            (Some(t), _) => t.clone(),
            (None, Some(v)) => format!("{} {}", num(v), self.unit),
            (None, None) => "n/a".into(),
        }
    }

    fn baseline_cell(&self) -> String {
        match (&self.baseline_text, self.baseline) {
            (Some(t), _) => t.clone(),
            (None, Some(v)) => format!("{} {}", num(v), self.baseline_unit),
            (None, None) if self.baseline_unit.is_empty() => String::new(),
            (None, None) => "n/a".into(),
        }
    }

    fn ratio_cell(&self) -> String {
        match (self.ratio, self.ratio_style) {
            (Some(r), RatioStyle::Percent) => format!("{:.1}%", r * 100.0),
            (Some(r), RatioStyle::Times) => format!("{}x", num(r)),
            (None, _) => String::new(),
        }
    }

    pub fn json(&self) -> Value {
        json!({
            "id": self.id,
            "scenario": self.scenario,
            "figure": self.figure,
            "unit": self.unit,
            "figure_text": self.figure_cell(),
            "baseline": self.baseline,
            "baseline_unit": self.baseline_unit,
            "baseline_text": self.baseline_cell(),
            "ratio": self.ratio,
            "target": self.target,
            "result": self.verdict.word(),
            "note": self.note,
            "detail": Value::Object(self.extra.clone()),
        })
    }
}

pub fn print_table(rows: &[Row]) {
    let head = ["#", "scenario", "figure", "baseline", "ratio", "target", "result"];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| [r.id.clone(), r.scenario.clone(), r.figure_cell(), r.baseline_cell(), r.ratio_cell(), r.target.clone(), r.verdict.word().to_string()])
        .collect();
    let mut w = head.map(str::len);
    for c in &cells {
        for (i, s) in c.iter().enumerate() {
            w[i] = w[i].max(s.chars().count());
        }
    }
    let line = |c: &[String; 7]| {
        let mut s = String::new();
        for (i, x) in c.iter().enumerate() {
            let pad = w[i].saturating_sub(x.chars().count());
            // Numbers right-aligned, words left-aligned.
            if (2..=4).contains(&i) {
                s.push_str(&" ".repeat(pad));
                s.push_str(x);
            } else {
                s.push_str(x);
                s.push_str(&" ".repeat(pad));
            }
            s.push_str("  ");
        }
        s.trim_end().to_string()
    };
    let rule = "-".repeat(w.iter().sum::<usize>() + 2 * (w.len() - 1));
    println!("{rule}");
    println!("{}", line(&head.map(String::from)));
    println!("{rule}");
    for c in &cells {
        println!("{}", line(c));
    }
    println!("{rule}");
    println!("notes:");
    for r in rows.iter().filter(|r| !r.note.is_empty()) {
        println!("  {:<3} {}", r.id, r.note);
    }
}
