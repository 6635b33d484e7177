//! The metrics registry read back by name and labels.
//!
//! The status page reads what every stage already reports into the one
//! registry, instead of asking the stages: the page needs no hooks in the
//! forwarder or the sources, and shows exactly what Prometheus would scrape.

use std::collections::{BTreeMap, HashMap};

use prometheus::proto::MetricType;
use tsgw_core::Metrics;

/// One sample: its labels and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// Counter and gauge samples by family name.
#[derive(Debug, Clone, Default)]
pub struct Families {
    by_name: HashMap<String, Vec<Sample>>,
}

impl Families {
    pub fn gather(metrics: &Metrics) -> Self {
        let mut by_name = HashMap::new();
        for family in metrics.registry().gather() {
            let kind = family.get_field_type();
            let samples = family
                .get_metric()
                .iter()
                .filter_map(|m| {
                    let value = match kind {
                        MetricType::COUNTER => m.get_counter().get_value(),
                        MetricType::GAUGE => m.get_gauge().get_value(),
                        _ => return None,
                    };
                    let labels = m
                        .get_label()
                        .iter()
                        .map(|l| (l.name().to_owned(), l.value().to_owned()))
                        .collect();
                    Some(Sample { labels, value })
                })
                .collect();
            by_name.insert(family.name().to_owned(), samples);
        }
        Self { by_name }
    }

    /// Families made up in tests.
    #[cfg(test)]
    pub fn from_samples<'a>(
        samples: impl IntoIterator<Item = (&'a str, &'a [(&'a str, &'a str)], f64)>,
    ) -> Self {
        let mut by_name: HashMap<String, Vec<Sample>> = HashMap::new();
        for (name, labels, value) in samples {
            by_name.entry(name.to_owned()).or_default().push(Sample {
                labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                value,
            });
        }
        Self { by_name }
    }

    pub fn samples(&self, name: &str) -> &[Sample] {
        self.by_name.get(name).map_or(&[], Vec::as_slice)
    }

    /// The samples of `name` whose labels include every pair of `having`.
    pub fn matching<'a>(
        &'a self,
        name: &str,
        having: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples(name)
            .iter()
            .filter(move |s| having.iter().all(|(k, v)| s.label(k) == *v))
    }

    /// The one sample of `name` with exactly these label values, if present.
    pub fn value(&self, name: &str, having: &[(&str, &str)]) -> Option<f64> {
        self.matching(name, having).next().map(|s| s.value)
    }

    /// The sum over the samples of `name` that include `having`.
    pub fn sum(&self, name: &str, having: &[(&str, &str)]) -> f64 {
        self.matching(name, having).map(|s| s.value).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_counters_and_gauges_by_labels() {
        let metrics = Metrics::new();
        metrics
            .device_errors_total
            .with_label_values(&["modbus", "plc", "timeout"])
            .inc_by(3);
        metrics
            .device_errors_total
            .with_label_values(&["modbus", "plc", "io"])
            .inc();
        metrics.queue_readings.set(12);
        let f = Families::gather(&metrics);
        assert_eq!(
            f.value(
                "tsgw_device_errors_total",
                &[("device", "plc"), ("kind", "timeout")]
            ),
            Some(3.0)
        );
        assert_eq!(f.sum("tsgw_device_errors_total", &[("device", "plc")]), 4.0);
        assert_eq!(f.value("tsgw_queue_readings", &[]), Some(12.0));
        assert_eq!(f.value("tsgw_no_such_metric", &[]), None);
    }
}
