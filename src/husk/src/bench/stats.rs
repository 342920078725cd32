//! What every benchmark shares: the order peers run in, and how samples
//! are summarized (median, p10, p90) and compared (ratios).

use serde_json::{json, Value};

/// The median: the mean of the two middle samples for an even count; NaN
/// when there is none. NaN samples (a figure a run could not give) are
/// left out.
pub fn median(v: Vec<f64>) -> f64 {
    percentile(v, 50.0)
}

/// The `p`th percentile (0-100) by linear interpolation between the
/// closest ranks (as numpy's default); NaN when there is no sample.
pub fn percentile(v: Vec<f64>, p: f64) -> f64 {
    at_percentile(&sorted(v), p)
}

/// The samples that are numbers, in order.
fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.retain(|x| !x.is_nan());
    v.sort_by(f64::total_cmp);
    v
}

/// The `p`th percentile of sorted samples.
fn at_percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = (p.clamp(0.0, 100.0) / 100.0) * (v.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    v[lo] + (v[hi] - v[lo]) * (rank - lo as f64)
}

/// Median, 10th and 90th percentile of a set of samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub p10: f64,
    pub p90: f64,
    pub n: usize,
}

impl Summary {
    pub fn of(v: &[f64]) -> Self {
        let v = sorted(v.to_vec());
        Self {
            median: at_percentile(&v, 50.0),
            p10: at_percentile(&v, 10.0),
            p90: at_percentile(&v, 90.0),
            n: v.len(),
        }
    }

    /// `median [p10-p90]`, or `-` without samples.
    pub fn cell(&self, decimals: usize) -> String {
        if self.n == 0 {
            return "-".into();
        }
        if self.n == 1 {
            return format!("{:.decimals$}", self.median);
        }
        format!(
            "{:.decimals$} [{:.decimals$}-{:.decimals$}]",
            self.median, self.p10, self.p90
        )
    }

    pub fn json(&self) -> Value {
        let num = |x: f64| if x.is_nan() { Value::Null } else { json!(x) };
        json!({"median": num(self.median), "p10": num(self.p10), "p90": num(self.p90), "n": self.n})
    }
}

/// `a / b` to three decimals, or `-` when either is missing.
pub fn ratio(a: f64, b: f64) -> String {
    if a.is_nan() || b.is_nan() || b == 0.0 {
        "-".into()
    } else {
        format!("{:.3}", a / b)
    }
}

/// The order `n` peers run in during round `round`: each round starts
/// one peer later, so no peer always runs first (right after the machine
/// was idle) or always after the same neighbour.
pub fn round_order(round: usize, n: usize) -> Vec<usize> {
    (0..n).map(|i| (round + i) % n).collect()
}

/// Prints rows as a table: the first column left-aligned, the others
/// right-aligned, each as wide as its widest cell.
pub fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let width: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c == 0 {
                line.push_str(&format!("{cell:<w$}", w = width[0]));
            } else {
                line.push_str(&format!("  {cell:>w$}", w = width[c]));
            }
        }
        println!("{}", line.trim_end());
    }
}

/// One runtime's samples of a staged measurement: per sample, the time
/// of each stage (ms) and the wall time of the whole (s).
#[derive(Debug, Clone)]
pub struct Series {
    /// Short name (JSON key, chart label).
    pub name: String,
    /// What exactly was measured.
    pub what: String,
    pub stages: Vec<String>,
    pub samples: Vec<Vec<f64>>,
    pub totals: Vec<f64>,
}

impl Series {
    pub fn new(name: &str, what: &str, stages: &[&str]) -> Self {
        Self {
            name: name.into(),
            what: what.into(),
            stages: stages.iter().map(|s| s.to_string()).collect(),
            samples: Vec::new(),
            totals: Vec::new(),
        }
    }

    pub fn push(&mut self, stages_ms: Vec<f64>, total_s: f64) {
        self.samples.push(stages_ms);
        self.totals.push(total_s);
    }

    /// The summary of stage `i` (ms), or of the first stage named `name`.
    pub fn stage(&self, i: usize) -> Summary {
        Summary::of(
            &self
                .samples
                .iter()
                .filter_map(|s| s.get(i).copied())
                .collect::<Vec<_>>(),
        )
    }

    pub fn stage_named(&self, name: &str) -> Summary {
        match self.stages.iter().position(|s| s == name) {
            Some(i) => self.stage(i),
            None => Summary::of(&[]),
        }
    }

    /// The sum of stages `range` per sample (ms).
    pub fn stages_sum(&self, range: std::ops::Range<usize>) -> Summary {
        let v: Vec<f64> = self
            .samples
            .iter()
            .map(|s| s[range.clone()].iter().sum())
            .collect();
        Summary::of(&v)
    }

    pub fn total(&self) -> Summary {
        Summary::of(&self.totals)
    }

    pub fn json(&self) -> Value {
        json!({
            "name": self.name,
            "what": self.what,
            "stages": self.stages,
            "stage_summaries_ms": (0..self.stages.len()).map(|i| self.stage(i).json()).collect::<Vec<_>>(),
            "total_summary_s": self.total().json(),
            "samples_ms": self.samples,
            "totals_s": self.totals,
        })
    }
}

/// Every stage name of `series`, each once, in first-seen order.
pub fn stage_names(series: &[Series]) -> Vec<&str> {
    let mut names: Vec<&str> = Vec::new();
    for st in series.iter().flat_map(|s| &s.stages) {
        if !names.contains(&st.as_str()) {
            names.push(st);
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![7.0]), 7.0);
        assert!(median(vec![]).is_nan());
        assert_eq!(median(vec![f64::NAN, 1.0, 3.0]), 2.0);
    }

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let v: Vec<f64> = (1..=11).map(f64::from).collect();
        assert_eq!(percentile(v.clone(), 10.0), 2.0);
        assert_eq!(percentile(v.clone(), 90.0), 10.0);
        assert_eq!(percentile(vec![1.0, 2.0], 10.0), 1.1);
        let s = Summary::of(&[1.0, 2.0, 3.0]);
        assert_eq!((s.median, s.n), (2.0, 3));
        assert_eq!(Summary::of(&[]).cell(1), "-");
        assert_eq!(Summary::of(&[2.0]).cell(1), "2.0");
    }

    #[test]
    fn each_peer_leads_one_round() {
        assert_eq!(round_order(0, 3), vec![0, 1, 2]);
        assert_eq!(round_order(1, 3), vec![1, 2, 0]);
        assert_eq!(round_order(2, 3), vec![2, 0, 1]);
        assert_eq!(round_order(3, 3), vec![0, 1, 2]);
        assert!(round_order(0, 0).is_empty());
    }

    #[test]
    fn ratios_of_missing_figures_are_dashes() {
        assert_eq!(ratio(1.0, 2.0), "0.500");
        assert_eq!(ratio(f64::NAN, 2.0), "-");
        assert_eq!(ratio(1.0, 0.0), "-");
    }
}
