//! Percentiles, the latency estimate from two cumulative curves, and Markdown tables.

/// The `p`-th percentile (0..=100) of `values` by nearest rank; `None` when empty.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// A cumulative count sampled over time: `(seconds, count)`, time ascending.
pub type Curve = Vec<(f64, f64)>;

/// The first time `curve` reaches `k`, interpolated linearly between samples
/// (arrivals inside one sampling period are assumed evenly spread).
pub fn time_reaching(curve: &[(f64, f64)], k: f64) -> Option<f64> {
    // Counters only grow, so the curve is sorted by count too.
    let i = curve.partition_point(|&(_, c)| c < k);
    if i >= curve.len() {
        return None;
    }
    if i == 0 {
        return Some(curve[0].0);
    }
    let (t0, c0) = curve[i - 1];
    let (t1, c1) = curve[i];
    if c1 <= c0 {
        return Some(t1);
    }
    Some(t0 + (t1 - t0) * (k - c0) / (c1 - c0))
}

/// Latency of the k-th item as the horizontal distance between the arrival
/// curve (`sent`) and the departure curve (`done`): exact for a FIFO path,
/// and its mean equals the true mean for any order (Little's law). Items are
/// sampled every `step` so long runs stay cheap. Items the `done` curve never
/// reached are left out (their count is what was lost or still in flight).
pub fn curve_latencies(sent: &[(f64, f64)], done: &[(f64, f64)], step: usize) -> Vec<f64> {
    let total = done.last().map(|&(_, c)| c).unwrap_or(0.0);
    let mut out = Vec::new();
    let mut k = 1.0;
    while k <= total {
        if let (Some(a), Some(b)) = (time_reaching(sent, k), time_reaching(done, k)) {
            out.push((b - a).max(0.0));
        }
        k += step.max(1) as f64;
    }
    out
}

/// A Markdown table printed as it is built.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let line = |cells: &[String]| format!("| {} |", cells.join(" | "));
        let mut out = vec![
            line(&self.header),
            format!("|{}", " --- |".repeat(self.header.len())),
        ];
        out.extend(self.rows.iter().map(|r| line(r)));
        out.join("\n")
    }
}

pub fn ms(secs: Option<f64>) -> String {
    secs.map(|s| format!("{:.1} ms", s * 1000.0))
        .unwrap_or_else(|| "n/a".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn curve_distance_recovers_a_constant_delay() {
        // 1000 items/s sent from t=0; each done 20 ms later.
        let sent: Vec<(f64, f64)> = (0..=100)
            .map(|i| (i as f64 * 0.01, i as f64 * 10.0))
            .collect();
        let done: Vec<(f64, f64)> = sent.iter().map(|&(t, c)| (t + 0.02, c)).collect();
        let lat = curve_latencies(&sent, &done, 7);
        assert!(!lat.is_empty());
        for l in lat {
            assert!((l - 0.02).abs() < 1e-9, "{l}");
        }
    }

    #[test]
    fn items_never_done_are_not_counted() {
        let sent = vec![(0.0, 0.0), (1.0, 100.0)];
        let done = vec![(0.0, 0.0), (2.0, 50.0)];
        assert_eq!(curve_latencies(&sent, &done, 1).len(), 50);
    }

    #[test]
    fn table_renders_markdown() {
        let mut t = Table::new(&["a", "b"]);
        t.row(vec!["1".into(), "2".into()]);
        assert_eq!(t.render(), "| a | b |\n| --- | --- |\n| 1 | 2 |");
    }
}
